"""Dense oracles of the local-attention family, written from each pattern's definition.

Each builds, for every query of the grid, the set of keys it sees (Python loops over one axis at
a time, no tiling, no index arithmetic shared with the fast paths), then runs dense masked
attention over the whole grid. Memory grows as (grid tokens)^2: tests and small grids only.
"""

from __future__ import annotations

import math

import torch

from .backends.reference import token_geometry
from .checks import BoolOrTuple
from .geometry import SHIFT_REGION_PENALTY, IntOrTuple, normalize_tuple


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Masked attention over all ``L`` grid tokens (plus any extra keys).

    Args:
        q: ``(B, *grid, heads, d)``; k, v: ``(B, M, heads, d)`` or grid-shaped with ``M`` keys.
        allowed: ``(L, M)`` or ``(heads, L, M)`` bool: which keys each query sees.
        bias: additive ``(heads, L, M)`` (or broadcastable), or None.
    """
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    qf = q.reshape(batch, -1, heads, head_dim)
    kf = k.reshape(batch, -1, heads, head_dim)
    vf = v.reshape(batch, -1, heads, head_dim)
    logits = torch.einsum("bihd,bjhd->bhij", qf * scale, kf)  # (B, heads, L, M)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    logits = logits.masked_fill(~allowed.to(q.device), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(dim=-1), vf)  # (B, L, heads, d)
    return out.reshape(q.shape)


def neighborhood_1d(n: int, kernel: int, dilation: int, causal: bool) -> list[list[int]]:
    """The keys each position of one axis sees under NATTEN's neighbourhood definition."""
    seen = []
    for i in range(n):
        members = list(range(i % dilation, n, dilation))  # the query's dilation group
        index = members.index(i)
        if causal:
            seen.append(members[max(index - kernel + 1, 0) : index + 1])
        else:
            start = min(max(index - kernel // 2, 0), len(members) - kernel)
            seen.append(members[start : start + kernel])
    return seen


def _product_allowed(per_axis: list[torch.Tensor]) -> torch.Tensor:
    """AND of per-axis ``(n_d, n_d)`` relations -> ``(L, L)`` over row-major grid tokens."""
    ndim = len(per_axis)
    allowed = torch.ones((), dtype=torch.bool)
    for axis, rel in enumerate(per_axis):
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = rel.shape
        allowed = allowed & rel.view(shape)
    tokens = math.prod(r.shape[0] for r in per_axis)
    return allowed.reshape(tokens, tokens)


def neighborhood_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    *,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense oracle of :func:`~winattn.ops.neighborhood.neighborhood_attention`."""
    grid = tuple(q.shape[1:-2])
    ndim = len(grid)
    kernel = normalize_tuple(kernel_size, ndim, "kernel_size")
    dil = normalize_tuple(dilation, ndim, "dilation")
    causal = (is_causal,) * ndim if isinstance(is_causal, bool) else tuple(is_causal)
    per_axis, offsets = [], []
    for n, kk, d, c in zip(grid, kernel, dil, causal):
        rel = torch.zeros(n, n, dtype=torch.bool)
        offset = torch.zeros(n, n, dtype=torch.long)
        for i, keys in enumerate(neighborhood_1d(n, kk, d, c)):
            for j in keys:
                rel[i, j] = True
                offset[i, j] = (j - i) // d + kk - 1  # NATTEN's rpb index along this axis
        per_axis.append(rel)
        offsets.append(offset)
    allowed = _product_allowed(per_axis)
    dense_bias = None
    if bias is not None:
        index = []
        for axis, offset in enumerate(offsets):
            shape = [1] * (2 * ndim)
            shape[axis], shape[ndim + axis] = offset.shape
            index.append(offset.view(shape).expand(*grid, *grid).reshape(allowed.shape))
        dense_bias = bias[(slice(None), *index)]  # (heads, L, L)
    return dense_attention(q, k, v, allowed, bias=dense_bias, scale=scale)


def sequence_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    *,
    mode: str = "sliding",
    is_causal: bool = False,
    num_sink_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense oracle of :func:`~winattn.ops.sequence.sequence_window_attention`."""
    length = q.shape[1]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        if mode == "blocked":
            block = i // window_size
            keys = range(block * window_size, min((block + 1) * window_size, length))
            keys = [j for j in keys if not is_causal or j <= i]
        else:
            (keys,) = [neighborhood_1d(length, window_size, 1, is_causal)[i]]
        for j in keys:
            allowed[i, j] = True
        for j in range(min(num_sink_tokens, length)):
            if not is_causal or j <= i:
                allowed[i, j] = True
    return dense_attention(q, k, v, allowed, scale=scale)


def cross_shaped_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stripe_width: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense oracle of :func:`~winattn.ops.stripes.cross_shaped_window_attention`: the first
    half of the heads see the keys in the same column stripe (``x // sw``), the second half those
    in the same row stripe (``y // sw``)."""
    height, width, heads = q.shape[1], q.shape[2], q.shape[3]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    col, row = (xs // stripe_width).reshape(-1), (ys // stripe_width).reshape(-1)
    same_col = col[:, None] == col[None, :]
    same_row = row[:, None] == row[None, :]
    half = heads // 2
    allowed = torch.stack([same_col] * half + [same_row] * (heads - half))  # (heads, L, L)
    return dense_attention(q, k, v, allowed, scale=scale)


def window_globals_reference(
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
    """Dense oracle of windowed attention plus global keys: one softmax over the query's window
    keys (with Swin's bias, region penalty and padding rules) and every global key (no bias)."""
    grid = tuple(q.shape[1:-2])
    ndim = len(grid)
    window = normalize_tuple(window_size, ndim, "window_size")
    shift = normalize_tuple(shift_size, ndim, "shift_size")
    window_id, inner, region = token_geometry(grid, window, shift)
    tokens, num_globals, heads = math.prod(grid), global_k.shape[1], q.shape[-2]
    same_window = window_id[:, None] == window_id[None, :]  # (L, L)
    allowed = torch.cat([same_window, torch.ones(tokens, num_globals, dtype=torch.bool)], dim=1)
    penalty = (region[:, None] != region[None, :]).to(q.dtype) * SHIFT_REGION_PENALTY
    window_terms = penalty.expand(heads, tokens, tokens)  # (heads, L, L)
    if bias is not None:
        window_terms = window_terms + bias[:, inner[:, None], inner[None, :]].to(q.dtype)
    global_terms = torch.zeros(heads, tokens, num_globals, dtype=q.dtype)
    additive = torch.cat([window_terms, global_terms], dim=2)  # (heads, L, L + G)
    batch, head_dim = q.shape[0], q.shape[-1]
    keys = torch.cat([k.reshape(batch, tokens, heads, head_dim), global_k], dim=1)
    values = torch.cat([v.reshape(batch, tokens, heads, head_dim), global_v], dim=1)
    return dense_attention(q, keys, values, allowed, bias=additive, scale=scale)
