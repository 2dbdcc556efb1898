"""Inference-time linear layers through oneDNN, with the bias and GELU fused into the matmul.

On CPU, ``torch.ops.mkldnn._linear_pointwise`` runs the matmul, the bias add and the
activation in one pass over the output, where ``F.gelu(F.linear(...))`` writes and re-reads it.
Without gradients the weights are cast to the compute dtype once and cached (keyed by the
parameter's storage and version, so an update invalidates the copy), bfloat16 ones in oneDNN's
blocked layout. The oneDNN op has no backward: with gradients
enabled a small autograd Function wraps it (backward as autograd's); off the CPU the plain
PyTorch ops run. Eval blocks call the ops bare (:func:`inference_ready`,
:func:`inference_weights`, :func:`infer_linear`). The training Functions built on these
matmuls live in :mod:`.fused_norm` (LayerNorm and MLP) and :mod:`.fused_attention`.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backends import sdpa
from ..ops.stamps import cached_by_parameters

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _register_flops() -> None:
    """Teach PyTorch's FLOP counter the fused oneDNN linear, so FLOP counts of winattn models
    (``torch.utils.flop_counter``, ``winattn info --flops``) include their matmuls."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        tokens = 1
        for n in x_shape[:-1]:
            tokens *= n
        return 2 * tokens * x_shape[-1] * out_shape[-1]


