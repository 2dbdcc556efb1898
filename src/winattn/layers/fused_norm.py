"""Memory-lean training Functions around a block's linears on the CPU, built on
:mod:`.fused`'s oneDNN matmuls: LayerNorm fused into the linear after it (``norm1 -> qkv``,
:func:`norm_linear`), and the MLP with its pre-norm (:func:`norm_mlp`, V1) or without one
(:func:`mlp`, V2), each keeping the block input and few statistics instead of the normalised
input and the hidden layer's activations, which backward recomputes. Without gradients, or off
the CPU, they run the modules (through :func:`.fused.linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .fused import (
    _ONEDNN_DTYPES,
    _cast,
    _grad_input,
    _grad_input_by,
    _grad_input_operand,
    _grad_weight,
    _matmul_forward,
    compute_dtype,
    linear,
)

#: Tokens per chunk of :class:`_NormMlpFunction` when it recomputes the hidden layer: each
#: chunk's ``(chunk, 4C)`` intermediates stay in cache and are small enough for the allocator
#: to reuse (a fresh 37 MiB buffer, Swin-T stage 1 at batch 8 in float32, is above glibc's
#: mmap threshold and pays its page faults every time). Best of 2048, 4096 and 8192 measured.
RECOMPUTE_CHUNK_TOKENS = 4096


class _NormMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` storing only ``x``, the norm statistics and the
    pre-activation ``fc1`` output: the normalised input and the GELU output (1 + 4 channel
    widths per token) are recomputed in backward, which costs two passes.

    With ``recompute`` the pre-activation (4 widths per token) is not kept either: both passes
    run a chunk of :data:`RECOMPUTE_CHUNK_TOKENS` tokens at a time through the whole MLP, and
    backward runs ``fc1`` again on its chunk of the normalised input, accumulating the weight
    gradients over chunks in float32. (Swin-T stage 1, batch 8, float32: forward and backward
    0.65x the time of keeping the hidden layer; bf16 about level.)

    Under CPU autocast the matmuls run in the autocast dtype and the norm in float32, as the
    modules would; gradients come back in the parameters' dtypes.

    ``eps=None`` means no norm (Swin V2's MLP, whose norm comes after it): ``fc2(gelu(fc1(x)))``
    keeping ``x`` and the pre-activation only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, recompute
    ):
        width = (x.shape[-1],)
        dtype = compute_dtype(x)
        fc1 = (fc1_weight.to(dtype), _cast(fc1_bias, dtype))
        fc2 = (fc2_weight.to(dtype), _cast(fc2_bias, dtype))
        with torch.autocast("cpu", enabled=False):
            if eps is None:
                normed, mean, rstd = x.to(dtype), None, None
            else:
                normed, mean, rstd = torch.native_layer_norm(
                    x, width, norm_weight, norm_bias, eps
                )
                normed = normed.to(dtype)
            if recompute:
                pre = None
                out = _chunked_mlp_forward(normed.reshape(-1, width[0]), fc1, fc2)
                out = out.view(*x.shape[:-1], -1)
            else:
                pre = _matmul_forward(normed, *fc1)
                del normed
                out = _matmul_forward(F.gelu(pre), *fc2)
        ctx.save_for_backward(
            x, mean, rstd, pre, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight
        )
        ctx.eps = eps
        ctx.dtype = dtype
        ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, rstd, pre, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight = (
            ctx.saved_tensors
        )
        dtype = ctx.dtype
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])  # (T, C_out)
            if pre is None:
                normed = _mlp_input(x, norm_weight, norm_bias, ctx.eps, dtype)
                grads = _chunked_mlp_backward(
                    grad_out, normed, fc1_weight, _cast(fc1_bias, dtype), fc2_weight, x.dtype
                )
                grad_normed, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight = grads
            else:
                hidden = F.gelu(pre).reshape(-1, pre.shape[-1])  # (T, 4C) recomputed
                grad_fc2_weight = _grad_weight(grad_out, hidden)
                grad_hidden = _grad_input(grad_out, fc2_weight.to(dtype))
                del hidden
                # In place: a fresh (T, 4C) buffer costs its page faults again.
                grad_pre = torch.ops.aten.gelu_backward.grad_input(
                    grad_hidden, pre.reshape(grad_hidden.shape), grad_input=grad_hidden
                )
                del grad_hidden, pre
                normed = _mlp_input(x, norm_weight, norm_bias, ctx.eps, dtype)
                grad_fc1_weight = _grad_weight(grad_pre, normed)
                del normed
                grad_fc1_bias = grad_pre.sum(0) if ctx.has_bias[0] else None
                grad_normed = _grad_input(grad_pre, fc1_weight.to(dtype)).to(x.dtype)
            if ctx.eps is None:
                grad_x, grad_norm_weight, grad_norm_bias = grad_normed.view(x.shape), None, None
            else:
                grad_x, grad_norm_weight, grad_norm_bias = _layer_norm_backward(
                    grad_normed.view(x.shape), x, mean, rstd, norm_weight, norm_bias
                )
            grad_fc2_bias = grad_out.sum(0).to(fc2_weight.dtype) if ctx.has_bias[1] else None
        return (
            grad_x,
            grad_norm_weight,
            grad_norm_bias,
            None,
            grad_fc1_weight.to(fc1_weight.dtype),
            _cast(grad_fc1_bias, fc1_weight.dtype) if ctx.has_bias[0] else None,
            grad_fc2_weight.to(fc2_weight.dtype),
            grad_fc2_bias,
            None,
        )


def _chunked_mlp_forward(
    normed: torch.Tensor,
    fc1: tuple[torch.Tensor, torch.Tensor | None],
    fc2: tuple[torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """``fc2(gelu(fc1(normed)))`` for ``normed`` ``(T, C)``, a chunk of tokens at a time."""
    tokens = normed.shape[0]
    out = normed.new_empty(tokens, fc2[0].shape[0])
    for start in range(0, tokens, RECOMPUTE_CHUNK_TOKENS):
        rows = slice(start, start + RECOMPUTE_CHUNK_TOKENS)
        out[rows] = _matmul_forward(F.gelu(_matmul_forward(normed[rows], *fc1)), *fc2)
    return out


def _chunked_mlp_backward(
    grad_out: torch.Tensor,
    normed: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``normed`` (in ``grad_dtype``), fc1's weight and bias (None without one)
    and fc2's weight (float32 sums over chunks), recomputing fc1 and the GELU chunk by chunk as
    :func:`_chunked_mlp_forward` computed them."""
    dtype = normed.dtype
    tokens = normed.shape[0]
    w1 = fc1_weight.to(dtype)
    w1_by, w2_by = _grad_input_operand(w1), _grad_input_operand(fc2_weight.to(dtype))
    grad_w1 = torch.zeros(w1.shape, dtype=torch.float32)
    grad_b1 = torch.zeros(w1.shape[0], dtype=torch.float32) if fc1_bias is not None else None
    grad_w2 = torch.zeros(fc2_weight.shape, dtype=torch.float32)
    grad_normed = torch.empty(tokens, w1.shape[1], dtype=grad_dtype)
    for start in range(0, tokens, RECOMPUTE_CHUNK_TOKENS):
        rows = slice(start, start + RECOMPUTE_CHUNK_TOKENS)
        grad, inputs = grad_out[rows], normed[rows]
        pre = _matmul_forward(inputs, w1, fc1_bias)
        grad_w2 += _grad_weight(grad, F.gelu(pre))
        grad_pre = _grad_input_by(grad, w2_by)
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre, grad_input=grad_pre)
        del pre
        grad_w1 += _grad_weight(grad_pre, inputs)
        if grad_b1 is not None:
            grad_b1 += grad_pre.sum(0)
        grad_normed[rows] = _grad_input_by(grad_pre, w1_by)
    return grad_normed, grad_w1, grad_b1, grad_w2


