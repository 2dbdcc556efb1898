"""Attention layers of the local-attention family: each owns its qkv / output projections and
position-bias parameters and calls one functional of :mod:`winattn.ops`.

All take and return channels-last tokens on their grid, ``(B, *grid, C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional import window_attention
from ..ops.geometry import IntOrTuple, normalize_tuple
from ..ops.global_tokens import window_attention_with_globals
from ..ops.neighborhood import neighborhood_attention
from ..ops.sequence import sequence_window_attention
from ..ops.stamps import tensor_cache
from ..ops.stripes import cross_shaped_window_attention
from ..ops.tiles import LocalAttentionSettings


class _QKVAttention(nn.Module):
    """Shared part: a fused ``qkv`` projection (rows ordered (3, heads, head_dim)) and ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, *grid, C)`` -> q, k, v each ``(B, *grid, heads, head_dim)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}), expected the layer's "
                f"dim={self.dim} on the last axis: (batch, *grid, {self.dim})"
            )
        qkv = self.qkv(x).view(*x.shape[:-1], 3, self.num_heads, self.head_dim)
        return qkv.unbind(-3)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, *grid, heads, head_dim)`` -> projected ``(B, *grid, C)``."""
        return self.proj(out.flatten(-2))


class NeighborhoodAttention(_QKVAttention):
    """NAT / DiNAT neighbourhood attention on a 1-D, 2-D or 3-D grid.

    Parameters follow NATTEN's modules: ``qkv``, ``rpb`` (``(heads, 2k-1, ...)``, when
    ``rel_pos_bias``), ``proj``.

    Example:
        >>> layer = NeighborhoodAttention(64, 4, kernel_size=7, dilation=2)
        >>> layer(torch.randn(2, 20, 24, 64)).shape
        torch.Size([2, 20, 24, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        *,
        ndim: int = 2,
        dilation: IntOrTuple = 1,
        is_causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        settings: LocalAttentionSettings | None = None,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        self.kernel_size = normalize_tuple(kernel_size, ndim, "kernel_size")
        self.dilation = normalize_tuple(dilation, ndim, "dilation")
        self.is_causal = is_causal
        self.settings = settings
        causal_any = is_causal if isinstance(is_causal, bool) else any(is_causal)
        if rel_pos_bias and causal_any:
            raise ValueError(
                "rel_pos_bias=True is not defined with causal masking; pass rel_pos_bias=False"
            )
        self.rpb = None
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        out = neighborhood_attention(
            q,
            k,
            v,
            self.kernel_size,
            dilation=self.dilation,
            is_causal=self.is_causal,
            bias=self.rpb,
            scale=self.scale,
            settings=self.settings,
        )
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, is_causal={self.is_causal}"
        )


class CrossShapedWindowAttention(_QKVAttention):
    """CSWin's cross-shaped window attention on a 2-D grid: half the heads in vertical stripes,
    half in horizontal ones (see :func:`~winattn.ops.stripes.cross_shaped_window_attention`).
    CSWin's LePE term (a depthwise conv on v added to the output) belongs to the model.

    Example:
        >>> layer = CrossShapedWindowAttention(64, 4, stripe_width=2)
        >>> layer(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, stripe_width: int, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        self.stripe_width = stripe_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        out = cross_shaped_window_attention(q, k, v, self.stripe_width, scale=self.scale)
        return self.merge_heads(out)


@tensor_cache(maxsize=64)
def relative_position_index_nd(window_size: tuple[int, ...]) -> torch.Tensor:
    """``(N, N)`` index into a ``prod(2w - 1)``-row bias table, Swin / Video Swin's layout:
    per axis the offset ``key - query + w - 1``, combined row-major over the axes."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(w) for w in window_size], indexing="ij")
    ).flatten(1)  # (ndim, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (ndim, N, N)
    index = torch.zeros(relative.shape[1:], dtype=torch.long)
    for axis, w in enumerate(window_size):
        index = index * (2 * w - 1) + relative[axis] + w - 1
    return index


