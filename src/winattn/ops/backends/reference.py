"""The oracle: dense attention over the whole grid with an explicit mask, written from the
definition of windowed attention rather than from the partition code of the fast paths.

Memory grows as (grid tokens)^2, so it serves tests and small grids; it runs in float64.
"""

from __future__ import annotations

import math

import torch

from ..call import AttentionCall
from ..geometry import SHIFT_REGION_PENALTY, region_ids_1d

#: Above this many logits per call the dense oracle refuses (about 2 GiB in float64).
MAX_DENSE_LOGITS = 2**28


def token_geometry(
    grid: tuple[int, ...], window_size: tuple[int, ...], shift_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per real grid token (row-major): window id, index inside its window, shift region id.

    A token at padded coordinate p sits at shifted coordinate r = (p - s) mod P on each axis
    (the padded axis is rolled by -s); its window is r // w, its place inside the window r % w.
    """
    window_id = torch.zeros((), dtype=torch.long)
    inner = torch.zeros((), dtype=torch.long)
    region = torch.zeros((), dtype=torch.long)
    ndim = len(grid)
    for axis, (n, w, s) in enumerate(zip(grid, window_size, shift_size)):
        padded = math.ceil(n / w) * w
        shape = [1] * ndim
        shape[axis] = n
        shifted = ((torch.arange(n) - s) % padded).view(shape)
        window_id = window_id * (padded // w) + shifted // w
        inner = inner * w + shifted % w
        region = region * 3 + region_ids_1d(padded, w, s)[shifted]
    full = tuple(grid)
    return (
        window_id.expand(full).reshape(-1),
        inner.expand(full).reshape(-1),
        region.expand(full).reshape(-1),
    )


class ReferenceBackend:
    """Dense masked attention over the grid: every query sees its window's keys, nothing else."""

    name = "reference"

    def supports(self, call: AttentionCall) -> list[str]:
        tokens = math.prod(call.plan.grid)
        logits = call.batch * call.heads * tokens * tokens
        if logits > MAX_DENSE_LOGITS:
            return [
                f"the dense oracle would hold {logits:,} logits (batch {call.batch} x heads "
                f"{call.heads} x {tokens}^2 tokens), above its limit of {MAX_DENSE_LOGITS:,}"
            ]
        return []

    def forward(self, call: AttentionCall) -> torch.Tensor:
        plan = call.plan
        q, k, v = call.q, call.k, call.v
        batch, heads, head_dim = call.batch, call.heads, call.head_dim
        grid = plan.grid
        window_id, inner, region = (
            t.to(q.device) for t in token_geometry(grid, plan.window_size, plan.shift_size)
        )
        q = q.reshape(batch, -1, heads, head_dim)  # (B, L, heads, d)
        k = k.reshape(batch, -1, heads, head_dim)
        v = v.reshape(batch, -1, heads, head_dim)
        logits = torch.einsum("bihd,bjhd->bhij", q * call.scale, k)  # (B, heads, L, L)
        if call.bias is not None:
            logits = logits + call.bias[:, inner[:, None], inner[None, :]].to(logits.dtype)
        other_region = region[:, None] != region[None, :]  # (L, L)
        logits = logits + other_region.to(logits.dtype) * SHIFT_REGION_PENALTY
        same_window = window_id[:, None] == window_id[None, :]  # (L, L)
        logits = logits.masked_fill(~same_window, float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", logits.softmax(dim=-1), v)  # (B, L, heads, d)
        return out.reshape(call.q.shape)
