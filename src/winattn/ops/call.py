"""The arguments of one windowed-attention call, validated, as every backend receives them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import WindowPlan


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One call: q, k, v in grid layout ``(B, *grid, heads, head_dim)`` and its plan.

    Attributes:
        q, k, v: same shape, dtype and device.
        plan: the cached geometry (window, shift, padding, masks).
        bias: ``(heads, N, N)`` additive bias shared by every window, or None.
        scale: the factor applied to q.k (default ``head_dim ** -0.5``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plan: WindowPlan
    bias: torch.Tensor | None
    scale: float

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def needs_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
