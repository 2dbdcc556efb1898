"""Argument checks shared by the local-attention family (neighbourhoods, stripes, globals)."""

from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch

BoolOrTuple = Union[bool, Sequence[bool]]


def is_int(value: object) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ranks=(4, 5, 6)) -> None:
    """q, k, v: tensors of one shape ``(B, *grid, heads, head_dim)``, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() not in ranks:
        axes = f"{ranks[0] - 3} to {ranks[-1] - 3}" if len(ranks) > 1 else f"{ranks[0] - 3}"
        raise ValueError(
            f"q must be laid out (batch, *grid, heads, head_dim) with {axes} grid axes (rank "
            f"{' or '.join(map(str, ranks))}), got rank {q.dim()} with shape {tuple(q.shape)}"
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


def normalize_bools(value: BoolOrTuple, ndim: int, name: str) -> tuple[bool, ...]:
    """Return ``value`` as a tuple of ``ndim`` bools, broadcasting a bool to every axis."""
    if isinstance(value, bool):
        return (value,) * ndim
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a bool or a tuple of {ndim} bools, got {value!r}"
        ) from None
    if len(items) != ndim or not all(isinstance(i, bool) for i in items):
        raise ValueError(
            f"{name} must be a bool or a tuple of {ndim} bools (one per grid axis), got {value!r}"
        )
    return items


def check_bias(bias: object, q: torch.Tensor) -> None:
    """An additive bias: a floating tensor on q's device (its shape is the caller's check).

    A boolean tensor is refused rather than added as 0/1: SDPA's boolean masks mean
    "allowed", and a user bringing one would get +1 on the allowed pairs, silently."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        hint = (
            "; to allow only some pairs, pass an additive bias such as "
            "torch.zeros(shape).masked_fill(~allowed, float('-inf'))"
            if bias.dtype == torch.bool
            else ""
        )
        raise TypeError(
            f"bias must be a floating tensor (added to the logits), got {bias.dtype}{hint}"
        )
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device}, expected q's device {q.device}")


def empty_attention(q: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The output of attention on empty inputs (a batch, grid axis, head count or head size of
    0): an empty tensor shaped as ``q``, as SDPA gives, still connected to every input so that
    a backward through it runs (and gives empty gradients)."""
    out = q * 0
    for t in others:
        out = out + t.sum() * 0
    return out
