"""Tiled local attention: the fast path for patterns whose keys form a box around each query.

Neighbourhoods (NAT), dilated neighbourhoods (DiNAT), causal bands and causal blocks all have
the same shape: along every grid axis a query sees an interval of positions (inside its
dilation group), and in several dimensions it sees the Cartesian product of those intervals.
Cutting each axis into tiles of ``t`` consecutive queries (of one dilation group), the union of
their key intervals is at most ``t + k - 1`` positions long (the tile plus a halo). So every
tile of queries attends densely to one small box of keys under an exact mask, through the same
batched attention as the window path (:func:`~winattn.ops.backends.sdpa.attend_windows`).

A :class:`TilePlan` holds the shape-only part (gather maps for queries and keys, the mask, the
relative-bias index, the scatter map back to the grid) and is cached per shape, like
:class:`~winattn.ops.geometry.WindowPlan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends.sdpa import attend_windows
from .checks import is_int
from .stamps import tensor_cache


@dataclass(frozen=True)
class LocalAttentionSettings:
    """Speed settings of the tiled path; they never change the result.

    Attributes:
        tile_size: queries per tile along each axis (int for all axes, or a tuple); None picks
            the kernel size (clamped to at least 4) per axis.
        max_chunk_logits: tiles are processed in chunks so that one chunk holds at most this many
            attention logits (batch x heads x tile queries x tile keys x tiles); bounds the peak
            memory of a forward pass without autograd.
    """

    tile_size: int | tuple[int, ...] | None = None
    max_chunk_logits: int = 2**24

    def __post_init__(self) -> None:
        sizes = self.tile_size
        if sizes is not None:
            items = (sizes,) if is_int(sizes) else sizes
            if not isinstance(items, tuple) or not items or not all(is_int(t) for t in items):
                raise TypeError(f"tile_size must be None, an int or a tuple of ints, got {sizes!r}")
            if min(items) < 1:
                raise ValueError(f"tile_size must be >= 1 on every axis, got {sizes!r}")
        if not is_int(self.max_chunk_logits) or self.max_chunk_logits < 1:
            raise ValueError(
                f"max_chunk_logits must be an int >= 1, got {self.max_chunk_logits!r}"
            )


DEFAULT_SETTINGS = LocalAttentionSettings()


def resolve_settings(settings: object) -> LocalAttentionSettings:
    """``settings``, or the defaults for None; anything else (a dict, say) is refused."""
    if settings is None:
        return DEFAULT_SETTINGS
    if not isinstance(settings, LocalAttentionSettings):
        raise TypeError(
            f"settings must be a LocalAttentionSettings or None, got {type(settings).__name__} "
            f"{settings!r}; e.g. settings=LocalAttentionSettings(tile_size=8)"
        )
    return settings


@dataclass(frozen=True, eq=False)
class AxisTiles:
    """One grid axis cut into tiles of queries, each with the keys its queries may see.

    Attributes:
        query_pos: ``(T, t)`` grid coordinate of every query slot, -1 for an empty slot.
        key_pos: ``(T, S)`` grid coordinate of every key slot, -1 for an empty slot.
        allowed: ``(T, t, S)`` whether the query of a slot sees the key of a slot.
        rel: ``(T, t, S)`` index along this axis of the relative-position bias table
            (``key - query`` in group units, plus ``k - 1``); 0 where not allowed.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    allowed: torch.Tensor
    rel: torch.Tensor


def _axis_from_groups(parts: list[tuple[torch.Tensor, ...]]) -> AxisTiles:
    query_pos, key_pos, allowed, rel = (torch.cat(p) for p in zip(*parts))
    return AxisTiles(query_pos=query_pos, key_pos=key_pos, allowed=allowed, rel=rel)


