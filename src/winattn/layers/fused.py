"""Inference-time linear layers through oneDNN, with the bias and GELU fused into the matmul.

On CPU, ``torch.ops.mkldnn._linear_pointwise`` runs the matmul, the bias add and the
activation in one pass over the output, where ``F.gelu(F.linear(...))`` writes and re-reads it.
Without gradients the weights are cast to the compute dtype once and cached (keyed by the
parameter's storage and version, so an update invalidates the copy), bfloat16 ones in oneDNN's
blocked layout. The oneDNN op has no backward: with gradients
enabled a small autograd Function wraps it (backward as autograd's); off the CPU the plain
PyTorch ops run.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backends import sdpa

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


#: Inference copies of linear parameters, per layer and dtype: ``(stamp, weight, bias)``. Kept
#: outside the modules so that deep-copying or pickling a model never meets an opaque oneDNN
#: tensor.
_INFERENCE_WEIGHTS: weakref.WeakKeyDictionary[nn.Linear, dict] = weakref.WeakKeyDictionary()


def _inference_params(
    layer: nn.Linear, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias for a no-grad oneDNN call in ``dtype``, cached until either
    parameter changes (its storage or version). bfloat16 weights are also reordered once into
    oneDNN's blocked layout, which the matmul otherwise redoes on every call (a bf16 Swin-T
    forward measured 2-20% faster across runs; float32 was not faster, so it keeps plain
    weights); the bias cast is kept too rather than redone per call."""
    weight, bias = _weight_matrix(layer), layer.bias
    pack = dtype == torch.bfloat16 and _can_pack_weights()
    if weight.dtype == dtype and not pack and (bias is None or bias.dtype == dtype):
        return weight, bias
    stamp = (weight.data_ptr(), weight._version) + (
        () if bias is None else (bias.data_ptr(), bias._version)
    )
    per_dtype = _INFERENCE_WEIGHTS.get(layer)
    if per_dtype is None:
        per_dtype = _INFERENCE_WEIGHTS[layer] = {}
    cached = per_dtype.get(dtype)
    if cached is None or cached[0] != stamp:
        prepared = weight.detach().to(dtype)
        if pack:
            prepared = torch.ops.mkldnn._reorder_linear_weight(prepared)
        cached = per_dtype[dtype] = (stamp, prepared, _cast(bias, dtype))
    return cached[1], cached[2]


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


#: Per module and dtype, the prepared weights of a group of its linears (a block's four):
#: ``(params, stamp, ((weight, bias), ...))``, the same tensors as :data:`_INFERENCE_WEIGHTS`
#: holds.
_INFERENCE_SETS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def parameter_stamp(params: list[torch.Tensor | None]) -> tuple:
    """Storage and version of each of ``params``: changes when one is updated in place or its
    data replaced. A cache keyed on it also holds ``params`` themselves and checks their
    identity (:func:`same_parameters`), so that a replaced parameter cannot pass for the old
    one by reusing its freed address."""
    return tuple([None if p is None else (p.data_ptr(), p._version) for p in params])


def same_parameters(held: list[torch.Tensor | None], params: list[torch.Tensor | None]) -> bool:
    """Whether ``held`` and ``params`` are the same objects, one for one."""
    return all(a is b for a, b in zip(held, params))


def inference_weights(
    owner: nn.Module, layers: tuple[nn.Linear, ...], dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """:func:`_inference_params` of each of ``layers`` (``owner``'s), checked against one
    stamp of all their parameters per call instead of one lookup per layer (in a Swin-T bf16
    forward at batch 1, the four lookups of a block measured 2-3% of the time)."""
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    stamp = parameter_stamp(params)
    per_dtype = _INFERENCE_SETS.get(owner)
    if per_dtype is None:
        per_dtype = _INFERENCE_SETS[owner] = {}
    cached = per_dtype.get(dtype)
    if cached is None or cached[1] != stamp or not same_parameters(cached[0], params):
        prepared = tuple(_inference_params(layer, dtype) for layer in layers)
        cached = per_dtype[dtype] = (params, stamp, prepared)
    return cached[2]


def infer_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False
) -> torch.Tensor:
    """``x @ weight.T + bias`` (then exact GELU) in one oneDNN call, nothing else, for
    :func:`inference_weights`' tensors where :func:`inference_ready` holds (each Python step
    between two oneDNN calls measured dearer inside a forward than on its own:
    docs/performance.md, item 12)."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def infer_linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + x @ weight.T + bias`` as :func:`infer_linear`, the add a oneDNN post-op
    (as in :func:`linear_add`); ``residual`` has the output's shape."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


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
        _onednn_ready(x)
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


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


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
    if not (_onednn_ready(x) and compute_dtype(x) in _ONEDNN_DTYPES):
        return fc2(F.gelu(fc1(x)))
    return _NormMlpFunction.apply(
        x, None, None, None, fc1.weight, fc1.bias, fc2.weight, fc2.bias, recompute_hidden
    )
