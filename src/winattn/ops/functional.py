"""``window_attention``: the one call for windowed self-attention on 1-D, 2-D and 3-D grids."""

from __future__ import annotations

import torch

from .backends import select_backend
from .call import AttentionCall
from .checks import check_bias, empty_attention
from .geometry import IntOrTuple, normalize_tuple, plan_windows
from .traceable import traceable_window_attention, use_traceable_path


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: IntOrTuple,
    *,
    shift_size: IntOrTuple = 0,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Self-attention inside (shifted) windows of a grid, with Swin's exact semantics.

    Each grid axis is padded at its end to a multiple of the window, cyclically shifted by
    ``-shift_size``, and cut into windows; every query attends to the keys of its window.
    Keys from a different shift region get Swin's additive -100; padded keys are excluded.
    The output is shifted back and cropped to the input grid.

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)`` with 1, 2 or 3 grid axes; same shape, dtype
            and device.
        window_size: window extent, an int for every axis or one int per axis;
            ``1 <= window <= grid``.
        shift_size: cyclic shift, an int or one per axis; ``0 <= shift < window``.
        bias: additive ``(heads, N, N)`` per-window bias, ``N = prod(window_size)``, indexed by
            the row-major position inside the window (Swin's relative-position bias).
        scale: multiplies q.k; default ``head_dim ** -0.5``.
        backend: force a backend by name (``"sdpa"``, ``"reference"``, ...); default: the first
            that can serve the call (``WINATTN_BACKEND`` also forces one).

    Returns:
        ``(B, *grid, heads, head_dim)``, q's dtype.

    Example:
        >>> q = k = v = torch.randn(2, 14, 14, 3, 32)
        >>> window_attention(q, k, v, 7, shift_size=3).shape
        torch.Size([2, 14, 14, 3, 32])
    """
    if use_traceable_path(q, backend):
        # Exporters and compilers get the shape-generic path: the cached plans hold index maps
        # built from Python ints, which a trace would freeze to one input size.
        ndim = q.dim() - 3
        window = normalize_tuple(window_size, ndim, "window_size")
        shift = normalize_tuple(shift_size, ndim, "shift_size")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return traceable_window_attention(q, k, v, window, shift, bias, scale)
    call = make_call(q, k, v, window_size, shift_size=shift_size, bias=bias, scale=scale)
    if q.numel() == 0:
        return empty_attention(q, k, v, *([] if bias is None else [bias]))
    return select_backend(call, backend).forward(call)


def make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: IntOrTuple,
    *,
    shift_size: IntOrTuple = 0,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttentionCall:
    """Validate the arguments of :func:`window_attention` and plan its geometry."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() not in (4, 5, 6):
        raise ValueError(
            f"q must be laid out (batch, *grid, heads, head_dim) with 1 to 3 grid axes (rank 4 "
            f"to 6), got rank {q.dim()} with shape {tuple(q.shape)}"
        )
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have one shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    grid = tuple(q.shape[1:-2])
    heads, head_dim = q.shape[-2], q.shape[-1]
    window = normalize_tuple(window_size, len(grid), "window_size")
    shift = normalize_tuple(shift_size, len(grid), "shift_size")
    plan = plan_windows(grid, window, shift, q.device)
    if bias is not None:
        check_bias(bias, q)
        expected = (heads, plan.window_tokens, plan.window_tokens)
        if tuple(bias.shape) != expected:
            raise ValueError(
                f"bias must have shape (heads, N, N) = {expected} for window {window}, got "
                f"{tuple(bias.shape)}"
            )
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        plan=plan,
        bias=bias,
        scale=max(head_dim, 1) ** -0.5 if scale is None else float(scale),
    )