_register_flops()


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _can_pack_weights() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_ready(x: torch.Tensor) -> bool:
    # Asked ~50 times a forward: the availability checks are cached (7 us a call uncached).
    return x.device.type == "cpu" and _onednn_available()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on ``x`` run in: autocast's on the CPU, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _matmul_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """``x @ weight.T + bias`` (then ``activation``) in one oneDNN call, all in x's dtype."""
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_float32_backward() -> bool:
    """Whether float32 backward matmuls go to oneDNN: yes where the BLAS is slow at them (on the
    AMD Zen 4 measured it ran float32 at 204 GFLOP/s against oneDNN's 449), no on Intel CPUs
    with AMX, where the BLAS is as fast and takes transposed operands without the copies oneDNN
    needs (a float32 Swin-T step measured 1.1x faster there on the BLAS)."""
    return not sdpa.cpu_has_amx()


def _grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` for a linear layer's backward, ``(T, out) -> (T, in)``: ``mm`` on the
    untransposed weight (bfloat16: measured 13% faster on Swin-T's shapes), or in float32 where
    :func:`_onednn_float32_backward`, a oneDNN "linear" against a transposed copy of it."""
    return _grad_input_by(grad, _grad_input_operand(weight))


def _grad_input_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as :func:`_grad_input` multiplies by it (prepared once for several calls)."""
    if weight.dtype == torch.float32 and _onednn_float32_backward():
        return weight.t().contiguous()
    return weight


def _grad_input_by(grad: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    if grad.dtype == torch.float32 and _onednn_float32_backward():
        return _matmul_forward(grad, operand, None)
    return torch.mm(grad, operand)


#: Most rows (tokens) for which a float32 weight gradient goes to oneDNN: there the BLAS mm is
#: slower on Swin's shapes; with longer reductions (stage 1 at batch 8: 25088 rows) it is not.
_ONEDNN_GRAD_WEIGHT_MAX_ROWS = 2048


def _grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x`` for a linear layer's weight gradient, ``(T, out), (T, in) -> (out, in)``.

    float32 with at most :data:`_ONEDNN_GRAD_WEIGHT_MAX_ROWS` rows where
    :func:`_onednn_float32_backward`: a oneDNN "linear" on the transposed views (which it
    copies); otherwise the BLAS ``mm``.
    """
    if (
        grad.dtype == torch.float32
        and grad.shape[0] <= _ONEDNN_GRAD_WEIGHT_MAX_ROWS
        and _onednn_float32_backward()
    ):
        return _matmul_forward(grad.t(), x.t(), None)
    return grad.t() @ x


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` whose forward matmul runs through oneDNN (faster than the BLAS ``addmm``
    on the CPUs measured); backward is autograd's (two ``mm`` and a sum). Inputs arrive
    already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad_2d, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _grad_weight(grad_2d, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


#: Inference copies of linear parameters, per layer and dtype (:func:`cached_by_parameters`
#: entries). Kept outside the modules so that deep-copying or pickling a model never meets an
#: opaque oneDNN tensor.
_INFERENCE_WEIGHTS: weakref.WeakKeyDictionary[nn.Linear, dict] = weakref.WeakKeyDictionary()


def _inference_params(
    layer: nn.Linear, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias for a no-grad oneDNN call in ``dtype``, cached until either
    parameter changes (:func:`cached_by_parameters`). bfloat16 weights are also reordered once
    into oneDNN's blocked layout, which the matmul otherwise redoes on every call (a bf16 Swin-T
    forward measured 2-20% faster across runs; float32 was not faster, so it keeps plain
    weights); the bias cast is kept too rather than redone per call."""
    weight, bias = _weight_matrix(layer), layer.bias
    pack = dtype == torch.bfloat16 and _can_pack_weights()
    if weight.dtype == dtype and not pack and (bias is None or bias.dtype == dtype):
        return weight, bias

    def prepare() -> tuple[torch.Tensor, torch.Tensor | None]:
        prepared = weight.detach().to(dtype)
        if pack:
            prepared = torch.ops.mkldnn._reorder_linear_weight(prepared)
        return prepared, _cast(bias, dtype)

    # The parameters, not the flattened view of a convolution's kernel.
    params = [layer.weight, bias]
    return cached_by_parameters(_entries_of(_INFERENCE_WEIGHTS, layer), dtype, params, prepare)


def _weight_matrix(layer: nn.Module) -> torch.Tensor:
    """``layer``'s weight as ``(out, in)``: a convolution's kernel flattened to
    ``(out, in * kh * kw)`` (a view, which shares the parameter's version counter)."""
    weight = layer.weight
    return weight if weight.dim() == 2 else weight.flatten(1)


def linear(
    x: torch.Tensor,
    layer: nn.Linear | nn.Conv2d,
    gelu: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``gelu``; same numerics as the modules.
    ``bias``, when given, replaces the layer's own (Swin V2 builds its qkv bias per call).
    ``layer`` may be a convolution whose stride equals its kernel, applied to ``x`` holding
    its patches ``(..., in * kh * kw)`` in the kernel's (channel, row, column) order.

    Under CPU autocast the matmul runs in the autocast dtype, as ``nn.Linear`` would.
    """
    dtype = compute_dtype(x)
    if _onednn_ready(x) and dtype in _ONEDNN_DTYPES and layer.weight.dtype in _ONEDNN_DTYPES:
        if not torch.is_grad_enabled():
            # Autocast has no rule for the oneDNN op, so it need not be switched off here
            # (entering and leaving that context was ~0.5 ms of a 20 ms bf16 forward).
            weight, own_bias = _inference_params(layer, dtype)
            bias = own_bias if bias is None else bias.to(dtype)
            return _matmul_forward(x.to(dtype), weight, bias, "gelu" if gelu else "none")
        bias = layer.bias if bias is None else bias
        weight = _weight_matrix(layer).to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = _LinearFunction.apply(x.to(dtype), weight, _cast(bias, dtype))
            return F.gelu(out) if gelu else out
    if bias is None and isinstance(layer, nn.Linear):
        out = layer(x)
    else:
        out = F.linear(x, _weight_matrix(layer), layer.bias if bias is None else bias)
    return F.gelu(out) if gelu else out


def linear_add(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)`` without gradients: on the CPU one oneDNN call whose "add"
    post-op reads ``residual`` (shaped as the output, in the compute dtype) while the result
    is written, instead of a second pass over both (bf16 Swin-T at batch 1: 20-70 us a call,
    24 calls a forward). The sum is rounded once, where the separate add rounds twice."""
    dtype = compute_dtype(x)
    usable = (
        not torch.is_grad_enabled()
        and _onednn_ready(x)
        and dtype in _ONEDNN_DTYPES
        and layer.weight.dtype in _ONEDNN_DTYPES
        and residual.dtype == dtype
        and residual.is_contiguous()
    )
    if not usable:
        return residual + linear(x, layer)
    weight, bias = _inference_params(layer, dtype)
    other = residual.view(*x.shape[:-1], layer.weight.shape[0])
    out = torch.ops.mkldnn._linear_pointwise.binary(x.to(dtype), other, weight, bias, "add")
    return out.view(residual.shape)


def inference_ready(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether :func:`infer_linear` and :func:`infer_linear_add` serve a no-grad pass over
    ``x`` through ``layer`` and layers like it: oneDNN on the CPU, ``x`` contiguous and
    already in the compute dtype (as a block's residual stream is, in float32 and under bf16
    autocast), the weight in a oneDNN dtype. Asked once per block, not per call."""
    return (
        _onednn_ready(x)
        and x.dtype in _ONEDNN_DTYPES
        and x.dtype == compute_dtype(x)
        and layer.weight.dtype in _ONEDNN_DTYPES
        and x.is_contiguous()
    )


#: Per module and dtype, the prepared weights of a group of its linears (a block's four), as
#: :func:`cached_by_parameters` entries: the same tensors as :data:`_INFERENCE_WEIGHTS` holds.
_INFERENCE_SETS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _entries_of(cache: weakref.WeakKeyDictionary, owner: nn.Module) -> dict:
    """``owner``'s dict of entries in ``cache``, made on first use."""
    entries = cache.get(owner)
    if entries is None:
        entries = cache[owner] = {}
    return entries


def inference_weights(
    owner: nn.Module, layers: tuple[nn.Linear, ...], dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """:func:`_inference_params` of each of ``layers`` (``owner``'s), checked against one
    stamp of all their parameters per call instead of one lookup per layer (in a Swin-T bf16
    forward at batch 1, the four lookups of a block measured 2-3% of the time)."""
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    return cached_by_parameters(
        _entries_of(_INFERENCE_SETS, owner), dtype, params,
        lambda: tuple(_inference_params(layer, dtype) for layer in layers),
    )


def infer_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False
) -> torch.Tensor:
    """``x @ weight.T + bias`` (then exact GELU) in one oneDNN call, nothing else, for
    :func:`inference_weights`' tensors where :func:`inference_ready` holds (each Python step
    between two oneDNN calls measured dearer inside a forward than on its own:
    docs/fast-path.md, item 12)."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def infer_linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + x @ weight.T + bias`` as :func:`infer_linear`, the add a oneDNN post-op
    (as in :func:`linear_add`); ``residual`` has the output's shape."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
