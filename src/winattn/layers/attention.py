"""Window attention layers: qkv and output projections around the windowed-attention operator."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..ops import WindowPlan, window_attention
from ..ops.backends.sdpa import (
    ExpandedMaskCache,
    attend_qkv,
    combine_mask,
    explicit_attention,
    mask_rows,
    prefers_matmuls,
)
from ..ops.traceable import TracedWindows, traceable_window_attention
from . import fused, fused_attention, fused_norm
from .position import relative_position_index


class WindowAttention(nn.Module):
    """Swin V1 window attention with a learned relative-position bias table.

    Parameters keep the reference names: ``qkv`` (fused, rows ordered (3, heads, head_dim)),
    ``proj`` and ``relative_position_bias_table`` of shape ``((2Wh-1)*(2Ww-1), heads)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = tuple(window_size)
        table_rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Eval-time cache of the folded bias + shift mask, batch-expanded.
        self._mask_cache = ExpandedMaskCache()

    def relative_position_bias(self, window_size: tuple[int, int]) -> torch.Tensor:
        """``(heads, N, N)`` bias for ``window_size`` (at most the table's window)."""
        index = relative_position_index(tuple(window_size), self.window_size)
        index = index.to(self.relative_position_bias_table.device)
        tokens = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)]  # (N*N, heads)
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)  # (heads, N, N)

    def forward(
        self,
        x: torch.Tensor,
        window_size: tuple[int, int],
        shift_size: tuple[int, int] | TracedWindows,
    ) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``; H and W are multiples of the window.

        ``shift_size`` is the shift per axis, or, on the shape-generic path of a traced call,
        the block's window decision as tensors (:class:`~winattn.ops.traceable.TracedWindows`).
        """
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).view(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # each (B, H, W, heads, d)
        bias = self.relative_position_bias(window_size)
        if isinstance(shift_size, TracedWindows):
            # A shrunk window is the full one with keys excluded: the full window's bias.
            out = traceable_window_attention(
                q, k, v, window_size, shift_size.shift, bias, self.scale, shift_size.key_limit
            )
        else:
            out = window_attention(
                q, k, v, window_size, shift_size=shift_size, bias=bias, scale=self.scale
            )  # (B, H, W, heads, d)
        return self.proj_drop(self.proj(out.reshape(batch, height, width, channels)))

    def window_mask(self, plan: WindowPlan, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias + shift mask of ``plan`` folded into one ``(nW or 1, heads, N, N)`` tensor."""
        bias = self.relative_position_bias(plan.window_size)
        return combine_mask(plan.mask_as(dtype), bias, dtype)

    def _cached_mask(self, plan: WindowPlan, dtype: torch.dtype, rows: int) -> torch.Tensor | None:
        """:meth:`window_mask` expanded to ``rows`` windows, cached until the table changes."""
        build = functools.partial(self.window_mask, plan, dtype)
        return self._mask_cache.get(plan, dtype, rows, [self.relative_position_bias_table], build)

    def forward_windows(
        self,
        x: torch.Tensor,
        plan: WindowPlan,
        norm: nn.Module | None = None,
        padding: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention on tokens already in ``plan``'s window order.

        Args:
            x: ``(B, L, C)``, ``L = num_windows * N``, window-major (``plan.partition``'s
                order); ``plan.grid`` is the (padded) map, a multiple of the window.
            norm: applied to ``x`` first (the block's pre-norm), fused with the qkv
                projection so that training does not keep its output; or None.
            padding: ``(L, 1)``, True on padded slots, zeroed after ``norm``; or None.
            residual: ``(B, L, C)`` added to the output (inside the projection's oneDNN
                call in eval; the projection's dropout is then not applied), or None.

        Returns:
            ``(B, L, C)`` in the same order.
        """
        batch, length, channels = x.shape
        windows, tokens = plan.num_windows, plan.window_tokens
        if norm is not None:
            qkv = fused_norm.norm_linear(x, norm, self.qkv, padding)  # (B, L, 3C)
        elif padding is not None:
            qkv = fused.linear(x.masked_fill(padding, 0.0), self.qkv)
        else:
            qkv = fused.linear(x, self.qkv)
        # (B*nW, N, 3, heads, d): q, k and v are strided views of it, never copied out.
        qkv5 = qkv.view(batch * windows, tokens, 3, self.num_heads, self.head_dim)
        table = self.relative_position_bias_table
        if torch.is_grad_enabled() and table.requires_grad:
            mask = self.window_mask(plan, qkv.dtype)  # rebuilt: the table needs its gradient
        else:
            rows = mask_rows(*fused_attention.unbind_qkv(qkv5), batch * windows, windows)
            mask = self._cached_mask(plan, qkv.dtype, rows)
        rows = None if residual is None else residual.view(batch * windows, tokens, channels)
        out = fused_attention.attend_project(qkv5, mask, self.scale, self.proj, rows)
        out = out.view(batch, length, channels)  # (B*nW, N, C) -> (B, L, C)
        return out if residual is not None else self.proj_drop(out)

    def infer_attention(self, qkv: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """Attention inside ``plan``'s windows on the qkv projection's output ``(B, L, 3C)``
        (tokens in window order), without gradients: SDPA on views of ``qkv``
        (:func:`attend_qkv`), the cached mask; returns ``(B, L, C)``, the projection's input."""
        batch, length, width = qkv.shape
        rows = batch * plan.num_windows
        q, k, v = fused_attention.unbind_qkv(
            qkv.view(rows, plan.window_tokens, 3, self.num_heads, self.head_dim)
        )
        mask = self._cached_mask(plan, qkv.dtype, mask_rows(q, k, v, rows, plan.num_windows))
        out = attend_qkv(q, k, v, mask, self.scale)
        return out.view(batch, length, width // 3)

    def forward_window_rows(self, x: torch.Tensor, plan: WindowPlan, first: int) -> torch.Tensor:
        """Inference on a run of whole windows of ``plan``, without gradients.

        Args:
            x: ``(rows, N, C)``: windows ``first .. first + rows - 1`` of one image, or whole
                images (``first == 0`` and ``rows`` a multiple of ``plan.num_windows``).

        Returns:
            ``(rows, N, C)``. Attention through :func:`explicit_attention` where
            :func:`prefers_matmuls` (bfloat16 on a CPU without AMX), else SDPA.
        """
        rows, tokens, channels = x.shape
        qkv = fused.linear(x, self.qkv)  # (rows, N, 3C)
        qkv = qkv.view(rows, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = fused_attention.unbind_qkv(qkv)  # each (rows, heads, N, d), strided views
        windows = plan.num_windows
        mask = self._cached_mask(plan, torch.float32, windows)  # (nW or 1, heads, N, N)
        if mask is not None and mask.shape[0] == windows and rows < windows:
            mask = mask[first : first + rows]
        if prefers_matmuls(q):
            out = explicit_attention(q, k, v, mask, self.scale)
        else:
            out = attend_qkv(q, k, v, None if mask is None else mask.to(q.dtype), self.scale)
        return self.proj_drop(fused.linear(out.view(rows, tokens, channels), self.proj))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
