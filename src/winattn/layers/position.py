"""Relative-position helpers shared by the window-attention layers."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def relative_position_index(
    window_size: tuple[int, int], table_window: tuple[int, int] | None = None
) -> torch.Tensor:
    """Index into a ``(2Wh-1)*(2Ww-1)`` bias table for every (query, key) pair of a window.

    Args:
        window_size: the window actually used, ``(wh, ww)``.
        table_window: the window the table was built for (default: ``window_size``). A smaller
            window reads the central part of a larger table: same offsets, same bias.

    Returns:
        ``(N, N)`` long tensor, ``N = wh * ww``, as the Swin references build it.
    """
    table_window = table_window or window_size
    wh, ww = window_size
    if wh > table_window[0] or ww > table_window[1]:
        raise ValueError(
            f"window {window_size} is larger than the bias table's window {table_window}"
        )
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ).flatten(1)  # (2, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel_h = relative[0] + table_window[0] - 1
    rel_w = relative[1] + table_window[1] - 1
    return rel_h * (2 * table_window[1] - 1) + rel_w  # (N, N)
