"""Windowed attention plus global keys and values that every query attends to (HiLo's pooled
tokens, learned or sink tokens), merged exactly through the log-sum-exp.

The windowed part and the global part are computed separately, each with its output and the
log-sum-exp of its logits per query row; one softmax over the union of the keys is recovered
exactly by ``lse = logaddexp(lse_w, lse_g)`` and ``out = out_w e^(lse_w - lse) + out_g
e^(lse_g - lse)``. No dense mask over the union is ever built.
"""

from __future__ import annotations

import torch

from .backends.sdpa import window_mask
from .checks import empty_attention
from .functional import make_call
from .geometry import IntOrTuple


def attend_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the log-sum-exp of each row, softmax in at least float32.

    Args:
        q: ``(..., N, d)``; k, v: ``(..., M, d)``; mask: additive, broadcastable to
            ``(..., N, M)``, or None. Every row must see at least one key.

    Returns:
        ``out (..., N, d)`` in the compute dtype (float32 for half types) and ``lse (..., N)``.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    q = q if scale == 1.0 else q * scale
    logits = torch.matmul(q, k.transpose(-1, -2)).to(compute)  # (..., N, M)
    if mask is not None:
        logits = logits + mask.to(compute)
    # One exp pass: the row max is a constant shift (detached: the result does not depend on
    # it), so lse = max + log(sum) and out = (p @ v) / sum stay exact, gradients included.
    row_max = logits.detach().amax(dim=-1, keepdim=True)  # (..., N, 1)
    probs = torch.exp(logits - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs.to(v.dtype), v).to(compute) / total
    return out, (row_max + torch.log(total)).squeeze(-1)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """One softmax over the keys of two disjoint attention parts, from each part's output and
    log-sum-exp: ``out (..., N, d)``, ``lse (..., N)``."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(
        -1
    )


def check_globals(q: torch.Tensor, global_k: torch.Tensor, global_v: torch.Tensor) -> None:
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    for name, t in (("global_k", global_k), ("global_v", global_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be laid out (batch, num_globals, heads, head_dim) (rank 4), got "
                f"rank {t.dim()} with shape {tuple(t.shape)}"
            )
        if t.shape[0] != batch:
            raise ValueError(f"{name} has batch {t.shape[0]}, expected q's batch {batch}")
        if t.shape[2] != heads:
            raise ValueError(
                f"{name} has {t.shape[2]} heads (shape {tuple(t.shape)}), expected q's {heads}"
            )
        if t.shape[3] != head_dim:
            raise ValueError(
                f"{name} has head_dim {t.shape[3]} (shape {tuple(t.shape)}), expected q's "
                f"{head_dim}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}, expected q's {q.dtype} on {q.device}"
            )
    if global_k.shape != global_v.shape:
        raise ValueError(
            f"global_k and global_v must have one shape, got {tuple(global_k.shape)} and "
            f"{tuple(global_v.shape)}"
        )
    if global_k.shape[1] < 1:
        raise ValueError(f"global_k holds no tokens (shape {tuple(global_k.shape)})")


def window_attention_with_globals(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: IntOrTuple,
    global_k: torch.Tensor,
    global_v: torch.Tensor,
    *,
    shift_size: IntOrTuple = 0,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``window_attention`` in which every query also attends to ``G`` global keys.

    One softmax over the query's window keys (with the window's bias, shift-region penalty and
    padding rules, exactly as :func:`window_attention`) and all global keys (no bias, no mask).

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)`` as for :func:`window_attention`.
        window_size, shift_size, bias, scale: as for :func:`window_attention`.
        global_k, global_v: ``(B, G, heads, head_dim)``, e.g. pooled tokens (HiLo), learned
            tokens, or sink tokens.

    Returns:
        ``(B, *grid, heads, head_dim)``.

    Example:
        >>> q = k = v = torch.randn(2, 14, 14, 3, 32)
        >>> g = torch.randn(2, 4, 3, 32)
        >>> window_attention_with_globals(q, k, v, 7, g, g, shift_size=3).shape
        torch.Size([2, 14, 14, 3, 32])
    """
    call = make_call(q, k, v, window_size, shift_size=shift_size, bias=bias, scale=scale)
    check_globals(q, global_k, global_v)
    if q.numel() == 0:
        extra = [global_k, global_v] + ([] if bias is None else [bias])
        return empty_attention(q, k, v, *extra)
    plan = call.plan
    batch, heads, head_dim = call.batch, call.heads, call.head_dim
    channels = heads * head_dim

    def to_windows(t: torch.Tensor) -> torch.Tensor:
        t = plan.partition(t.reshape(batch, *plan.grid, channels))  # (B, nW, N, heads*d)
        t = t.view(batch, plan.num_windows, plan.window_tokens, heads, head_dim)
        return t.transpose(2, 3)  # (B, nW, heads, N, d)

    if not call.needs_grad and not global_k.requires_grad and not global_v.requires_grad:
        fused = _fused_forward(call, to_windows, global_k, global_v)
        if fused is not None:
            return fused
    q_windows = to_windows(q) * call.scale  # scaled once for both parts
    out_w, lse_w = attend_with_lse(
        q_windows, to_windows(k), to_windows(v), window_mask(call, q.dtype), 1.0
    )  # (B, nW, heads, N, d), (B, nW, heads, N)
    keys_g = global_k.permute(0, 2, 1, 3).unsqueeze(1)  # (B, 1, heads, G, d)
    values_g = global_v.permute(0, 2, 1, 3).unsqueeze(1)
    out_g, lse_g = attend_with_lse(q_windows, keys_g, values_g, None, 1.0)
    out = merge_by_lse(out_w, lse_w, out_g, lse_g).to(q.dtype)  # (B, nW, heads, N, d)
    out = out.transpose(2, 3).reshape(batch, plan.num_windows, plan.window_tokens, channels)
    return plan.reverse(out).view(q.shape)  # (B, *grid, heads, d)


