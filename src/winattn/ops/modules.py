"""A thin ``nn.Module`` over :func:`window_attention`, holding the window geometry."""

from __future__ import annotations

import torch
from torch import nn

from .functional import window_attention
from .geometry import IntOrTuple


class WindowAttentionOp(nn.Module):
    """``window_attention`` with its window and shift fixed at construction.

    Example:
        >>> op = WindowAttentionOp(window_size=7, shift_size=3)
        >>> q = torch.randn(1, 14, 14, 2, 16)
        >>> op(q, q, q).shape
        torch.Size([1, 14, 14, 2, 16])
    """

    def __init__(
        self, window_size: IntOrTuple, shift_size: IntOrTuple = 0, backend: str | None = None
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        return window_attention(
            q,
            k,
            v,
            self.window_size,
            shift_size=self.shift_size,
            bias=bias,
            scale=scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"
