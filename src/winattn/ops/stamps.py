"""Whether a tensor cached from parameters is still current: the parameters' storage and
version counters (an in-place update or a new ``.data`` changes them) and their identity (a
replaced parameter can reuse the freed one's address, and ``id()``, with the same version).

Every cache of tensors derived from weights (the eval-time masks and position biases, the
prepared inference weights) checks both, through :func:`cached_by_parameters` or, where the
entries need their own policy, :func:`parameter_stamp` and :func:`same_parameters`.

Every cached tensor is built outside inference mode (:func:`tensor_cache`, and the builders
called here), even when the first call that asks for it runs inside it: an inference tensor
cannot be saved for backward, so a cache filled during ``torch.inference_mode()`` evaluation
would break every later call with autograd on, in any model of the process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Fn = TypeVar("Fn", bound=Callable[..., Any])

#: Every :func:`tensor_cache` function, for :func:`clear_tensor_caches`.
_TENSOR_CACHES: list[Any] = []


def clear_tensor_caches() -> None:
    """Empty every :func:`tensor_cache` (plans, index maps, masks built from sizes); the next
    calls build them again. For tests and to free memory; never needed for correctness."""
    for cached in _TENSOR_CACHES:
        cached.cache_clear()


def tensor_cache(maxsize: int | None) -> Callable[[Fn], Fn]:
    """:func:`functools.lru_cache` for a function that builds tensors (plans, index maps,
    masks), running it outside inference mode: its tensors are then ordinary ones, usable by
    later calls that autograd records whatever mode the first call ran in."""

    def decorate(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def build(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        cached = functools.lru_cache(maxsize=maxsize)(build)
        _TENSOR_CACHES.append(cached)
        return cached  # type: ignore[return-value]

    return decorate


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
        with torch.inference_mode(False):
            hit = entries[key] = (params, stamp, build())
    return hit[2]
