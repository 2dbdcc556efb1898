"""Whether a tensor cached from parameters is still current: the parameters' storage and
version counters (an in-place update or a new ``.data`` changes them) and their identity (a
replaced parameter can reuse the freed one's address, and ``id()``, with the same version).

Every cache of tensors derived from weights (the eval-time masks and position biases, the
prepared inference weights) checks both, through :func:`cached_by_parameters` or, where the
entries need their own policy, :func:`parameter_stamp` and :func:`same_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def parameter_stamp(params: Sequence[torch.Tensor | None]) -> tuple:
    """Storage and version of each of ``params``: changes when one is updated in place or its
    data replaced."""
    return tuple([None if p is None else (p.data_ptr(), p._version) for p in params])


def same_parameters(
    held: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor | None]
) -> bool:
    """Whether ``held`` and ``params`` are the same objects, one for one."""
    return len(held) == len(params) and all(a is b for a, b in zip(held, params))


def cached_by_parameters(entries: dict, key: object, params: list, build: Callable[[], T]) -> T:
    """``build()``, kept in ``entries[key]`` until one of ``params`` changes: its
    :func:`parameter_stamp`, or its identity (the entry holds ``params`` themselves, so that
    a replaced parameter cannot pass for the old one by reusing its freed address)."""
    stamp = parameter_stamp(params)
    hit = entries.get(key)
    if hit is None or hit[1] != stamp or not same_parameters(hit[0], params):
        hit = entries[key] = (params, stamp, build())
    return hit[2]