class WindowAttentionND(_QKVAttention):
    """(Shifted) window attention on a 1-D, 2-D or 3-D grid with a relative-position bias table
    (Video Swin's ``WindowAttention3D`` for 3-D windows such as (8, 7, 7)).

    Parameters keep Swin's names: ``qkv``, ``proj``, ``relative_position_bias_table``
    (``prod(2w - 1)`` rows, ``heads`` columns).

    Example:
        >>> layer = WindowAttentionND(48, 3, window_size=(2, 7, 7), shift_size=(1, 3, 3))
        >>> layer(torch.randn(1, 4, 14, 14, 48)).shape
        torch.Size([1, 4, 14, 14, 48])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: IntOrTuple,
        shift_size: IntOrTuple = 0,
        qkv_bias: bool = True,
        *,
        ndim: int = 2,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        # A sequence gives the grid's rank; an int is the window on each of ``ndim`` axes.
        axes = len(window_size) if isinstance(window_size, (tuple, list)) else ndim
        self.window_size = normalize_tuple(window_size, axes, "window_size")
        self.shift_size = normalize_tuple(shift_size, len(self.window_size), "shift_size")
        rows = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index",
            relative_position_index_nd(self.window_size).clone(),
            persistent=False,
        )

    def relative_position_bias(self) -> torch.Tensor:
        tokens = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        out = window_attention(
            q,
            k,
            v,
            self.window_size,
            shift_size=self.shift_size,
            bias=self.relative_position_bias(),
            scale=self.scale,
        )
        return self.merge_heads(out)


class GlobalTokenWindowAttention(WindowAttentionND):
    """Window attention in which every query also sees global tokens: ``num_learned_tokens``
    learned tokens and, with ``pool_size``, the grid average-pooled by ``pool_size`` (HiLo's
    Lo-Fi keys). Globals get their own ``global_kv`` projection; the merge is exact
    (:func:`~winattn.ops.global_tokens.window_attention_with_globals`).

    Example:
        >>> layer = GlobalTokenWindowAttention(64, 4, (7, 7), num_learned_tokens=2, pool_size=7)
        >>> layer(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: IntOrTuple,
        shift_size: IntOrTuple = 0,
        *,
        num_learned_tokens: int = 0,
        pool_size: IntOrTuple | None = None,
        qkv_bias: bool = True,
        ndim: int = 2,
    ) -> None:
        super().__init__(dim, num_heads, window_size, shift_size, qkv_bias, ndim=ndim)
        if num_learned_tokens == 0 and pool_size is None:
            raise ValueError("expected num_learned_tokens > 0 or a pool_size: no global tokens")
        self.pool_size = pool_size
        self.global_tokens = None
        if num_learned_tokens:
            self.global_tokens = nn.Parameter(torch.zeros(num_learned_tokens, dim))
            nn.init.trunc_normal_(self.global_tokens, std=0.02)
        self.global_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def globals_of(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *grid, C)`` -> the global tokens ``(B, G, C)``."""
        parts = []
        if self.global_tokens is not None:
            parts.append(self.global_tokens.expand(x.shape[0], -1, -1))
        if self.pool_size is not None:
            ndim = x.dim() - 2
            pool = normalize_tuple(self.pool_size, ndim, "pool_size")
            pool_fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[ndim - 1]
            channels_first = x.movedim(-1, 1)  # (B, C, *grid)
            pooled = pool_fn(channels_first, pool, pool, ceil_mode=True)  # (B, C, *grid/pool)
            parts.append(pooled.flatten(2).transpose(1, 2))  # (B, G, C)
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        tokens = self.globals_of(x)
        kv = self.global_kv(tokens).view(*tokens.shape[:2], 2, self.num_heads, self.head_dim)
        global_k, global_v = kv.unbind(2)  # each (B, G, heads, d)
        out = window_attention_with_globals(
            q,
            k,
            v,
            self.window_size,
            global_k,
            global_v,
            shift_size=self.shift_size,
            bias=self.relative_position_bias(),
            scale=self.scale,
        )
        return self.merge_heads(out)


class SequenceWindowAttention(_QKVAttention):
    """Blocked or sliding windowed attention over sequences ``(B, L, C)``, optionally causal and
    with sink tokens (see :func:`~winattn.ops.sequence.sequence_window_attention`).

    Example:
        >>> layer = SequenceWindowAttention(64, 4, 33, is_causal=True, num_sink_tokens=4)
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        mode: str = "sliding",
        is_causal: bool = False,
        num_sink_tokens: int = 0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        self.window_size = window_size
        self.mode = mode
        self.is_causal = is_causal
        self.num_sink_tokens = num_sink_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        out = sequence_window_attention(
            q,
            k,
            v,
            self.window_size,
            mode=self.mode,
            is_causal=self.is_causal,
            num_sink_tokens=self.num_sink_tokens,
            scale=self.scale,
        )
        return self.merge_heads(out)
