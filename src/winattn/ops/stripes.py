"""``cross_shaped_window_attention``: CSWin's cross-shaped windows, built on ``window_attention``.

Stripes and rectangles need nothing new: ``window_attention`` takes a different extent per axis,
so a stripe of width ``sw`` spanning the height is the window ``(H, sw)``.
"""

from __future__ import annotations

import torch

from .checks import check_qkv
from .functional import window_attention


def cross_shaped_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stripe_width: int,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """CSWin's cross-shaped window self-attention on a 2-D grid.

    The heads are split in two halves, in CSWin's order: the first half attends inside vertical
    stripes (width ``stripe_width``, full height: window ``(H, sw)``), the second half inside
    horizontal stripes (height ``sw``, full width: window ``(sw, W)``). A grid not divisible by
    ``sw`` gets a narrower last stripe (the operator's padding, with padded keys excluded).
    CSWin's LePE positional term acts on v outside the attention and is the model's business.

    Args:
        q, k, v: ``(B, H, W, heads, head_dim)``, ``heads`` even.
        stripe_width: ``1 <= sw <= min(H, W)``.
        scale: multiplies q.k; default ``head_dim ** -0.5``.
        backend: forwarded to :func:`window_attention`.

    Returns:
        ``(B, H, W, heads, head_dim)``.

    Example:
        >>> q = k = v = torch.randn(1, 14, 14, 4, 16)
        >>> cross_shaped_window_attention(q, k, v, 2).shape
        torch.Size([1, 14, 14, 4, 16])
    """
    check_qkv(q, k, v, ranks=(5,))
    height, width, heads = q.shape[1], q.shape[2], q.shape[3]
    if heads % 2:
        raise ValueError(
            f"q has {heads} heads; cross-shaped windows split the heads in two halves, expected "
            f"an even number of heads"
        )
    if isinstance(stripe_width, bool) or not isinstance(stripe_width, int):
        raise TypeError(f"stripe_width must be an int, got {stripe_width!r}")
    if not 1 <= stripe_width <= min(height, width):
        raise ValueError(
            f"stripe_width={stripe_width} does not fit the grid {height}x{width}; expected "
            f"1 <= stripe_width <= {min(height, width)}"
        )
    half = heads // 2
    vertical = window_attention(
        q[..., :half, :],
        k[..., :half, :],
        v[..., :half, :],
        (height, stripe_width),
        scale=scale,
        backend=backend,
    )
    horizontal = window_attention(
        q[..., half:, :],
        k[..., half:, :],
        v[..., half:, :],
        (stripe_width, width),
        scale=scale,
        backend=backend,
    )
    return torch.cat([vertical, horizontal], dim=-2)  # (B, H, W, heads, d)
