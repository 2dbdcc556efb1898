"""``sequence_window_attention``: blocked or sliding windowed attention over 1-D sequences,
optionally causal, optionally with sink tokens (the first tokens, visible to every query)."""

from __future__ import annotations

import torch

from .checks import check_qkv, empty_attention
from .functional import window_attention
from .tiles import (
    LocalAttentionSettings,
    attend_tiles,
    blocked_axis,
    neighborhood_axis,
    plan_tiles,
    resolve_settings,
    with_sink_keys,
)

MODES = ("blocked", "sliding")


def sequence_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    *,
    mode: str = "sliding",
    is_causal: bool = False,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    settings: LocalAttentionSettings | None = None,
) -> torch.Tensor:
    """Local attention over a sequence ``(B, L, heads, head_dim)``.

    Modes:
        ``"blocked"``: the sequence is cut into blocks of ``window_size`` (the last may be
        shorter); a query sees its block (= 1-D :func:`window_attention`).
        ``"sliding"``: a query sees the ``window_size`` tokens centred on it, shifted inwards at
        the ends (= 1-D :func:`neighborhood_attention`; ``window_size`` odd).

    With ``is_causal`` a query sees only keys at or before itself: in sliding mode the
    ``window_size`` tokens ending at the query (fewer at the start), in blocked mode the part of
    its block up to itself. With ``num_sink_tokens = s`` every query also sees tokens
    ``0 .. s-1`` (those at or before it when causal), each counted once.

    Args:
        q, k, v: ``(B, L, heads, head_dim)``.
        window_size: block length or sliding-window length, ``1 <= window_size <= L``.
        mode: ``"blocked"`` or ``"sliding"``.
        is_causal: mask keys after the query.
        num_sink_tokens: ``0 <= s <= L`` leading tokens visible to all queries.
        scale: multiplies q.k; default ``head_dim ** -0.5``.
        settings: speed settings of the tiled path.

    Returns:
        ``(B, L, heads, head_dim)``.

    Example:
        >>> q = k = v = torch.randn(1, 100, 4, 16)
        >>> sequence_window_attention(q, k, v, 16, is_causal=True, num_sink_tokens=4).shape
        torch.Size([1, 100, 4, 16])
    """
    check_qkv(q, k, v, ranks=(4,))
    length = q.shape[1]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be an int, got {window_size!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if not 1 <= window_size <= length:
        raise ValueError(
            f"window_size={window_size} does not fit the sequence of length {length}; expected "
            f"1 <= window_size <= {length}"
        )
    if mode == "sliding" and not is_causal and window_size % 2 == 0:
        raise ValueError(
            f"window_size={window_size} is even; a non-causal sliding window is centred on the "
            f"query and needs an odd size"
        )
    if (isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int)
            or not 0 <= num_sink_tokens <= length):
        raise ValueError(
            f"num_sink_tokens={num_sink_tokens!r} must be an int in [0, {length}] (the sequence "
            f"length)"
        )
    if q.numel() == 0:
        return empty_attention(q, k, v)
    if mode == "blocked" and not is_causal and num_sink_tokens == 0:
        return window_attention(q, k, v, window_size, scale=scale)
    settings = resolve_settings(settings)
    if mode == "blocked":
        axis = blocked_axis(length, window_size, is_causal)
    else:
        tile = settings.tile_size if isinstance(settings.tile_size, int) else max(window_size, 16)
        axis = neighborhood_axis(length, window_size, 1, is_causal, tile)
    plan = plan_tiles((length,), (axis,), (2 * window_size - 1,))
    if num_sink_tokens:
        plan = with_sink_keys(plan, num_sink_tokens, is_causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attend_tiles(q, k, v, plan, bias=None, scale=scale, settings=settings)