def _mlp_input(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The MLP's input ``(T, C)`` in ``dtype``, recomputed in backward: ``x`` normalised again,
    or ``x`` itself without a norm (``eps`` None)."""
    if eps is None:
        return x.reshape(-1, x.shape[-1]).to(dtype)
    return _renormalise(x, norm_weight, norm_bias, eps).to(dtype)


def _renormalise(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm's output recomputed in backward, ``(T, C)``: the forward's kernel again (one
    pass, the same values), not an elementwise expression on the saved statistics."""
    width = x.shape[-1]
    return torch.native_layer_norm(x, (width,), weight, bias, eps)[0].reshape(-1, width)


def _layer_norm_backward(
    grad_normed: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x, weight and bias of a LayerNorm over the last axis, from its statistics."""
    return torch.ops.aten.native_layer_norm_backward(
        grad_normed,
        x,
        (x.shape[-1],),
        mean,
        rstd,
        weight,
        bias,
        [True, weight is not None, bias is not None],
    )


def _fusable_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether a fused norm Function can serve ``norm(x)`` with gradients: oneDNN on the CPU
    in a dtype it computes in, and an affine LayerNorm."""
    return (
        fused._onednn_ready(x)
        and compute_dtype(x) in _ONEDNN_DTYPES
        and isinstance(norm, nn.LayerNorm)
        and norm.weight is not None
    )


class _NormLinearFunction(torch.autograd.Function):
    """``linear(layer_norm(x))`` with rows of ``padding`` zeroed between the two, storing
    ``x`` and the norm statistics but not the normalised input (one channel width per token):
    backward recomputes it with LayerNorm's kernel (one pass). Precision as
    :class:`_NormMlpFunction`.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias, padding):  # type: ignore[override]
        width = (x.shape[-1],)
        dtype = compute_dtype(x)
        with torch.autocast("cpu", enabled=False):
            normed, mean, rstd = torch.native_layer_norm(x, width, norm_weight, norm_bias, eps)
            if padding is not None:
                normed = normed.masked_fill(padding, 0.0)
            out = _matmul_forward(normed.to(dtype), weight.to(dtype), _cast(bias, dtype))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, padding)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, rstd, norm_weight, norm_bias, weight, padding = ctx.saved_tensors
        dtype = ctx.dtype
        width = x.shape[-1]
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])  # (T, out)
            normed = _renormalise(x, norm_weight, norm_bias, ctx.eps)
            if padding is not None:
                normed = normed.view(x.shape).masked_fill(padding, 0.0).view(-1, width)
            grad_weight = _grad_weight(grad_out, normed.to(dtype)).to(weight.dtype)
            del normed
            grad_bias = grad_out.sum(0).to(weight.dtype) if ctx.has_bias else None
            grad_normed = _grad_input(grad_out, weight.to(dtype)).to(x.dtype).view(x.shape)
            if padding is not None:
                grad_normed = grad_normed.masked_fill(padding, 0.0)
            grad_x, grad_norm_weight, grad_norm_bias = _layer_norm_backward(
                grad_normed, x, mean, rstd, norm_weight, norm_bias
            )
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias, None


def norm_linear(
    x: torch.Tensor, norm: nn.Module, layer: nn.Linear, padding: torch.Tensor | None = None
) -> torch.Tensor:
    """``layer(norm(x).masked_fill(padding, 0))``: with gradients on the CPU, a Function that
    does not keep the normalised input (:class:`_NormLinearFunction`); otherwise the modules
    and :func:`linear`. ``padding`` broadcasts against ``x`` (True: zero that token)."""
    if not (torch.is_grad_enabled() and _fusable_norm(x, norm)):
        normed = norm(x)
        if padding is not None:
            normed = normed.masked_fill(padding, 0.0)
        return linear(normed, layer)
    return _NormLinearFunction.apply(
        x, norm.weight, norm.bias, norm.eps, layer.weight, layer.bias, padding
    )


def norm_mlp(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    recompute_hidden: bool = False,
) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))``: fused oneDNN ops without gradients, and a
    memory-lean autograd Function (:class:`_NormMlpFunction`) with them, on CPU.
    ``recompute_hidden`` trades one more ``fc1`` matmul in backward for not keeping its
    output (four channel widths per token), both passes running in chunks of tokens."""
    if not torch.is_grad_enabled():
        return linear(linear(norm(x), fc1, gelu=True), fc2)
    if not _fusable_norm(x, norm):
        return fc2(F.gelu(fc1(norm(x))))
    return _NormMlpFunction.apply(
        x,
        norm.weight,
        norm.bias,
        norm.eps,
        fc1.weight,
        fc1.bias,
        fc2.weight,
        fc2.bias,
        recompute_hidden,
    )


def mlp(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, recompute_hidden: bool = False
) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))``: :func:`norm_mlp` without the norm (Swin V2 normalises after the
    MLP). With gradients on the CPU the Function keeps ``x`` and ``fc1``'s pre-activation,
    not the GELU's output as the modules do (4 channel widths per token less); with
    ``recompute_hidden`` not the pre-activation either."""
    if not torch.is_grad_enabled():
        return linear(linear(x, fc1, gelu=True), fc2)
    if not (fused._onednn_ready(x) and compute_dtype(x) in _ONEDNN_DTYPES):
        return fc2(F.gelu(fc1(x)))
    return _NormMlpFunction.apply(
        x, None, None, None, fc1.weight, fc1.bias, fc2.weight, fc2.bias, recompute_hidden
    )
