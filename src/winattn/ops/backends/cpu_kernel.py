"""winattn's own CPU kernel for attention inside small windows: calls without gradients, and
the forward of the training Functions (whose backward recomputes on its own).

PyTorch's SDPA kernel handles each (window, head) pair of a Swin call as a tiny flash-attention
problem and reaches 60-80 GFLOP/s at 49 tokens on the project's AMX host (docs/fast-path.md,
item 16). ``window_attention.cpp`` (next to this file) does one pair at a time with 16 queries in
the vector lanes, so the softmax needs no horizontal reductions: at Swin-T's stage 1, batch 8,
55-65% of SDPA's time; Swin-T's inference 1.135x (bf16, batch 1), 1.276x (bf16, batch 8) and
1.07-1.08x (float32) as fast in a same-process A/B.

It is compiled on first use with PyTorch's C++ extension builder (a C++ compiler and ninja are
needed; about 30 s on two cores, then cached under ``~/.cache/torch_extensions``) and serves
CPUs with AVX-512 and AVX512-BF16. Anything else (no compiler, another CPU, a build error, a
call it does not fit: head_dim other than 32, more than 64 tokens a window, gradients, tracing)
goes to SDPA as before. ``WINATTN_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from ..stamps import cached_per_tensor

_log = logging.getLogger("winattn")
_SOURCE = Path(__file__).with_name("window_attention.cpp")
# -fopenmp compiles at::parallel_for's OpenMP loop (without it the kernel runs on one thread);
# its symbols resolve to the libgomp PyTorch already loaded, so both share one thread pool.
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq",
          "-mavx512bf16", "-mfma"]

#: The sizes the kernel is written for: Swin's head_dim, windows up to 8 x 8.
HEAD_DIM = 32
MAX_TOKENS = 64


def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernel is compiled for."""
    avx512 = getattr(torch.cpu, "_is_avx512_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(avx512 and bf16)


@functools.lru_cache(maxsize=None)
def _extension():
    """The kernel's operator, ``torch.ops.winattn_cpu.window_attention`` (compiled and loaded on
    the first call), or None, with the reason logged once, when it cannot be had."""
    if os.environ.get("WINATTN_CPU_KERNEL") == "0":
        return None
    if not cpu_supported():
        _log.debug("winattn CPU kernel: this CPU lacks AVX-512 or AVX512-BF16; SDPA serves")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _log.info("winattn CPU kernel: no C++ compiler found; SDPA serves")
        return None
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            _log.info("winattn CPU kernel: ninja not found; SDPA serves")
            return None
        _log.info("winattn CPU kernel: loading %s (compiled on the first run, about 30 s)",
                  _SOURCE.name)
        with torch.inference_mode(False):
            cpp_extension.load(
                name="winattn_window_attention",
                sources=[str(_SOURCE)],
                extra_cflags=_FLAGS,
                is_python_module=False,  # loaded as a library: it registers its operator
                verbose=False,
            )
        _register_python_parts()
        return torch.ops.winattn_cpu.window_attention
    except Exception as err:  # a failed build must never stop inference: SDPA serves
        _log.warning("winattn CPU kernel: build failed (%s); SDPA serves", err)
        return None
    finally:
        cpp_logger.setLevel(level)


@functools.lru_cache(maxsize=None)  # once a process, however often the library is loaded
def _register_python_parts() -> None:
    """The operator's fake (meta) function, for torch.compile's and export's shape
    propagation, and its FLOP formula for :class:`torch.utils.flop_counter.FlopCounterMode`
    (``winattn info --flops``)."""
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.register_fake("winattn_cpu::window_attention")
    def _fake(q, k, v, mask_t, scale):
        rows, heads, tokens, head_dim = q.shape
        return q.new_empty(rows, tokens, heads, head_dim)

    @register_flop_formula(torch.ops.winattn_cpu.window_attention)
    def _flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        rows, heads, tokens, head_dim = q_shape
        return 4 * rows * heads * tokens * k_shape[-2] * head_dim


def available() -> bool:
    """Whether the kernel is compiled (compiling it on the first call)."""
    return _extension() is not None


def _tracing() -> bool:
    """:func:`winattn.ops.traceable.is_tracing` (imported late: that module imports the
    backends), plus TorchScript's tracer."""
    from ..traceable import is_tracing

    return is_tracing() or torch.jit.is_tracing()


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a call on ``(rows, heads, N, d)`` q, k, v is one the kernel serves (before
    building it): CPU, float32 or bfloat16, ``d == 32``, ``N <= 64`` keys equal to queries, unit
    last strides, no gradient wanted, not under tracing or export."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.dtype == k.dtype == v.dtype
        and q.dim() == 4
        and q.shape[-1] == HEAD_DIM
        and q.shape[-2] <= MAX_TOKENS
        and k.shape == q.shape
        and v.shape == q.shape
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and not _tracing()
    )


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """:func:`fits` and the kernel is available: then :func:`attend` will not return None."""
    return fits(q, k, v) and available()


_mask_cache: dict = {}  # for cached_per_tensor


def kernel_mask(mask: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """``mask`` ``(m, heads or 1, N, N)`` as the kernel reads it: float32, keys before queries,
    contiguous. With ``keep``, cached per mask tensor and version (the models' eval masks are
    kept between calls); an entry goes when its mask does."""

    def build() -> torch.Tensor:
        with torch.no_grad():
            return mask.detach().float().transpose(-1, -2).contiguous()

    return cached_per_tensor(_mask_cache, mask, build, keep)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    keep: bool = True,
) -> torch.Tensor | None:
    """Attention inside windows by the kernel, or None where it does not serve.

    Args:
        q, k, v: ``(rows, heads, N, 32)``, any strides with a unit last one.
        mask: additive ``(m, heads or 1, N, N)`` with ``m`` dividing ``rows`` (windows
            innermost), or None.
        scale: multiplies q.k.
        keep: keep the mask's converted form for later calls with the same mask tensor
            (:func:`kernel_mask`); False for a mask built afresh on every call.

    Returns:
        ``(rows, N, heads, 32)`` contiguous in q's dtype (what the SDPA path returns), or None.
    """
    if not fits(q, k, v):
        return None
    if mask is not None and (
        mask.dim() != 4
        or q.shape[0] % mask.shape[0]
        or mask.shape[1] not in (1, q.shape[1])
        or mask.shape[-2:] != (q.shape[-2], q.shape[-2])
    ):
        return None
    ext = _extension()
    if ext is None:
        return None
    return ext(q, k, v, None if mask is None else kernel_mask(mask, keep), scale)
