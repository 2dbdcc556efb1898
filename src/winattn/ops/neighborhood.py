"""``neighborhood_attention``: NAT / DiNAT neighbourhood attention on 1-D, 2-D and 3-D grids."""

from __future__ import annotations

import torch

from .checks import BoolOrTuple, check_bias, check_qkv, empty_attention, normalize_bools
from .geometry import IntOrTuple, normalize_tuple
from .tiles import (
    LocalAttentionSettings,
    attend_tiles,
    neighborhood_axis,
    plan_tiles,
    resolve_settings,
)


def check_neighborhood(
    grid: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
) -> None:
    """Raise a ValueError naming the axis when a kernel or dilation does not fit the grid."""
    for axis, (n, k, d, causal) in enumerate(zip(grid, kernel_size, dilation, is_causal)):
        if k < 1:
            raise ValueError(f"kernel_size[{axis}] must be >= 1, got {k}")
        if not causal and k % 2 == 0:
            raise ValueError(
                f"kernel_size[{axis}]={k} is even; expected an odd kernel size (the neighbourhood "
                f"is centred on the query) unless is_causal[{axis}] is True"
            )
        if d < 1:
            raise ValueError(f"dilation[{axis}] must be >= 1, got {d}")
        if k > n:
            raise ValueError(
                f"kernel_size[{axis}]={k} is larger than the grid ({n} along axis {axis}); "
                f"expected a kernel of at most the grid size"
            )
        if k * d > n:
            raise ValueError(
                f"dilation[{axis}]={d} leaves some queries fewer than kernel_size[{axis}]={k} "
                f"keys along axis {axis} (size {n}: the smallest dilation group has {n // d} "
                f"positions); expected kernel_size * dilation <= {n}"
            )


def neighborhood_tile_size(
    kernel_size: tuple[int, ...], settings: LocalAttentionSettings
) -> tuple[int, ...]:
    if settings.tile_size is None:
        return tuple(max(k, 4) for k in kernel_size)
    return normalize_tuple(settings.tile_size, len(kernel_size), "settings.tile_size")


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    *,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    settings: LocalAttentionSettings | None = None,
) -> torch.Tensor:
    """Neighbourhood attention (NAT), with dilation (DiNAT) and optional causal masking per axis.

    Along each axis of size ``n`` with kernel ``k`` and dilation ``d``, the positions congruent
    to a query's position modulo ``d`` form its dilation group; within that group (indexed
    ``0 .. n_g - 1``) the query at group index ``i`` sees the ``k`` positions starting at
    ``clamp(i - k // 2, 0, n_g - k)``: the window is centred on the query and shifted inwards at
    the borders, so every query sees exactly ``k`` keys per axis (NATTEN's definition). With
    ``is_causal`` on an axis it sees ``max(i - k + 1, 0) .. i`` instead. In several dimensions a
    query sees the product of its per-axis neighbourhoods.

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)`` with 1, 2 or 3 grid axes.
        kernel_size: neighbourhood extent per axis (int or tuple); odd unless causal on that
            axis; ``kernel_size * dilation <= grid`` per axis.
        dilation: per axis, ``>= 1``.
        is_causal: bool or one per axis.
        bias: relative-position bias ``(heads, 2k_0 - 1, ..., 2k_{n-1} - 1)``, NATTEN's ``rpb``:
            the logit of query ``i`` and key ``j`` gets ``bias[h, (j_0 - i_0) / d_0 + k_0 - 1,
            ...]`` (offsets in group units). Not defined with causal masking.
        scale: multiplies q.k; default ``head_dim ** -0.5``.
        settings: speed settings of the tiled path (:class:`LocalAttentionSettings`).

    Returns:
        ``(B, *grid, heads, head_dim)``.

    Example:
        >>> q = k = v = torch.randn(2, 15, 17, 4, 32)
        >>> neighborhood_attention(q, k, v, 7, dilation=2).shape
        torch.Size([2, 15, 17, 4, 32])
    """
    check_qkv(q, k, v)
    grid = tuple(q.shape[1:-2])
    ndim = len(grid)
    kernel = normalize_tuple(kernel_size, ndim, "kernel_size")
    dil = normalize_tuple(dilation, ndim, "dilation")
    causal = normalize_bools(is_causal, ndim, "is_causal")
    check_neighborhood(grid, kernel, dil, causal)
    extent = tuple(2 * kk - 1 for kk in kernel)
    if bias is not None:
        check_bias(bias, q)
        expected = (q.shape[-2], *extent)
        if any(causal):
            raise ValueError(
                f"bias (relative-position bias) is not defined with causal masking, got "
                f"is_causal={causal}; expected bias=None or is_causal=False on every axis"
            )
        if tuple(bias.shape) != expected:
            raise ValueError(
                f"bias must have shape (heads, 2k-1 per axis) = {expected} for kernel_size "
                f"{kernel}, got {tuple(bias.shape)}"
            )
    if q.numel() == 0:
        return empty_attention(q, k, v, *([] if bias is None else [bias]))
    settings = resolve_settings(settings)
    tiles = neighborhood_tile_size(kernel, settings)
    axes = tuple(
        neighborhood_axis(n, kk, d, c, t)
        for n, kk, d, c, t in zip(grid, kernel, dil, causal, tiles)
    )
    plan = plan_tiles(grid, axes, extent)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attend_tiles(q, k, v, plan, bias=bias, scale=scale, settings=settings)
