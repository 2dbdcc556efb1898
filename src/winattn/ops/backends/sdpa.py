"""The fast path on any device: partition into windows with one cached gather per tensor, then
batched attention (PyTorch's fused SDPA, or explicit batched matmuls where those are faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..call import AttentionCall


def window_mask(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of every window and head: bias + shift regions + padded keys.

    Returns ``(num_windows, heads, N, N)``, ``(1, heads, N, N)`` or None.
    """
    plan_mask = call.plan.mask_as(dtype)  # (nW, N, N) or None
    bias = None if call.bias is None else call.bias.to(dtype)  # (heads, N, N)
    if plan_mask is None:
        return None if bias is None else bias.unsqueeze(0)
    if bias is None:
        return plan_mask.unsqueeze(1)
    return plan_mask.unsqueeze(1) + bias.unsqueeze(0)


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
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # On this CPU class, low-precision SDPA loses to explicit matmuls; softmax in float32
        # as the peers do under autocast.
        logits = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, nW, heads, N, N)
        logits = logits.float()
        if mask is not None:
            logits = logits + mask.float()
        return torch.matmul(logits.softmax(dim=-1).to(q.dtype), v)
    if mask is None or mask.shape[0] == 1:
        # One mask for every window: fold windows into the batch.
        q_shape = (batch * num_windows, heads, tokens, head_dim)
        kv_shape = (batch * num_windows, heads, keys, head_dim)
        attn_mask = None if mask is None else mask[:1].to(q.dtype)  # (1, heads, N, M)
    else:
        # Per-window masks broadcast over the batch when windows join the head axis.
        q_shape = (batch, num_windows * heads, tokens, head_dim)
        kv_shape = (batch, num_windows * heads, keys, head_dim)
        attn_mask = mask.to(q.dtype).expand(num_windows, heads, tokens, keys)
        # 4-D: PyTorch's fused CPU kernel takes only 2-D or 4-D masks (a 3-D one falls back to
        # the unfused math path, several times slower).
        attn_mask = attn_mask.reshape(1, num_windows * heads, tokens, keys)
    out = F.scaled_dot_product_attention(
        q.reshape(q_shape),
        k.reshape(kv_shape),
        v.reshape(kv_shape),
        attn_mask=attn_mask,
        scale=scale,
    )
    return out.view(batch, num_windows, heads, tokens, head_dim)


class SdpaBackend:
    """Gather into windows, attend with SDPA / batched matmul, scatter back."""

    name = "sdpa"

    def supports(self, call: AttentionCall) -> list[str]:
        if call.q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return [f"dtype {call.q.dtype} is not a floating type it handles"]
        return []

    def forward(self, call: AttentionCall) -> torch.Tensor:
        plan = call.plan
        batch, heads, head_dim = call.batch, call.heads, call.head_dim
        channels = heads * head_dim

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            t = plan.partition(t.reshape(batch, *plan.grid, channels))  # (B, nW, N, heads*d)
            t = t.view(batch, plan.num_windows, plan.window_tokens, heads, head_dim)
            return t.transpose(2, 3)  # (B, nW, heads, N, d)

        out = attend_windows(
            to_windows(call.q),
            to_windows(call.k),
            to_windows(call.v),
            window_mask(call, call.q.dtype),
            call.scale,
        )  # (B, nW, heads, N, d)
        out = out.transpose(2, 3).reshape(batch, plan.num_windows, plan.window_tokens, channels)
        return plan.reverse(out).view(call.q.shape)  # (B, *grid, heads, d)