def _fused_forward(call, to_windows, global_k: torch.Tensor, global_v: torch.Tensor):
    """Inference on CPU: both parts through PyTorch's fused CPU attention kernel, which returns
    the log-sum-exp with the output; then the same exact merge. None where it cannot serve.

    (Training keeps the explicit path: the fused kernel's backward gives no gradient for the
    additive mask, i.e. for a learned relative-position bias.)
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or call.q.device.type != "cpu":
        return None
    plan = call.plan
    batch, heads, head_dim = call.batch, call.heads, call.head_dim
    windows, tokens = plan.num_windows, plan.window_tokens
    q_windows, k_windows, v_windows = (to_windows(t) for t in (call.q, call.k, call.v))
    mask = window_mask(call, call.q.dtype)  # (nW or 1, heads, N, N) or None
    if mask is None or mask.shape[0] == 1:
        shape4 = (batch * windows, heads, tokens, head_dim)
    else:
        shape4 = (batch, windows * heads, tokens, head_dim)
        mask = mask.expand(windows, heads, tokens, tokens).reshape(1, -1, tokens, tokens)
    out_w, lse_w = flash(
        q_windows.reshape(shape4),
        k_windows.reshape(shape4),
        v_windows.reshape(shape4),
        0.0,
        False,
        attn_mask=mask,
        scale=call.scale,
    )
    out_w = out_w.reshape(batch, windows, heads, tokens, head_dim)
    lse_w = lse_w.reshape(batch, windows, heads, tokens)
    # Global part: every query of every window against the same G keys, heads-major.
    q_heads = q_windows.permute(0, 2, 1, 3, 4).reshape(batch, heads, windows * tokens, head_dim)
    out_g, lse_g = flash(
        q_heads,
        global_k.transpose(1, 2),  # (B, heads, G, d)
        global_v.transpose(1, 2),
        0.0,
        False,
        scale=call.scale,
    )  # (B, heads, nW*N, d), (B, heads, nW*N)
    out_g = out_g.reshape(batch, heads, windows, tokens, head_dim).transpose(1, 2)
    lse_g = lse_g.reshape(batch, heads, windows, tokens).transpose(1, 2)
    compute = torch.promote_types(call.q.dtype, torch.float32)
    out = merge_by_lse(out_w.to(compute), lse_w, out_g.to(compute), lse_g).to(call.q.dtype)
    out = out.transpose(2, 3).reshape(batch, windows, tokens, heads * head_dim)
    return plan.reverse(out).view(call.q.shape)  # (B, *grid, heads, d)
