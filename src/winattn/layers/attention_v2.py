"""Swin V2 window attention: scaled cosine attention with a continuous position bias (CPB).

Numerics follow the official code, timm and torchvision exactly:

- logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(cpb_mlp(coords))[i, j]
  (+ Swin's -100 between shift regions, added by the operator);
- the CPB input is the table of relative offsets in a window, divided by
  ``pretrained_window_size - 1`` (when given) or ``window - 1``, times 8, then mapped through
  ``sign(x) * log2(1 + |x|) / log2(8)``;
- q and v carry learned biases, k a zero bias.

The per-head logit scale is folded into the normalised q, so the operator runs with ``scale=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
from ..ops.stamps import parameter_stamp, same_parameters, tensor_cache
from ..ops.traceable import TracedWindows, traceable_window_attention
from ..ops.traceable import is_tracing as _is_tracing
from . import fused, fused_attention
from .position import relative_position_index

#: Upper clamp of the learned per-head logit scale (log of the largest temperature, 100).
MAX_LOGIT_SCALE = math.log(100.0)


def _cpb_offsets(window_size: tuple[int, int]) -> torch.Tensor:
    """Every relative offset of a window, ``(2wh-1, 2ww-1, 2)`` float32, (dh, dw) row-major."""
    h = torch.arange(-(window_size[0] - 1), window_size[0], dtype=torch.float32)
    w = torch.arange(-(window_size[1] - 1), window_size[1], dtype=torch.float32)
    return torch.stack(torch.meshgrid(h, w, indexing="ij"), dim=-1)  # (2wh-1, 2ww-1, 2)


def _log_spaced(offsets: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """Offsets divided by ``divisor`` (per axis), times 8, then sign(x) log2(1+|x|) / log2(8)."""
    table = offsets / divisor * 8  # to [-8, 8]
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.reshape(-1, 2)  # ((2wh-1)*(2ww-1), 2)


def _cpb_coords(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int]
) -> torch.Tensor:
    divisor = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    # The reference implementations divide by max(w - 1, 1): a window of 1 has only offset 0.
    divisor = torch.tensor([max(divisor[0] - 1, 1), max(divisor[1] - 1, 1)], dtype=torch.float32)
    return _log_spaced(_cpb_offsets(window_size), divisor)


def traced_cpb_coords(
    window_size: tuple[int, int],
    window_in_use: tuple[torch.Tensor, torch.Tensor],
    pretrained_window_size: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """:func:`cpb_coords` of ``window_size``'s offsets, normalised by a traced window.

    On the shape-generic path a shrunk window is the full window with keys excluded, so the
    table covers the full window's offsets; the coordinates are divided by the window the
    eager path would use (``window_in_use``, 0-d tensors of the traced size) unless a
    pretrained window fixes the divisor. Offsets beyond the shrunk window meet only excluded
    keys.
    """
    if pretrained_window_size[0] > 0:
        return _cpb_coords(tuple(window_size), tuple(pretrained_window_size))
    divisor = torch.stack(window_in_use).clamp(min=2).to(torch.float32) - 1  # (2,)
    offsets = _cpb_offsets(tuple(window_size)).to(divisor.device)
    return _log_spaced(offsets, divisor)


_cpb_coords_cached = tensor_cache(maxsize=64)(_cpb_coords)


def cpb_coords(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Log-spaced relative coordinates fed to the CPB MLP, one row per offset of the window.

    Args:
        window_size: the window in use ``(wh, ww)``.
        pretrained_window_size: the window the MLP was trained at; ``(0, 0)``: ``window_size``.

    Returns:
        ``((2wh-1) * (2ww-1), 2)`` float32 on the CPU, rows ordered (dh, dw) row-major, cached.
    """
    window_size, pretrained = tuple(window_size), tuple(pretrained_window_size)
    if _is_tracing():
        return _cpb_coords(window_size, pretrained)
    return _cpb_coords_cached(window_size, pretrained)


@tensor_cache(maxsize=256)
def _on_device(
    kind: str, window_size: tuple, pretrained: tuple, device: torch.device
) -> torch.Tensor:
    if kind == "coords":
        return _cpb_coords_cached(window_size, pretrained).to(device)
    return relative_position_index(window_size).to(device)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs ``device``'s matmuls in now, or None when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``; in float16/bfloat16 computed in float32, where its eps of
    1e-12 exists (in float16 it rounds to 0, and the all-zero keys of padded tokens give 0/0)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=-1).to(x.dtype)
    return F.normalize(x, dim=-1)