@tensor_cache(maxsize=256)
def neighborhood_axis(
    length: int, kernel: int, dilation: int, causal: bool, tile: int
) -> AxisTiles:
    """Tiles of one axis under NATTEN's (dilated, optionally causal) neighbourhood.

    Within dilation group ``g`` (positions ``g, g + d, ...``, ``n_g`` of them, indexed by ``i``):
    non-causal, a query sees ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, n_g - k)`` (the
    window is shifted inwards at the borders); causal, it sees ``[max(i - k + 1, 0), i]``.
    """
    longest_group = math.ceil(length / dilation)
    tile = min(tile, longest_group)
    span = min(tile + kernel - 1, longest_group)  # keys per tile: the tile plus its halo
    parts = []
    for group in range(dilation):
        group_len = len(range(group, length, dilation))
        index = torch.arange(group_len)
        if causal:
            start = (index - kernel + 1).clamp(min=0)
            stop = index + 1
        else:
            start = (index - kernel // 2).clamp(0, group_len - kernel)
            stop = start + kernel
        num_tiles = math.ceil(group_len / tile)
        queries = torch.arange(num_tiles)[:, None] * tile + torch.arange(tile)  # (T, t)
        query_ok = queries < group_len
        queries_safe = queries.clamp(max=group_len - 1)
        first_key = torch.minimum(start[queries[:, 0]], torch.tensor(group_len - span)).clamp(min=0)
        keys = first_key[:, None] + torch.arange(span)  # (T, S)
        key_ok = keys < group_len
        allowed = (
            query_ok[:, :, None]
            & key_ok[:, None, :]
            & (keys[:, None, :] >= start[queries_safe][:, :, None])
            & (keys[:, None, :] < stop[queries_safe][:, :, None])
        )  # (T, t, S)
        rel = (keys[:, None, :] - queries[:, :, None] + kernel - 1) * allowed
        parts.append(
            (
                torch.where(query_ok, group + dilation * queries, -1),
                torch.where(key_ok, group + dilation * keys, -1),
                allowed,
                rel,
            )
        )
    return _axis_from_groups(parts)


@tensor_cache(maxsize=256)
def blocked_axis(length: int, block: int, causal: bool) -> AxisTiles:
    """Tiles of one axis cut into blocks of ``block`` positions (the last may be shorter); a
    query sees its block (causal: the part of it up to and including itself)."""
    num_blocks = math.ceil(length / block)
    pos = torch.arange(num_blocks)[:, None] * block + torch.arange(block)  # (T, w)
    ok = pos < length
    allowed = ok[:, :, None] & ok[:, None, :]
    if causal:
        allowed = allowed & (pos[:, None, :] <= pos[:, :, None])
    rel = (pos[:, None, :] - pos[:, :, None] + block - 1) * allowed
    slots = torch.where(ok, pos, -1)
    return AxisTiles(query_pos=slots, key_pos=slots, allowed=allowed, rel=rel)


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Shape-only facts of one tiled local-attention call; built by :func:`plan_tiles`.

    Attributes:
        grid: the grid's size per axis.
        num_tiles, tile_tokens, key_tokens: tiles, query slots per tile, key slots per tile.
        query_index: ``(num_tiles * tile_tokens,)`` flat grid position read by every query slot
            (0 for empty slots: their outputs are never read back).
        query_ok: ``(num_tiles, tile_tokens)`` whether a query slot holds a grid position.
        key_index: ``(num_tiles * key_tokens,)`` flat grid position read by every key slot.
        scatter_index: ``(prod(grid),)`` the query slot that holds every grid position's output.
        mask: ``(num_tiles, tile_tokens, key_tokens)`` float32, 0 where the key is seen and
            -inf elsewhere; empty query slots see every key so that no row is empty.
        axes, bias_extent: the per-axis tiles and bias-table extents the plan was built from,
            for :func:`bias_index_of` (None for plans that take no bias).
    """

    grid: tuple[int, ...]
    num_tiles: int
    tile_tokens: int
    key_tokens: int
    query_index: torch.Tensor
    query_ok: torch.Tensor
    key_index: torch.Tensor
    scatter_index: torch.Tensor
    mask: torch.Tensor
    axes: tuple[AxisTiles, ...] | None
    bias_extent: tuple[int, ...] | None

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask in ``dtype`` (cached per dtype)."""
        return _tile_mask_in_dtype(self, dtype)


@tensor_cache(maxsize=64)
def _tile_mask_in_dtype(plan: TilePlan, dtype: torch.dtype) -> torch.Tensor:
    return plan.mask.to(dtype)


def _flat(positions: list[torch.Tensor], grid: tuple[int, ...], first: int) -> torch.Tensor:
    """Row-major flat grid index of a product of per-axis coordinate tensors; -1 if any is -1.

    Axis ``d``'s ``(T_d, n_d)`` tensor is laid along dims ``d`` and ``first + d`` of a
    ``2 * ndim``-dim result.
    """
    ndim = len(grid)
    flat = torch.zeros((), dtype=torch.long)
    empty = torch.zeros((), dtype=torch.bool)
    for axis, pos in enumerate(positions):
        shape = [1] * (2 * ndim)
        shape[axis], shape[first + axis] = pos.shape
        pos = pos.view(shape)
        flat = flat + pos.clamp(min=0) * math.prod(grid[axis + 1 :])
        empty = empty | (pos < 0)
    return torch.where(empty, -1, flat)


def plan_tiles(
    grid: tuple[int, ...], axes: tuple[AxisTiles, ...], bias_extent: tuple[int, ...]
) -> TilePlan:
    """Combine per-axis tiles into the tiles of the grid (the product of the axes).

    Args:
        grid: grid size per axis.
        axes: one :class:`AxisTiles` per axis (cached objects: the plan is cached on them).
        bias_extent: the bias table's size per axis (``2k - 1``), to flatten its index.
    """
    return _plan_tiles(tuple(grid), tuple(axes), tuple(bias_extent))


@tensor_cache(maxsize=64)
def _plan_tiles(
    grid: tuple[int, ...], axes: tuple[AxisTiles, ...], bias_extent: tuple[int, ...]
) -> TilePlan:
    ndim = len(grid)
    tiles_per_axis = [a.query_pos.shape[0] for a in axes]
    num_tiles = math.prod(tiles_per_axis)
    tile_tokens = math.prod(a.query_pos.shape[1] for a in axes)
    key_tokens = math.prod(a.key_pos.shape[1] for a in axes)

    query_flat = _flat([a.query_pos for a in axes], grid, ndim)  # (T..., t...)
    key_flat = _flat([a.key_pos for a in axes], grid, ndim)  # (T..., S...)
    query_flat = query_flat.reshape(num_tiles, tile_tokens)
    key_flat = key_flat.reshape(num_tiles, key_tokens)

    allowed = torch.ones((), dtype=torch.bool)
    for axis, a in enumerate(axes):
        allowed = allowed & a.allowed.view(_product_shape(axis, ndim, a.allowed.shape))
    allowed = allowed.reshape(num_tiles, tile_tokens, key_tokens)
    query_ok = query_flat >= 0
    allowed = allowed | ~query_ok[:, :, None]
    mask = torch.zeros(num_tiles, tile_tokens, key_tokens).masked_fill_(~allowed, float("-inf"))

    slot_of = torch.full((math.prod(grid),), -1, dtype=torch.long)
    slot_of[query_flat[query_ok]] = torch.arange(num_tiles * tile_tokens).view_as(query_flat)[
        query_ok
    ]
    assert bool((slot_of >= 0).all()), "tiles must cover every grid position exactly once"
    return TilePlan(
        grid=grid,
        num_tiles=num_tiles,
        tile_tokens=tile_tokens,
        key_tokens=key_tokens,
        query_index=query_flat.clamp(min=0).reshape(-1),
        query_ok=query_ok,
        key_index=key_flat.clamp(min=0).reshape(-1),
        scatter_index=slot_of,
        mask=mask,
        axes=axes,
        bias_extent=bias_extent,
    )


def _product_shape(axis: int, ndim: int, shape: torch.Size) -> list[int]:
    """Where axis ``axis``'s ``(T, t, S)`` tensor sits in the product layout
    ``(T_0..T_{n-1}, t_0..t_{n-1}, S_0..S_{n-1})``."""
    full = [1] * (3 * ndim)
    full[axis], full[ndim + axis], full[2 * ndim + axis] = shape
    return full


@tensor_cache(maxsize=16)
def bias_index_of(plan: TilePlan, device: torch.device) -> torch.Tensor:
    """``(num_tiles, tile_tokens, key_tokens)`` flat index into a relative-position bias table
    ``(heads, 2k_0 - 1, ..., 2k_{n-1} - 1)`` flattened per head (built only when a bias is
    given: it is the largest tensor of a plan)."""
    if plan.axes is None or plan.bias_extent is None:
        raise ValueError("this tile plan takes no relative-position bias")
    ndim = len(plan.grid)
    index = torch.zeros((), dtype=torch.long)
    for axis, a in enumerate(plan.axes):
        index = index * plan.bias_extent[axis] + a.rel.view(_product_shape(axis, ndim, a.rel.shape))
    return index.reshape(plan.num_tiles, plan.tile_tokens, plan.key_tokens).to(device)


@tensor_cache(maxsize=64)
def with_sink_keys(plan: TilePlan, num_sinks: int, causal: bool) -> TilePlan:
    """A 1-D plan whose every tile also sees the first ``num_sinks`` positions ("sink" tokens).

    A sink is added to a query's keys unless the query already sees it locally (it is counted
    once); with ``causal`` a query sees only the sinks at or before its own position.
    """
    if len(plan.grid) != 1:
        raise ValueError(f"sink tokens are defined on 1-D sequences, got a grid {plan.grid}")
    tiles, tokens = plan.num_tiles, plan.tile_tokens
    query_pos = plan.query_index.view(tiles, tokens)
    key_pos = plan.key_index.view(tiles, plan.key_tokens)
    local = plan.mask == 0  # (T, t, S)
    sinks = torch.arange(num_sinks)
    seen_locally = ((key_pos[:, None, :, None] == sinks) & local[..., None]).any(dim=2)
    sink_ok = ~seen_locally  # (T, t, num_sinks)
    if causal:
        sink_ok = sink_ok & (sinks <= query_pos[..., None])
    sink_mask = torch.zeros(sink_ok.shape).masked_fill_(~sink_ok, float("-inf"))
    return TilePlan(
        grid=plan.grid,
        num_tiles=tiles,
        tile_tokens=tokens,
        key_tokens=plan.key_tokens + num_sinks,
        query_index=plan.query_index,
        query_ok=plan.query_ok,
        key_index=torch.cat([key_pos, sinks.expand(tiles, num_sinks)], dim=1).reshape(-1),
        scatter_index=plan.scatter_index,
        mask=torch.cat([plan.mask, sink_mask], dim=2),
        axes=None,
        bias_extent=None,
    )


@tensor_cache(maxsize=64)
def plan_on_device(plan: TilePlan, device: torch.device) -> TilePlan:
    """The plan's tensors on ``device`` (cached)."""
    if device.type == "cpu":
        return plan
    return TilePlan(
        grid=plan.grid,
        num_tiles=plan.num_tiles,
        tile_tokens=plan.tile_tokens,
        key_tokens=plan.key_tokens,
        query_index=plan.query_index.to(device),
        query_ok=plan.query_ok.to(device),
        key_index=plan.key_index.to(device),
        scatter_index=plan.scatter_index.to(device),
        mask=plan.mask.to(device),
        axes=plan.axes,
        bias_extent=plan.bias_extent,
    )


def attend_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TilePlan,
    *,
    bias: torch.Tensor | None,
    scale: float,
    settings: LocalAttentionSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Attention of every tile of queries over its box of keys, under the plan's exact mask.

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)``.
        plan: from :func:`plan_tiles` for this grid.
        bias: relative-position bias table ``(heads, 2k_0 - 1, ...)`` or None.
        scale: multiplies q.k.
        settings: chunking (memory) settings.

    Returns:
        ``(B, *grid, heads, head_dim)``.
    """
    bias_index = None if bias is None else bias_index_of(plan, q.device)
    plan = plan_on_device(plan, q.device)
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    tokens, keys = plan.tile_tokens, plan.key_tokens

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # One copy of the grid per tensor, so every tile gather below reads whole rows.
        x = x.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        return x.reshape(-1, head_dim)  # (B*heads*L, d)

    def rows(index: torch.Tensor, length: int) -> torch.Tensor:
        # index_select on dim 0 of a 2-D tensor is several times faster on CPU than on an
        # inner dim of a 4-D one; offset the index by each (batch, head)'s block of rows.
        offsets = torch.arange(batch * heads, device=index.device) * length
        return (offsets[:, None] + index.reshape(1, -1)).reshape(-1)  # (B*heads*n,)

    length = math.prod(plan.grid)
    q_flat, k_flat, v_flat = heads_first(q), heads_first(k), heads_first(v)
    mask = plan.mask_as(q.dtype).unsqueeze(0)  # (1, T, t, S)
    if bias is not None:
        table = bias.reshape(heads, -1).to(q.dtype)  # (heads, R)
        mask = mask + table[:, bias_index]  # (heads, T, t, S)

    query_index = plan.query_index.view(plan.num_tiles, tokens)
    key_index = plan.key_index.view(plan.num_tiles, keys)
    per_tile = batch * heads * tokens * keys
    chunk = max(1, settings.max_chunk_logits // per_tile)
    outputs = []
    for first in range(0, plan.num_tiles, chunk):
        last = min(first + chunk, plan.num_tiles)
        count = last - first

        def gather(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
            x = x.index_select(0, rows(index[first:last], length))  # (B*heads*c*n, d)
            return x.view(batch, heads, count, n, head_dim)

        # attend_windows sees heads as its "windows" axis and tiles as its "heads" axis: the
        # mask then broadcasts over batch and heads without a copy.
        out = attend_windows(
            gather(q_flat, query_index, tokens),
            gather(k_flat, key_index, keys),
            gather(v_flat, key_index, keys),
            mask[:, first:last],
            scale,
        )  # (B, heads, c, t, d)
        outputs.append(out.reshape(batch, heads, count * tokens, head_dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # (B, heads, T*t, d)
    slots = plan.num_tiles * tokens
    out = out.reshape(-1, head_dim).index_select(0, rows(plan.scatter_index, slots))
    out = out.view(batch, heads, length, head_dim)  # (B, heads, L, d)
    return out.transpose(1, 2).reshape(q.shape)  # (B, *grid, heads, d)


# (B, *grid, heads, d)
