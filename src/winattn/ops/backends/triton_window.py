"""The fused Triton backend: shifted-window attention with bias in one kernel, forward and backward.

The kernels (in :mod:`.triton_kernels`) read q, k, v in the grid layout and compute the padding,
cyclic shift, window partition and Swin's region mask from indices, so no partitioned copy of
q, k, v and no ``(windows, heads, N, N)`` attention tensor is ever stored, in the forward or
the backward. They are exposed as two ``torch.library`` custom ops with fake (meta) functions
and an autograd formula, so ``torch.compile(fullgraph=True)`` traces them as single nodes.

triton is imported only when a call actually runs here: this module imports without it.
On CPU tensors the backend serves only when Triton's interpreter is on (``TRITON_INTERPRET=1``
before the kernels are first imported), which is how the test suite checks the kernels on a
machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from typing import Optional

import torch

from ..call import AttentionCall

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
_KERNELS = "winattn.ops.backends.triton_kernels"


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether CPU tensors may be served: ``TRITON_INTERPRET`` is on now, and the kernels were
    (or, when first imported, will be) built for the interpreter. Both are asked so that a
    process that once turned the interpreter on for a test does not keep routing every CPU call
    to the slow interpreter after turning it off."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        return False
    kernels = sys.modules.get(_KERNELS)
    return kernels is None or kernels.INTERPRETED


def _kernels():
    from . import triton_kernels

    return triton_kernels


# ----------------------------------------------------------------------------------------------
# Custom ops: one for the forward, one for the backward, each a single traced node.


@torch.library.custom_op("winattn::triton_window_attention", mutates_args=())
def triton_window_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    window_size: list[int],
    shift_size: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward; returns (out ``(B, *grid, heads, d)``, float32 lse ``(B, *grid, heads)``)."""
    k, v = _same_strides_as(q, k, v)
    if k.stride() != q.stride():
        q = q.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _kernels().forward(q, k, v, bias, tuple(window_size), tuple(shift_size), scale)


@triton_window_attention_op.register_fake
def _(q, k, v, bias, window_size, shift_size, scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return out, lse


@torch.library.custom_op("winattn::triton_window_attention_backward", mutates_args=())
def triton_window_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    window_size: list[int],
    shift_size: list[int],
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward; returns (dq, dk, dv, dbias). dbias is empty when ``bias_grad`` is off."""
    k, v = _same_strides_as(q, k, v)
    if k.stride() != q.stride():
        q = q.contiguous()
    bias = None if bias is None else bias.contiguous()
    dq, dk, dv, dbias = _kernels().backward(
        dout.contiguous(),
        q,
        k,
        v,
        bias,
        out.contiguous(),
        lse,
        tuple(window_size),
        tuple(shift_size),
        scale,
        bias_grad,
    )
    if dbias is None:
        dbias = q.new_empty(0)
    return dq, dk, dv, dbias


@triton_window_attention_backward_op.register_fake
def _(dout, q, k, v, bias, out, lse, window_size, shift_size, scale, bias_grad):
    grads = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3)]
    if bias_grad and bias is not None:
        dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    else:
        dbias = q.new_empty(0)
    return (*grads, dbias)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, window_size, shift_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.geometry = (list(window_size), list(shift_size), scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    window_size, shift_size, scale = ctx.geometry
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = triton_window_attention_backward_op(
        grad_out, q, k, v, bias, out, lse, window_size, shift_size, scale, bias_grad
    )
    return dq, dk, dv, (dbias if bias_grad else None), None, None, None


triton_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _same_strides_as(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels take one stride set for q, k and v (true of views of one qkv projection);
    when the strides differ, k and v are made contiguous (q then too, by the caller)."""
    if k.stride() == q.stride() and v.stride() == q.stride():
        return k, v
    return k.contiguous(), v.contiguous()


# ----------------------------------------------------------------------------------------------
# The backend object the dispatcher sees.


class TritonBackend:
    """Fused Triton kernels on CUDA (or in Triton's CPU interpreter for testing)."""

    name = "triton"

    def supports(self, call: AttentionCall) -> list[str]:
        if not triton_available():
            return ["triton is not installed"]
        reasons = []
        device = call.q.device
        if device.type == "cpu":
            if not interpreter_enabled():
                reasons.append(
                    "not a CUDA tensor (on CPU the kernels run only in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before the first call, for testing)"
                )
        elif device.type != "cuda":
            reasons.append(f"not a CUDA tensor (device {device})")
        if call.q.dtype not in _DTYPES:
            reasons.append(f"dtype {call.q.dtype} is not one of float32, float16, bfloat16")
        if call.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {call.head_dim} is above {MAX_HEAD_DIM}")
        if call.bias is not None and not call.bias.is_floating_point():
            reasons.append(f"bias dtype {call.bias.dtype} is not floating")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        plan = call.plan
        out, _ = triton_window_attention_op(
            call.q,
            call.k,
            call.v,
            call.bias,
            list(plan.window_size),
            list(plan.shift_size),
            call.scale,
        )
        return out


def triton_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: tuple[int, ...],
    shift_size: tuple[int, ...],
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The fused op without the dispatcher (one traced node under ``torch.compile``).

    Arguments as :func:`winattn.window_attention`, with ``window_size`` and ``shift_size`` one int
    per grid axis, already valid; no checks beyond the kernels' own.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = triton_window_attention_op(
        q, k, v, bias, list(window_size), list(shift_size), scale
    )
    return out