def _scaled_units(qk: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``qk`` ``(..., 2, heads, d)`` (q then k) normalised over ``d``, q's times its head's
    ``logit_scale`` ``(heads, 1, 1)``: :func:`_unit` and the scale as one pass over ``qk``
    (its norms reduced in float32 or wider, then ``x * (scale / max(|x|, 1e-12))``), instead
    of a cast, a norm, a division, a cast back and a product for each of q and k.

    Returns a new tensor in ``qk``'s dtype. In bfloat16 without gradients the factor is
    rounded to bfloat16 before the product (two roundings, as the cast back and the product
    make in :func:`_unit`'s order); in grad mode the product runs in float32, as training's
    :class:`_ScaledQkvFunction` computes it; float16 always multiplies in float32, where the
    factor of an all-zero padded key (1e12) exists.
    """
    factor, _ = _unit_factors(qk, logit_scale)
    if qk.dtype == torch.float16 or (qk.dtype != factor.dtype and torch.is_grad_enabled()):
        return (qk.to(factor.dtype) * factor).to(qk.dtype)
    return qk * factor.to(qk.dtype)


def _unit_factors(qk: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale / max(|x|, 1e-12)`` per vector of ``qk`` ``(..., 2, heads, d)``, and the norms
    ``|x|``, both ``(..., 2, heads, 1)`` in float32 or wider."""
    heads = qk.shape[-2]
    work = torch.promote_types(qk.dtype, torch.float32)
    norms = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=work)
    return _slot_scales(logit_scale, heads, work) / norms.clamp_min(1e-12), norms


def _slot_scales(logit_scale: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``(2, heads, 1)``: q's logit scale per head, then ones for k."""
    scale = logit_scale.view(heads)
    return torch.stack([scale, torch.ones_like(scale)]).to(dtype).view(2, heads, 1)


class _ScaledQkvFunction(torch.autograd.Function):
    """``qkv`` ``(rows, N, 3, heads, d)`` -> a new tensor of its layout holding
    :func:`_scaled_units` of q and k (the product in float32) and a copy of v: the input of
    :func:`~winattn.layers.fused_attention.attend_project` in training.

    It keeps its output (which attention keeps anyway) and the norms, not its input: for
    ``y = s x / n``, ``n = max(|x|, 1e-12)``, the gradient is ``dx = (s g - y (y.g) / s) / n``
    where ``|x| > 1e-12`` (the clamped side has a constant ``n``: ``dx = s g / n``) and q's
    scale gets ``sum(y.g) / s`` over every vector of the head. So the qkv projection's output
    is not kept at all (autograd kept it, its q and k as float32 copies under bf16, and the
    normalised q and k beside it).
    """

    @staticmethod
    def forward(ctx, qkv, logit_scale):  # type: ignore[override]
        out = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        factor, norms = _unit_factors(qkv[:, :, :2], logit_scale)
        torch.mul(qkv[:, :, :2].to(factor.dtype), factor, out=out[:, :, :2])
        out[:, :, 2] = qkv[:, :, 2]
        ctx.save_for_backward(out, norms, logit_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        out, norms, logit_scale = ctx.saved_tensors
        work = norms.dtype
        scales = _slot_scales(logit_scale, out.shape[-2], work)  # (2, heads, 1)
        y, grad = out[:, :, :2].to(work), grad_out[:, :, :2].to(work)
        dots = (y * grad).sum(-1, keepdim=True)  # y.g, (rows, N, 2, heads, 1)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            per_head = dots[:, :, 0] / scales[0]  # q's: (rows, N, heads, 1)
            grad_scale = per_head.reshape(-1, per_head.shape[-2]).sum(0)
            grad_scale = grad_scale.view(logit_scale.shape).to(logit_scale.dtype)
        grad_qkv = None
        if ctx.needs_input_grad[0]:
            grad_qkv = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            radial = torch.where(norms > 1e-12, dots / scales, 0.0)
            inverse = 1.0 / norms.clamp_min(1e-12)
            torch.mul(scales * grad - y * radial, inverse, out=grad_qkv[:, :, :2])
            grad_qkv[:, :, 2] = grad_out[:, :, 2]
        return grad_qkv, grad_scale


class WindowAttentionV2(nn.Module):
    """Swin V2 window attention on ``(B, H, W, C)`` maps whose sides are multiples of the window.

    Parameters keep timm's names: ``logit_scale (heads, 1, 1)``, ``cpb_mlp.{0,2}``, a bias-free
    fused ``qkv`` (rows ordered (3, heads, head_dim)), ``q_bias``, ``v_bias``, ``proj``. The
    coordinate tables and index maps are cached per window (not stored in the state dict); in
    eval / no-grad mode the position bias itself is cached per window too, and recomputed when
    the CPB weights change.

    Args:
        dim: channels.
        num_heads: attention heads.
        pretrained_window_size: the window the CPB was trained at (0: the window in use).
        qkv_bias: learn q and v biases.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        pretrained_window_size: tuple[int, int] = (0, 0),
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False),
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # (window, device, dtype, autocast) -> (parameter stamp, CPB parameters, bias)
        self._bias_cache: dict[tuple, tuple[tuple, list, torch.Tensor]] = {}
        self._mask_cache = ExpandedMaskCache()  # eval-time bias + shift mask, batch-expanded
        self._inference_constants: dict[torch.dtype, tuple] = {}  # see inference_constants

    def _compute_position_bias(
        self,
        window_size: tuple[int, int],
        window_in_use: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        device = self.logit_scale.device
        if window_in_use is not None:
            coords = traced_cpb_coords(window_size, window_in_use, self.pretrained_window_size)
            index = relative_position_index(window_size).to(device)
        elif _is_tracing():
            coords = cpb_coords(window_size, self.pretrained_window_size).to(device)
            index = relative_position_index(window_size).to(device)
        else:
            coords = _on_device("coords", window_size, self.pretrained_window_size, device)
            index = _on_device("index", window_size, self.pretrained_window_size, device)
        coords = coords.to(self.cpb_mlp[0].weight.dtype)
        # 16 * sigmoid is elementwise: applied to the small table before the gather (the
        # peers apply it after), the same values at (2w-1)^2 / N^2 of the cost.
        table = 16 * torch.sigmoid(self.cpb_mlp(coords))  # ((2wh-1)*(2ww-1), heads)
        table = table.t().contiguous()  # (heads, (2wh-1)*(2ww-1))
        tokens = index.shape[0]
        return table[:, index.reshape(-1)].view(self.num_heads, tokens, tokens)  # (heads, N, N)

    def position_bias(self, window_size: tuple[int, int]) -> torch.Tensor:
        """``(heads, N, N)`` continuous position bias for ``window_size`` (any window).

        Cached per (window, device, dtype, autocast dtype) when no gradient is needed, until
        the CPB weights change (:mod:`winattn.ops.stamps`): an optimiser step,
        ``load_state_dict`` or a replaced parameter invalidates it. Under autocast the CPB
        MLP's linears run in the autocast dtype, as the peers' do, so a bias computed with
        autocast off (or in another dtype) never serves a call with it on, nor the reverse.
        """
        window_size = tuple(window_size)
        params = list(self.cpb_mlp.parameters())
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if needs_grad or _is_tracing():
            return self._compute_position_bias(window_size)
        device = params[0].device
        key = (window_size, device, params[0].dtype, _autocast_dtype(device))
        stamp = parameter_stamp(params)
        hit = self._bias_cache.get(key)
        if hit is not None and hit[0] == stamp and same_parameters(hit[1], params):
            return hit[2]
        # Only the newest weights are worth keeping: drop entries of older (or replaced) ones.
        for k in [k for k, (s, held, _) in self._bias_cache.items()
                  if s != stamp or not same_parameters(held, params)]:
            del self._bias_cache[k]
        # Outside inference mode even when called in it, so that the cached tensor can serve
        # later calls made with autograd on (an inference tensor could not).
        with torch.inference_mode(False), torch.no_grad():
            bias = self._compute_position_bias(window_size)
        self._bias_cache[key] = (stamp, params, bias)
        return bias

    def _cached_mask(
        self, plan: WindowPlan, rows: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Position bias + shift mask of ``plan`` in ``dtype`` (built in float32 or wider),
        expanded to ``rows`` windows, cached until the CPB weights change."""
        work = torch.promote_types(dtype, torch.float32)

        def build() -> torch.Tensor | None:
            bias = self.position_bias(plan.window_size).to(work)
            return combine_mask(plan.mask_as(work), bias, work)  # (nW or 1, heads, N, N)

        params = list(self.cpb_mlp.parameters())
        key = (plan, _autocast_dtype(params[0].device))  # the bias depends on it
        return self._mask_cache.get(key, dtype, rows, params, build)

    def forward_windows(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """Attention on tokens already in ``plan``'s window order.

        Args:
            x: ``(B, L, C)``, ``L = num_windows * N``, window-major (``plan.partition``'s
                order); padded tokens already zeroed.

        Returns:
            ``(B, L, C)`` in the same order: the same function as :meth:`forward` on the grid,
            with the linears through oneDNN (:func:`~winattn.layers.fused.linear`) and the
            position bias and shift mask folded into one tensor (cached without gradients;
            with them, rebuilt so that the CPB weights get theirs, and attention through the
            Function that recomputes its probabilities in backward).
        """
        batch, length, channels = x.shape
        rows, tokens = batch * plan.num_windows, plan.window_tokens
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = fused.linear(x, self.qkv, bias=bias)  # (B, L, 3C)
        qkv = qkv.view(rows, tokens, 3, self.num_heads, self.head_dim)
        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()  # (heads, 1, 1)
        if torch.is_grad_enabled() and (qkv.requires_grad or logit_scale.requires_grad):
            # Training: the scaled q, k and a copy of v in one tensor, attention and the output
            # projection as one Function; neither keeps the projections' outputs.
            scaled = _ScaledQkvFunction.apply(qkv, logit_scale)  # (rows, N, 3, heads, d)
            if any(p.requires_grad for p in self.cpb_mlp.parameters()):
                work = torch.promote_types(qkv.dtype, torch.float32)
                position_bias = self.position_bias(plan.window_size)  # (heads, N, N), grad
                mask = combine_mask(plan.mask_as(work), position_bias, work)
            else:
                mask = self._cached_mask(plan, rows, qkv.dtype)
            out = fused_attention.attend_project(scaled, mask, 1.0, self.proj)  # (rows, N, C)
            return self.proj_drop(out.view(batch, length, channels))
        out = self.attend_inference(qkv.view(batch, length, -1), plan, logit_scale)
        return self.proj_drop(fused.linear(out, self.proj))

    def attend_inference(
        self, qkv: torch.Tensor, plan: WindowPlan, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Cosine attention inside ``plan``'s windows on the qkv projection's output
        ``(B, L, 3C)`` (tokens in window order) without gradients, ``logit_scale`` the
        clamped exponential ``(heads, 1, 1)``: returns ``(B, L, C)``, the projection's
        input."""
        batch, length, width = qkv.shape
        rows = batch * plan.num_windows
        qkv = qkv.view(rows, plan.window_tokens, 3, self.num_heads, self.head_dim)
        qk = _scaled_units(qkv[:, :, :2], logit_scale)  # (rows, N, 2, heads, d)
        q, k = qk.transpose(1, 3).unbind(2)  # each (rows, heads, N, d), strided views
        v = qkv[:, :, 2].transpose(1, 2)  # (rows, heads, N, d), a strided view
        # The bias and mask in float32 for the matmul attention's float32 softmax, else in
        # SDPA's dtype: (rows or 1, heads, N, N).
        if prefers_matmuls(q):
            out = explicit_attention(q, k, v, self._cached_mask(plan, rows, torch.float32), 1.0)
        else:
            mask = self._cached_mask(plan, mask_rows(q, k, v, rows, plan.num_windows), q.dtype)
            out = attend_qkv(q, k, v, mask, 1.0)
        return out.view(batch, length, width // 3)

    def inference_constants(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The qkv bias ``(q_bias, 0, v_bias)`` in ``dtype`` (or None) and the clamped
        exponential of ``logit_scale``, as :meth:`forward_windows` builds them per call,
        cached until those parameters change (:func:`fused.cached_by_parameters`)."""

        def build() -> tuple[torch.Tensor | None, torch.Tensor]:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode
                bias = None
                if self.q_bias is not None:
                    bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
                    bias = bias.to(dtype)
                return bias, torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()

        params = [self.q_bias, self.v_bias, self.logit_scale]
        return fused.cached_by_parameters(self._inference_constants, dtype, params, build)

    def forward(
        self,
        x: torch.Tensor,
        window_size: tuple[int, int],
        shift_size: tuple[int, int] | TracedWindows,
    ) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``; H and W are multiples of ``window_size``.

        ``shift_size`` is the shift per axis, or, on the shape-generic path of a traced call,
        the block's window decision as tensors (:class:`~winattn.ops.traceable.TracedWindows`).
        """
        batch, height, width, channels = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # each (B, H, W, heads, d)
        # Cosine attention: the clamped per-head temperature is folded into the unit-norm q.
        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        q = _unit(q) * logit_scale.view(self.num_heads, 1).to(q.dtype)
        k = _unit(k)
        if isinstance(shift_size, TracedWindows):
            position_bias = self._compute_position_bias(window_size, shift_size.window)
            out = traceable_window_attention(
                q, k, v, window_size, shift_size.shift, position_bias, 1.0, shift_size.key_limit
            )
        else:
            out = window_attention(
                q,
                k,
                v,
                window_size,
                shift_size=shift_size,
                bias=self.position_bias(window_size),
                scale=1.0,
            )  # (B, H, W, heads, d)
        return self.proj_drop(self.proj(out.reshape(batch, height, width, channels)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, "
            f"pretrained_window_size={self.pretrained_window_size}"
        )
