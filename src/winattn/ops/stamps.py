"""Whether a tensor cached from parameters is still current: the parameters' storage and
version counters (an in-place update or a new ``.data`` changes them), a sample of their
content (an update written through ``.data`` moves no version counter) and their identity (a
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

import ctypes
import functools
import weakref
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


#: Parameters up to this many bytes are compared whole by :func:`parameter_stamp` (biases,
#: norms, logit scales and Swin V1's bias tables); larger ones by their first and last 8 bytes.
WHOLE_BYTES = 16 * 1024

_word = ctypes.c_uint64.from_address


def _stamp(p: torch.Tensor) -> tuple:
    """``p``'s address, version counter and a sample of its data that an in-place update
    through ``p.data`` (which leaves ``p``'s version counter alone) would change: all of its
    bytes for a small CPU tensor, its first and last 8 for a larger one, nothing off the CPU
    or for a tensor that is not one plain block (about 0.2-0.4 us for the sample)."""
    ptr = p.data_ptr()
    if not p.is_cpu or not p.is_contiguous():
        return ptr, p._version
    size = p.nbytes
    if size <= WHOLE_BYTES:
        return ptr, p._version, ctypes.string_at(ptr, size)
    return ptr, p._version, _word(ptr).value, _word(ptr + size - 8).value


def parameter_stamp(params: Sequence[torch.Tensor | None]) -> tuple:
    """:func:`_stamp` of each of ``params``: changes when one is updated in place (the
    version counter), its data replaced (the address), or written through ``.data`` (which
    has a version counter of its own: an EMA update such as ``p.data.mul_(d).add_(...)``
    moves none) as far as the sample sees. Unseen: an update through ``.data`` that leaves a
    large parameter's first and last 8 bytes as they were, and any update through ``.data``
    off the CPU. ``torch.no_grad()`` with ``p.copy_(...)``, ``load_state_dict`` and optimiser
    steps move the version counter and are always seen."""
    return tuple([None if p is None else _stamp(p) for p in params])


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


def cached_per_tensor(
    entries: dict, tensor: torch.Tensor, build: Callable[[], T], keep: bool = True
) -> T:
    """``build()`` for ``tensor``, kept in ``entries`` (keyed by its ``id``) while that tensor
    lives at the same version: for values derived from a tensor that callers keep and pass
    again (the models' cached eval masks). A tensor that reuses a dead one's ``id`` is told
    apart by a weak reference; entries of dead tensors go when a new one is kept. With
    ``keep`` False (a tensor built afresh on every call) a hit is still served, nothing is
    kept. Built outside inference mode, as :func:`tensor_cache` builds."""
    key = id(tensor)
    hit = entries.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    with torch.inference_mode(False):
        value = build()
    if keep:
        for dead in [k for k, (ref, _, _) in entries.items() if ref() is None]:
            del entries[dead]
        entries[key] = (weakref.ref(tensor), tensor._version, value)
    return value

