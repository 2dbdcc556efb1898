"""The fast path on any device: windows gathered with one cached index map, attention by
PyTorch's fused SDPA kernel, and in training a custom autograd Function that recomputes the
attention matrix in backward instead of storing it.

Two entry points share the kernel choice: :class:`SdpaBackend` serves the grid-layout operator
(gather q, k, v into windows, attend, scatter back), and :func:`attend_qkv` serves callers that
already hold their tokens in window order (the Swin stages), straight from the fused qkv
projection without copying q, k and v apart.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..stamps import cached_per_tensor, parameter_stamp, same_parameters
from . import cpu_kernel


def _register_flops() -> None:
    """Teach PyTorch's FLOP counter SDPA's fused CPU kernel (it knows only the GPU ones)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        *batch, queries, head_dim = q_shape
        rows = 1
        for n in batch:
            rows *= n
        return 2 * rows * queries * k_shape[-2] * (head_dim + v_shape[-1])


_register_flops()


def window_mask(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of every window and head: bias + shift regions + padded keys.

    Returns ``(num_windows, heads, N, N)``, ``(1, heads, N, N)`` or None.
    """
    return combine_mask(call.plan.mask_as(dtype), call.bias, dtype)


def combine_mask(
    plan_mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``plan_mask`` ``(nW, N, N)`` + ``bias`` ``(heads, N, N)`` -> ``(nW or 1, heads, N, N)``,
    contiguous: a bias gathered from a table is a permuted view, and SDPA's CPU kernel copies a
    strided mask on every call (0.5 ms of a 24 ms Swin-T bf16 forward at batch 1)."""
    if bias is not None:
        bias = bias.to(dtype).contiguous()
    if plan_mask is None:
        return None if bias is None else bias.unsqueeze(0)
    plan_mask = plan_mask.to(dtype)
    if bias is None:
        return plan_mask.unsqueeze(1)
    return plan_mask.unsqueeze(1) + bias.unsqueeze(0)


def expand_to_batch(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``(nW, heads, N, M)`` -> ``(rows, heads, N, M)`` contiguous, ``rows = batch * nW``, since
    SDPA's fused CPU kernel broadcasts size-1 dims only. A mask with 1 or ``rows`` leading
    entries is returned as it is."""
    num_windows, heads, tokens, keys = mask.shape
    if num_windows in (1, rows):
        return mask
    expanded = mask.unsqueeze(0).expand(rows // num_windows, num_windows, heads, tokens, keys)
    return expanded.reshape(rows, heads, tokens, keys)


class ExpandedMaskCache:
    """Folded masks (bias + shift mask) expanded to the batch for SDPA, kept between calls
    that need no gradient: one per (plan, dtype), for the batch size last used (the expanded
    mask grows with the batch: 14.7 MB for Swin-T's first stage at batch 8, 96 MiB for
    SwinV2's window 16), and all dropped when the parameters they were built from change
    (:mod:`winattn.ops.stamps`: updated in place, or replaced).

    Entries are built outside inference mode even when asked from inside it, so that a
    cached mask can serve later calls made with autograd on (an inference tensor could not be
    saved for backward).
    """

    def __init__(self) -> None:
        # (plan, dtype) -> ((parameter stamp, rows), mask, the parameters themselves)
        self._entries: dict[tuple, tuple[tuple, torch.Tensor | None, list]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        plan: object,
        dtype: torch.dtype,
        rows: int,
        params: list[torch.Tensor],
        build: Callable[[], torch.Tensor | None],
    ) -> torch.Tensor | None:
        """The mask ``build()`` returns, ``(nW or 1, heads, N, M)``, expanded to ``rows``
        windows (:func:`expand_to_batch`) and cast to ``dtype``; ``params`` are the
        parameters it is built from."""
        key = (plan, dtype)
        stamp = parameter_stamp(params)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == (stamp, rows) and same_parameters(hit[2], params):
            return hit[1]
        if any(
            held[0][0] != stamp or not same_parameters(held[2], params)
            for held in self._entries.values()
        ):
            self._entries.clear()  # the parameters changed: every entry is stale
        with torch.inference_mode(False), torch.no_grad():
            mask = build()
            mask = None if mask is None else expand_to_batch(mask, rows).to(dtype)
        self._entries[key] = ((stamp, rows), mask, list(params))
        return mask


class CallMaskCache:
    """The grid-layout operator's folded masks (bias + shift mask), kept between calls made
    without gradients on the CPU, so a call with the bias of the last one does not fold and
    expand it again (Swin-T's stage 1 at batch 8: 0.3 ms to fold, 0.6 ms to expand to the
    batch, of a 12 ms bf16 call).

    An entry is served only while the call's bias equals, element for element, the copy kept
    when it was built (``torch.equal``: a few microseconds for a ``(heads, N, N)`` bias), so an
    update of the bias in place, through ``.data`` or by a new tensor is never missed. Plans
    are compared by identity, as :func:`~winattn.ops.geometry.plan_windows` caches them.
    Entries are dropped least recently used first to keep their masks under ``max_bytes``; a
    mask larger than that is built for its call and not kept.
    """

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self.max_bytes = max_bytes
        # (plan, dtype, rows, bias shape/dtype) -> (bias copy or None, mask or None)
        self._entries: OrderedDict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]]
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, call: AttentionCall, dtype: torch.dtype, rows: int | None) -> torch.Tensor | None:
        """:func:`window_mask` of ``call`` in ``dtype``, expanded to ``rows`` windows
        (:func:`expand_to_batch`), or compact when ``rows`` is None."""
        bias = call.bias
        if call.q.device.type != "cpu" or call.needs_grad:
            return self._build(call, dtype, rows)
        bias_key = None if bias is None else (bias.shape, bias.dtype)
        key = (call.plan, dtype, rows, bias_key)
        hit = self._entries.get(key)
        if hit is not None and (bias is None or torch.equal(hit[0], bias)):
            self._entries.move_to_end(key)
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            mask = self._build(call, dtype, rows)
            kept = None if bias is None else bias.detach().clone()
        size = 0 if mask is None else mask.nbytes
        if size > self.max_bytes:
            return mask
        self._entries[key] = (kept, mask)
        self._entries.move_to_end(key)
        while sum(0 if m is None else m.nbytes for _, m in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)
        return mask

    @staticmethod
    def _build(call: AttentionCall, dtype: torch.dtype, rows: int | None) -> torch.Tensor | None:
        mask = window_mask(call, dtype)
        return mask if mask is None or rows is None else expand_to_batch(mask, rows)


def _fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA on ``(B*nW, heads, N, d)`` views; returns ``(B*nW, N, heads, d)`` contiguous.

    The CPU kernel writes its output token-major, so the transpose back is free there.
    """
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()  # (B*nW, N, heads, d)


# exp(x) of a float32 x at or below this is subnormal (under 2**-126) or zero.
_LOG_FLOAT32_TINY = math.log(torch.finfo(torch.float32).tiny)
# Mask slots whose entries reach this far below zero can make subnormal exponentials: Swin's
# -100 between shift regions (a logit 100 below its row's maximum has exp() = 3.7e-44).
_DEEP_MASK_VALUE = -50.0
_deep_slot_cache: dict = {}  # for cached_per_tensor


def _deep_mask_slots(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the slots of ``mask`` ``(m, heads, N, M)`` (windows, or windows x heads
    where ``heads > 1``) with entries below ``_DEEP_MASK_VALUE``, or None when no slot has.
    Cached per mask tensor and version, as the models' eval masks are."""

    def build() -> torch.Tensor | None:
        slot_entries = mask.detach().flatten(0, 1) if mask.shape[1] > 1 else mask.detach()
        slots = (slot_entries.flatten(1).amin(dim=1) < _DEEP_MASK_VALUE).nonzero().flatten()
        return slots if slots.numel() else None

    return cached_per_tensor(_deep_slot_cache, mask, build)


def _flush_subnormal_exponentials(logits: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, each float32 logit whose exponential relative to its row's
    maximum would be subnormal: ``(..., M)``. The softmax of the result is bit for bit the
    softmax of the input computed with subnormals flushed to zero.

    Why: an exponential that lands in float32's subnormal range takes a microcode assist on
    x86 CPUs, and Swin's -100 puts about half the logits of the windows that straddle a shift
    boundary there. In PyTorch's softmax kernel that made those windows' softmax 4-7x slower
    than the others'. Such a probability is below 1.2e-38 times the row's largest, so the
    attention output does not change in any digit float32 holds.
    """
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    return F.threshold_(logits, _LOG_FLOAT32_TINY, float("-inf"))


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + mask)`` with the matmul in q's dtype and the scale, mask and
    softmax in at least float32: ``(rows, heads, N, M)``. ``mask`` ``(m, heads, N, M)`` with
    ``m`` dividing the rows (windows innermost), or None.

    In float32, probabilities below 2**-126 of their row's largest come out as zero rather than
    subnormal (see :func:`_flush_subnormal_exponentials`), in the mask slots deep enough to
    make them."""
    work = torch.promote_types(q.dtype, torch.float32)
    logits = torch.matmul(q, k.transpose(-1, -2))  # (rows, heads, N, M)
    if mask is None:
        logits = logits.to(work).mul_(scale)
    else:
        windows = mask.shape[0]
        by_window = logits.view(-1, windows, *logits.shape[1:])
        if logits.dtype == work:
            # One pass, mask + scale * logits (measured 0.42 against 0.70 ms for scale, then
            # mask, at Swin-T's stage 1); with a bf16 input the mixed add is 6x slower.
            torch.add(mask.to(work), by_window, alpha=scale, out=by_window)
        else:
            logits = logits.to(work).mul_(scale)
            logits.view(by_window.shape).add_(mask.to(work))
        slots = _deep_mask_slots(mask) if work == torch.float32 else None
        if slots is not None:
            _flush_in_slots(logits, mask.shape, slots)
    return torch.softmax(logits, dim=-1)


def _flush_in_slots(logits: torch.Tensor, mask_shape: torch.Size, slots: torch.Tensor) -> None:
    """:func:`_flush_subnormal_exponentials` on the mask slots listed (the whole tensor when
    they are most of it): ``logits`` ``(rows, heads, N, M)``, ``mask_shape`` ``(m, heads or 1,
    N, M)``, ``slots`` from :func:`_deep_mask_slots`."""
    windows, mask_heads = mask_shape[0], mask_shape[1]
    if mask_heads > 1:
        by_slot = logits.view(-1, windows * mask_heads, *logits.shape[2:])  # (B, m*heads, N, M)
    else:
        by_slot = logits.view(-1, windows, *logits.shape[1:])  # (B, m, heads, N, M)
    if 2 * slots.numel() > by_slot.shape[1]:
        _flush_subnormal_exponentials(logits)
        return
    deep = _flush_subnormal_exponentials(by_slot.index_select(1, slots))
    by_slot.index_copy_(1, slots, deep)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention as two batched matmuls around a softmax, for bfloat16 on the CPU, where SDPA's
    fused kernel is slower at Swin's window sizes.

    The matmuls run in q's dtype; the scale, the mask and the softmax in float32 (as autocast
    runs timm's: its bf16 logits meet a float32 bias), the same probabilities the backward of
    :class:`_WindowAttentionFunction` recomputes. ``mask`` as for :func:`_probabilities`.
    Returns ``(rows, N, heads, d)`` contiguous, like :func:`_fused_attention`.
    """
    probs = _probabilities(q.contiguous(), k.contiguous(), mask, scale).to(q.dtype)
    return torch.matmul(probs, v.contiguous()).transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon from Sapphire Rapids on), on which PyTorch's
    bfloat16 matmuls and SDPA's bfloat16 kernel run; ``WINATTN_CPU_AMX=0`` or ``1`` overrides
    the probe (to reproduce the other CPU's choices)."""
    forced = os.environ.get("WINATTN_CPU_AMX")
    if forced in ("0", "1"):
        return forced == "1"
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def prefers_matmuls(q: torch.Tensor) -> bool:
    """Whether :func:`explicit_attention` beats SDPA for q: bfloat16 on a CPU without AMX
    (measured in docs/fast-path.md, items 6 and 9: there SDPA's bf16 kernel is slower than its
    float32 one; with AMX it is the faster, and float32 stays with SDPA everywhere)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and not cpu_has_amx()


def attend_without_grad(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The forward of the training Functions: ``(B*nW, N, heads, d)`` contiguous, computed
    without recording (matmul attention for bf16 on the CPU, SDPA's fused kernel otherwise)."""
    with torch.no_grad():
        if prefers_matmuls(q) and (mask is None or q.shape[0] % mask.shape[0] == 0):
            return explicit_attention(q, k, v, mask, scale)
        detached = None if mask is None else mask.detach()
        # A training mask is rebuilt every step: converted for the kernel, not kept.
        out = cpu_kernel.attend(q.detach(), k.detach(), v.detach(), detached, scale, keep=False)
        if out is not None:
            return out
        expanded = None
        if mask is not None:
            # Detached, so SDPA takes its fused kernel (it refuses a mask that wants a
            # gradient); cast before it is expanded to the batch, so the batch-sized copy is
            # made once, in q's dtype (a float32 mask under bf16 autocast was expanded, then
            # cast: 14.7 MB written and read again at Swin-T's stage 1, batch 8).
            expanded = expand_to_batch(mask.detach().to(q.dtype), q.shape[0])
        return _fused_attention(q.detach(), k.detach(), v.detach(), expanded, scale)


def attention_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    grad_out_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mask_grad: bool,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of q, k, v (and the mask) from recomputed probabilities; those of q, k, v
    written into ``out`` (three contiguous tensors shaped as q) when given.

    ``grad_out_of(probs, v)`` returns the output's gradient ``(B*nW, heads, N, d)``,
    contiguous, in q's dtype; it sees the probabilities in q's dtype (the matmuls' operand)
    and contiguous v, so a caller that also needs the output (a fused projection) can
    recompute it there. Matmuls run in the inputs' dtype (bf16 ones as autocast's backward
    would run them), the softmax and its gradient in at least float32. Each of q, k, v feeds
    two matmuls: made contiguous once.
    """
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    probs = _probabilities(q, k, mask, scale)  # (B*nW, heads, N, M), work dtype
    operand = probs.to(dtype)  # cast once for the two matmuls it feeds
    grad_out = grad_out_of(operand, v)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).to(work)  # (B*nW, heads, N, M)
    # dS = P * (dP - rowsum(P * dP)) by PyTorch's softmax-backward kernel, in place (one pass
    # over each row after its sum; 0.85 against 1.4 ms for mul, sum and addcmul at stage 1).
    grad_logits = torch.ops.aten._softmax_backward_data.out(
        grad_probs, probs, -1, work, grad_input=grad_probs
    )
    del probs
    grad_q_out, grad_k_out, grad_v_out = (None, None, None) if out is None else out
    grad_v = torch.matmul(operand.transpose(-1, -2), grad_out, out=grad_v_out)
    del operand
    grad_mask = None
    if mask is not None and mask_grad:
        windows = mask.shape[0]
        grad_mask = grad_logits.view(-1, windows, *grad_logits.shape[1:]).sum(0)
        grad_mask = grad_mask.to(mask.dtype)
    grad_logits = grad_logits.mul_(scale).to(dtype)
    grad_q = torch.matmul(grad_logits, k, out=grad_q_out)
    grad_k = torch.matmul(grad_logits.transpose(-1, -2), q, out=grad_k_out)
    return grad_q, grad_k, grad_v, grad_mask


class _WindowAttentionFunction(torch.autograd.Function):
    """Attention inside windows that stores q, k and v (views of their producer), never the
    ``(B*nW, heads, N, N)`` attention matrix nor the output: backward recomputes the
    probabilities, and takes the softmax gradient's row sums from them.

    The mask is taken compact, ``(nW or 1, heads, N, N)``, and its gradient is summed over the
    batch here, so neither the batch-expanded mask nor its gradient is kept between passes.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float):  # type: ignore[override]
        out = attend_without_grad(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, mask = ctx.saved_tensors
        dtype = q.dtype

        def grad_out_of(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return grad_out.to(dtype).transpose(1, 2).contiguous()  # (B*nW, heads, N, d)

        grads = attention_gradients(
            q, k, v, mask, ctx.scale, grad_out_of, ctx.needs_input_grad[3]
        )
        return (*grads, None)


def attend_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention inside windows, as the Swin stages call it.

    Args:
        q: ``(batch * nW, heads, N, head_dim)``; k, v: ``(batch * nW, heads, M, head_dim)``;
            any strides with a unit last stride (views into the fused qkv projection are fine).
        mask: additive ``(nW, heads, N, M)``, ``(1, heads, N, M)`` or already expanded to
            ``(batch * nW, heads, N, M)`` (bias and shift mask folded together), or None;
            windows are the inner part of q's leading axis.
        scale: multiplies q.k.

    Returns:
        ``(batch * nW, N, heads, head_dim)`` contiguous, ready for the output projection.
    """
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _WindowAttentionFunction.apply(q, k, v, mask, scale)
    out = cpu_kernel.attend(q, k, v, mask, scale)  # winattn's CPU kernel, where it serves
    if out is not None:
        return out
    expanded = None if mask is None else expand_to_batch(mask, q.shape[0])
    return _fused_attention(q, k, v, expanded, scale)


def mask_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int, windows: int) -> int:
    """How many windows a cached eval mask for :func:`attend_qkv` on q, k, v should span:
    ``windows`` (compact) where winattn's CPU kernel serves the call (it broadcasts the mask
    over the batch itself), else ``rows`` (expanded to the batch, as SDPA's kernel needs)."""
    return windows if cpu_kernel.serves(q, k, v) else rows


def attend_windows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention inside windows.

    Args:
        q: ``(B, nW, heads, N, head_dim)``.
        k, v: ``(B, nW, heads, M, head_dim)``; ``M = N`` for plain windows, larger for tiles
            whose keys include a halo (neighbourhood attention).
        mask: additive, broadcastable to ``(nW, heads, N, M)``, or None.
        scale: multiplies q.k.

    Returns:
        ``(B, nW, heads, N, head_dim)`` in q's dtype.
    """
    batch, num_windows, heads, tokens, head_dim = q.shape
    keys = k.shape[-2]
    if mask is not None and mask.dim() == 4 and mask.shape[0] != 1:
        # Per-window masks: windows join the head axis, so one mask broadcasts over the batch
        # without a batch-expanded copy.
        q_shape = (batch, num_windows * heads, tokens, head_dim)
        kv_shape = (batch, num_windows * heads, keys, head_dim)
        mask = mask.expand(num_windows, heads, tokens, keys).reshape(1, -1, tokens, keys)
        out = attend_qkv(q.reshape(q_shape), k.reshape(kv_shape), v.reshape(kv_shape), mask, scale)
        out = out.view(batch, tokens, num_windows, heads, head_dim)
        return out.permute(0, 2, 3, 1, 4)  # (B, nW, heads, N, d)
    q_shape = (batch * num_windows, heads, tokens, head_dim)
    kv_shape = (batch * num_windows, heads, keys, head_dim)
    if mask is not None:
        mask = mask.expand(1, heads, tokens, keys)
    out = attend_qkv(q.reshape(q_shape), k.reshape(kv_shape), v.reshape(kv_shape), mask, scale)
    return out.view(batch, num_windows, tokens, heads, head_dim).transpose(2, 3)


class SdpaBackend:
    """Gather into windows, attend with SDPA (recomputing in backward), scatter back."""

    name = "sdpa"

    def __init__(self) -> None:
        self.masks = CallMaskCache()

    def supports(self, call: AttentionCall) -> list[str]:
        if call.q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return [f"dtype {call.q.dtype} is not a floating type it handles"]
        return []

    def forward(self, call: AttentionCall) -> torch.Tensor:
        plan = call.plan
        batch, heads, head_dim = call.batch, call.heads, call.head_dim
        channels = heads * head_dim
        rows, tokens = batch * plan.num_windows, plan.window_tokens

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            t = plan.partition(t.reshape(batch, *plan.grid, channels))  # (B, nW, N, heads*d)
            return t.view(rows, tokens, heads, head_dim).transpose(1, 2)  # (B*nW, heads, N, d)

        fused = None if call.needs_grad else stacked_views(call.q, call.k, call.v)
        if fused is not None:
            # Slices of one qkv tensor: one gather for all three instead of one each.
            windows = plan.partition(fused.reshape(batch, *plan.grid, 3 * channels))
            windows = windows.view(rows, tokens, 3, heads, head_dim)
            q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = to_windows(call.q), to_windows(call.k), to_windows(call.v)
        if not call.needs_grad and prefers_matmuls(q):
            out = explicit_attention(q, k, v, self.masks.get(call, torch.float32, None), call.scale)
        else:
            # Expanded to the batch (and kept) for SDPA without gradients; compact for the
            # Function and for winattn's CPU kernel.
            kept_rows = None if call.needs_grad else mask_rows(q, k, v, rows, plan.num_windows)
            mask = self.masks.get(call, q.dtype, kept_rows)
            out = attend_qkv(q, k, v, mask, call.scale)  # (B*nW, N, heads, d)
        out = out.view(batch, plan.num_windows, tokens, channels)
        return plan.reverse(out).view(call.q.shape)  # (B, *grid, heads, d)


def stacked_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``(..., 3, heads, d)``: the one tensor whose three slices are q, k and v, when they are
    such slices of one storage (``qkv.unbind(-3)`` of a fused projection), else None.

    It reads exactly q's, k's and v's elements whatever lies between them, so it is only used
    where no gradient is wanted (a view across three tensors would confuse autograd).
    """
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()):
        return None
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dim() < 2:
        return None
    if not (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            == v.untyped_storage().data_ptr()):
        return None
    step = k.storage_offset() - q.storage_offset()
    if step <= 0 or v.storage_offset() - k.storage_offset() != step:
        return None
    return q.as_strided(
        (*q.shape[:-2], 3, *q.shape[-2:]),
        (*q.stride()[:-2], step, *q.stride()[-2:]),
        q.storage_offset(),
    )
