"""Backends of the windowed-attention operator, and the dispatcher that picks one.

Each backend is an object with a ``name``, ``supports(call) -> list[str]`` (the reasons it
cannot serve the call; empty when it can) and ``forward(call) -> Tensor``. The dispatcher tries
them in order; ``WINATTN_BACKEND=<name>`` (or ``backend=`` on the call) forces one.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch

from ..call import AttentionCall
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton_window import TritonBackend

logger = logging.getLogger("winattn.ops")


class Backend(Protocol):
    name: str

    def supports(self, call: AttentionCall) -> list[str]: ...

    def forward(self, call: AttentionCall) -> torch.Tensor: ...


#: In order of preference. Fused kernels register themselves in front with ``register_backend``.
BACKENDS: list[Backend] = [SdpaBackend(), ReferenceBackend()]


def register_backend(backend: Backend, *, first: bool = True) -> None:
    """Add a backend to the dispatcher (in front by default), replacing one of the same name."""
    BACKENDS[:] = [b for b in BACKENDS if b.name != backend.name]
    BACKENDS.insert(0 if first else len(BACKENDS), backend)


# In front, always: where triton is missing or the tensors are not on CUDA it refuses and says
# why, so a forced backend="triton" explains itself.
register_backend(TritonBackend(), first=True)


def backend_names() -> list[str]:
    return [b.name for b in BACKENDS]


def forced_backend(backend: str | None = None) -> str | None:
    """The backend a call is forced onto: ``backend`` if given, else ``WINATTN_BACKEND``, else
    None (the dispatcher chooses)."""
    return backend or os.environ.get("WINATTN_BACKEND") or None


class NoBackendError(RuntimeError):
    """No backend can serve a call; the message holds every backend's reasons."""


def select_backend(call: AttentionCall, backend: str | None = None) -> Backend:
    """Pick the backend for ``call``: the one named (argument, then ``WINATTN_BACKEND``), else the
    first that supports it.

    Raises:
        ValueError: the name matches no backend.
        NoBackendError: the chosen or every backend refused; the message lists why.
    """
    forced = forced_backend(backend)
    if forced is not None:
        candidates = [b for b in BACKENDS if b.name == forced]
        if not candidates:
            raise ValueError(f"backend={forced!r} is not one of {backend_names()}")
    else:
        candidates = BACKENDS
    reasons: dict[str, list[str]] = {}
    for candidate in candidates:
        refusals = candidate.supports(call)
        if not refusals:
            if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
                logger.debug("window_attention: backend %s for %s", candidate.name, _describe(call))
            return candidate
        reasons[candidate.name] = refusals
    lines = "\n".join(f"  {name}: {'; '.join(why)}" for name, why in reasons.items())
    raise NoBackendError(f"no windowed-attention backend can serve {_describe(call)}:\n{lines}")


def _describe(call: AttentionCall) -> str:
    plan = call.plan
    return (
        f"q {tuple(call.q.shape)} {call.q.dtype} on {call.q.device}, window {plan.window_size}, "
        f"shift {plan.shift_size}"
    )
