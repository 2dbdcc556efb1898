"""Inference-time linear layers through oneDNN, with the bias and GELU fused into the matmul.

On CPU, ``torch.ops.mkldnn._linear_pointwise`` runs the matmul, the bias add and the
activation in one pass over the output, where ``F.gelu(F.linear(...))`` writes and re-reads it.
Under CPU autocast the weights are cast once and cached (keyed by the parameter's identity and
version, so an update invalidates the copy). It has no backward: with gradients enabled, or off
the CPU, the plain PyTorch ops run instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_ready(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _cast_weight(layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    weight = layer.weight
    if weight.dtype == dtype:
        return weight
    stamp = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(layer, "_winattn_cast", None)
    if cached is None or cached[0] != stamp:
        cached = (stamp, weight.detach().to(dtype))
        layer._winattn_cast = cached  # type: ignore[assignment]
    return cached[1]


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``gelu``; same numerics as the modules.

    Under CPU autocast the matmul runs in the autocast dtype, as ``nn.Linear`` would.
    """
    if _onednn_ready(x):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype in _ONEDNN_DTYPES and layer.weight.dtype in _ONEDNN_DTYPES:
            weight = _cast_weight(layer, dtype)
            bias = layer.bias
            if bias is not None and bias.dtype != dtype:
                bias = bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                if gelu:
                    return torch.ops.mkldnn._linear_pointwise(
                        x.to(dtype), weight, bias, "gelu", [], "none"
                    )
                return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")
    out = layer(x)
    return F.gelu(out) if gelu else out


class _NormMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` storing only ``x``, the norm statistics and the
    pre-activation ``fc1`` output: the normalised input and the GELU output (1 + 4 channel
    widths per token) are recomputed in backward, which costs two elementwise passes.

    Under CPU autocast the matmuls run in the autocast dtype and the norm in float32, as the
    modules would; gradients come back in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):  # type: ignore[override]
        width = (x.shape[-1],)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        with torch.autocast("cpu", enabled=False):
            normed, mean, rstd = torch.native_layer_norm(x, width, norm_weight, norm_bias, eps)
            pre = F.linear(normed.to(dtype), fc1_weight.to(dtype), _cast(fc1_bias, dtype))
            out = F.linear(F.gelu(pre), fc2_weight.to(dtype), _cast(fc2_bias, dtype))
        ctx.save_for_backward(x, mean, rstd, pre, norm_weight, norm_bias, fc1_weight, fc2_weight)
        ctx.eps = eps
        ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, rstd, pre, norm_weight, norm_bias, fc1_weight, fc2_weight = ctx.saved_tensors
        dtype = pre.dtype
        width = x.shape[-1]
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])  # (T, C_out)
            hidden = F.gelu(pre).reshape(-1, pre.shape[-1])  # (T, 4C) recomputed
            grad_fc2_weight = (grad_out.t() @ hidden).to(fc2_weight.dtype)
            grad_fc2_bias = grad_out.sum(0).to(fc2_weight.dtype) if ctx.has_bias[1] else None
            grad_hidden = grad_out @ fc2_weight.to(dtype)  # (T, 4C)
            del hidden
            grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre.reshape(grad_hidden.shape))
            del grad_hidden
            normed = (x.reshape(-1, width) - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)
            normed = normed * norm_weight + norm_bias if norm_weight is not None else normed
            grad_fc1_weight = (grad_pre.t() @ normed.to(dtype)).to(fc1_weight.dtype)
            grad_fc1_bias = grad_pre.sum(0).to(fc1_weight.dtype) if ctx.has_bias[0] else None
            grad_normed = (grad_pre @ fc1_weight.to(dtype)).to(x.dtype).view(x.shape)
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_normed,
                x,
                (width,),
                mean,
                rstd,
                norm_weight,
                norm_bias,
                [True, norm_weight is not None, norm_bias is not None],
            )
        return (
            grad_x,
            grad_norm_weight,
            grad_norm_bias,
            None,
            grad_fc1_weight,
            grad_fc1_bias,
            grad_fc2_weight,
            grad_fc2_bias,
        )


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))``: fused oneDNN ops without gradients, and a
    memory-lean autograd Function (:class:`_NormMlpFunction`) with them, on CPU."""
    if not torch.is_grad_enabled():
        return linear(linear(norm(x), fc1, gelu=True), fc2)
    if x.device.type != "cpu" or not isinstance(norm, nn.LayerNorm):
        return fc2(F.gelu(fc1(norm(x))))
    return _NormMlpFunction.apply(
        x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias
    )
