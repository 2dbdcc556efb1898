"""Attention inside windows and the output projection after it as one autograd Function on
the CPU (:func:`attend_project`), built on :mod:`.fused`'s oneDNN linears: training keeps the
fused qkv projection's output, the mask and the weight, not the attention output."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.backends import sdpa
from . import fused
from .fused import (
    _ONEDNN_DTYPES,
    _cast,
    _grad_input,
    _grad_weight,
    _matmul_forward,
    linear,
    linear_add,
)


def unbind_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(rows, heads, N, d)``: strided views of ``qkv`` ``(rows, N, 3, heads, d)``."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class _AttendProjectFunction(torch.autograd.Function):
    """``proj(attention(q, k, v))`` on the qkv projection's output, storing that (the tensor
    the projection made), the mask and the weight only: the attention output, which the
    projection's weight gradient needs, is recomputed in backward from the probabilities that
    backward recomputes anyway (one extra batched matmul), so one channel width per token is
    not kept. The gradients of q, k and v are written side by side into one buffer and handed
    back as qkv's, instead of autograd stacking three tensors (a Swin-T float32 step spent
    13 ms in that stack). Attention as :func:`~winattn.ops.backends.sdpa.attend_qkv`'s
    Function; the projection as :class:`_LinearFunction`.
    """

    @staticmethod
    def forward(ctx, qkv, mask, scale, weight, bias):  # type: ignore[override]
        dtype = qkv.dtype
        q, k, v = unbind_qkv(qkv)
        out = sdpa.attend_without_grad(q, k, v, mask, scale)  # (B*nW, N, heads, d)
        rows, tokens = out.shape[:2]
        with torch.autocast("cpu", enabled=False):
            flat = out.view(rows * tokens, -1)
            y = _matmul_forward(flat, weight.to(dtype), _cast(bias, dtype))
        ctx.save_for_backward(qkv, mask, weight)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return y.view(rows, tokens, -1)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        qkv, mask, weight = ctx.saved_tensors
        dtype = qkv.dtype
        q, k, v = unbind_qkv(qkv)
        rows, heads, tokens, head_dim = q.shape
        projection: dict[str, torch.Tensor | None] = {}

        def grad_out_of(probs: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                grad = grad_y.to(dtype).reshape(rows * tokens, -1)  # (T, C)
                out = torch.matmul(probs, v_c)  # (B*nW, heads, N, d), recomputed
                flat = out.transpose(1, 2).reshape(rows * tokens, heads * head_dim)
                del out
                projection["weight"] = _grad_weight(grad, flat).to(weight.dtype)
                del flat
                has_bias = ctx.has_bias and ctx.needs_input_grad[4]
                projection["bias"] = grad.sum(0).to(weight.dtype) if has_bias else None
                grad_out = _grad_input(grad, weight.to(dtype))  # (T, C)
            grad_out = grad_out.view(rows, tokens, heads, head_dim)
            return grad_out.transpose(1, 2).contiguous()  # (B*nW, heads, N, d)

        grad_qkv = qkv.new_empty(3, rows, heads, tokens, head_dim)  # q's, k's, v's
        _, _, _, grad_mask = sdpa.attention_gradients(
            q, k, v, mask, ctx.scale, grad_out_of, ctx.needs_input_grad[1],
            out=grad_qkv.unbind(0),
        )
        grad_qkv = grad_qkv.permute(1, 3, 0, 2, 4)  # (B*nW, N, 3, heads, d), qkv's layout
        return grad_qkv, grad_mask, None, projection["weight"], projection["bias"]


def attend_project(
    qkv: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    layer: nn.Linear,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer`` applied to attention inside windows on ``qkv`` ``(B*nW, N, 3, heads, d)``
    (a view of the fused qkv projection's output), mask as for
    :func:`~winattn.ops.backends.sdpa.attend_qkv`; returns ``(B*nW, N, heads * d)``, plus
    ``residual`` (same shape) when given (:func:`linear_add` without gradients). With
    gradients on the CPU one Function (:class:`_AttendProjectFunction`) that does not keep
    the attention output."""
    tensors = (qkv,) if mask is None else (qkv, mask)
    usable = (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and fused._onednn_ready(qkv)
        and qkv.dtype in _ONEDNN_DTYPES
        and layer.weight.dtype in _ONEDNN_DTYPES
    )
    if usable:
        out = _AttendProjectFunction.apply(qkv, mask, scale, layer.weight, layer.bias)
        return out if residual is None else residual + out
    out = sdpa.attend_qkv(*unbind_qkv(qkv), mask, scale)  # (B*nW, N, heads, d)
    out = out.view(*out.shape[:2], -1)
    return linear(out, layer) if residual is None else linear_add(out, layer, residual)
