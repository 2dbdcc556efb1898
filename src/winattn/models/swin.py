"""Swin Transformer V1 (Liu et al., 2021) on winattn's windowed-attention operator.

Parameter names and shapes are timm's, key for key, so timm checkpoints load as they are and the
other formats convert by renaming (``winattn.checkpoints``). Any input resolution runs on one
model object: windows, shifts and padding are worked out per feature-map size at run time.

Reads top to bottom: helpers -> block -> stage -> model -> config -> registered variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import DropPath, Mlp, PatchEmbed, PatchMerging, WindowAttention, fused, fused_norm
from ..ops import WindowPlan, plan_windows
from ..ops.backends import forced_backend, sdpa
from ..ops.backends.triton_window import triton_available
from ..ops.geometry import move_tokens, padded_token_mask
from ..ops.traceable import TracedWindows, is_tracing, use_traceable_path
from .base import SwinBackbone, _init_weights, to_2tuple
from .config_checks import WindowRule, check_config
from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: How a block picks its window and shift when the feature map is not larger than the window:
#: "official" (the official code and Hugging Face): when min(H, W) <= window, the window shrinks
#:     to min(H, W) and the shift is dropped;
#: "timm": per axis, the window shrinks to the feature size and that axis's shift is dropped;
#: "torchvision": the window never shrinks (the map is padded up to it); the shift of an axis is
#:     dropped when the padded axis is no longer than the window.

#: How a V1 stage runs its blocks' attention:
#: "window-order": tokens kept in window order through the stage, attention by SDPA or, in
#:     bf16 on the CPU, by matmuls (the CPU fast path);
#: "grid": each block calls the operator on the grid layout, so the dispatcher's first backend
#:     serves it: the fused Triton kernel on CUDA tensors where triton is installed;
#: "auto": "grid" on CUDA with triton installed (and no other backend forced through
#:     WINATTN_BACKEND), else "window-order".
AttentionPath = Literal["auto", "window-order", "grid"]


def fused_kernel_expected(x: torch.Tensor) -> bool:
    """Whether the operator's dispatcher will hand ``x``'s attention to the Triton kernel."""
    if x.device.type != "cuda" or not triton_available():
        return False
    return forced_backend() in (None, "triton")


def resolve_window(
    feature_size: tuple[int, int],
    window_size: tuple[int, int],
    shift_size: tuple[int, int],
    rule: WindowRule,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (window, shift) a block uses on a feature map of ``feature_size``, by ``rule``."""
    if rule == "official":
        if any(f <= w for f, w in zip(feature_size, window_size)):
            smallest = min(feature_size)
            return (min(smallest, window_size[0]), min(smallest, window_size[1])), (0, 0)
        return window_size, shift_size
    if rule == "timm":
        window = tuple(min(f, w) for f, w in zip(feature_size, window_size))
        shift = tuple(0 if f <= w else s for f, w, s in zip(feature_size, window, shift_size))
        return window, shift  # type: ignore[return-value]
    shift = tuple(0 if f <= w else s for f, w, s in zip(feature_size, window_size, shift_size))
    return window_size, shift  # type: ignore[return-value]


def traced_window_rule(
    feature_size: tuple,
    window_size: tuple[int, int],
    shift_size: tuple[int, int],
    rule: WindowRule,
    device: torch.device,
) -> TracedWindows:
    """:func:`resolve_window`'s decision as tensors of a traced size, with no branch on it.

    An exported or compiled graph then makes the decision at run time: the shift is 0 or the
    block's, and a shrunk window is the full window with the keys past the map excluded (the
    same keys, the same relative offsets, so the same attention). Exact at every size for
    "timm" and "torchvision", and for "official" at every size except a non-square map whose
    shorter side is below the window: the official rule then cuts the longer side into
    windows of the shorter side's extent, a window that depends on the input; the graph
    shrinks each axis to its own extent there instead (timm's windows; the shift is dropped on
    both axes, as the official rule does). See docs/export.md.

    Args:
        feature_size: the map's (height, width), traced (symbolic) or plain ints.
        window_size, shift_size: the block's configured window and shift.
        rule: the model's ``window_rule``.
        device: where the tensors go.
    """
    sizes = [torch.scalar_tensor(f, dtype=torch.long, device=device) for f in feature_size]
    larger = [n > w for n, w in zip(sizes, window_size)]  # 0-d bool, per axis
    if rule == "official":
        both = larger[0] & larger[1]
        larger = [both, both]
    shift = tuple(s * big.long() for s, big in zip(shift_size, larger))
    if rule == "torchvision":
        window = tuple(torch.full_like(n, w) for n, w in zip(sizes, window_size))
        return TracedWindows(shift, None, window)
    if rule == "official":
        smallest = torch.minimum(sizes[0], sizes[1])
        window = tuple(torch.where(larger[0], w, smallest.clamp(max=w)) for w in window_size)
    else:
        window = tuple(n.clamp(max=w) for n, w in zip(sizes, window_size))
    # Keys past a map shorter than the window are the shrunk window's outside; a limit of
    # n + w is past every padded coordinate (excludes nothing).
    key_limit = tuple(torch.where(n < w, n, n + w) for n, w in zip(sizes, window_size))
    return TracedWindows(shift, key_limit, window)


def attend_in_windows(
    attn: nn.Module,
    x: torch.Tensor,
    window_size: tuple[int, int],
    shift_size: tuple[int, int],
    rule: WindowRule,
) -> torch.Tensor:
    """``attn`` on ``(B, H, W, C)``, zero-padded to its window before the shift and cropped back.

    Eager calls resolve the window and shift from the map's size (:func:`resolve_window`);
    traced calls that take the shape-generic path get the decision as tensors
    (:func:`traced_window_rule`), so one graph serves every size.
    """
    batch, height, width, _ = x.shape
    if use_traceable_path(x):
        window = window_size
        shift = traced_window_rule((height, width), window_size, shift_size, rule, x.device)
    else:
        window, shift = resolve_window((height, width), window_size, shift_size, rule)
    pad_h, pad_w = -height % window[0], -width % window[1]
    # While tracing, pad and crop unconditionally: a branch on the traced size would make
    # compiled graphs specialise (and recompile) on whether a map needs padding.
    tracing = is_tracing()
    padded = tracing or bool(pad_h or pad_w)
    if padded:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    x = attn(x, window, shift)
    if tracing:
        # A gather, not a slice: a slice's strides depend on whether the map was padded, which
        # a compiled graph would guard on.
        x = x.index_select(1, torch.arange(height, device=x.device))
        x = x.index_select(2, torch.arange(width, device=x.device))
    elif padded:
        x = x[:, :height, :width]
    return x


def block_plan(block: nn.Module, height: int, width: int, device: torch.device) -> WindowPlan:
    """The window plan of ``block`` (its ``window_size``, ``shift_size``, ``window_rule``) on an
    ``height x width`` map, zero-padded up to the window the rule picks."""
    window, shift = resolve_window(
        (height, width), block.window_size, block.shift_size, block.window_rule
    )
    padded = (height + -height % window[0], width + -width % window[1])
    return plan_windows(padded, window, shift, device)


def run_in_window_order(
    blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool = False
) -> torch.Tensor | None:
    """``blocks`` on ``x`` ``(B, H, W, C)`` with the tokens kept in window order: one gather in,
    one gather between blocks whose windows differ (plain <-> shifted), one gather out; no
    roll, partition or reverse copies inside the blocks, which run ``forward_windows(tokens,
    plan, padding)``. A map not divisible by the window is padded once here; ``padding`` marks
    the padded slots, which the blocks zero where the grid path's zero-padding would be.

    Returns:
        ``(B, H, W, C)``, or None when the blocks' padded maps differ (a block whose window
        shrinks to a small map): then the caller runs the grid path.
    """
    batch, height, width, channels = x.shape
    plans = [block.plan(height, width, x.device) for block in blocks]
    if not plans or any(p.grid != plans[0].grid for p in plans):
        return None
    padded_h, padded_w = plans[0].grid
    if (padded_h, padded_w) != (height, width):
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    tokens = plans[0].partition(x).view(batch, -1, channels)  # (B, L, C) window order
    # One padding mask per distinct plan (plain and shifted), not one per block.
    paddings = {plan: padded_token_mask(plan, (height, width)) for plan in set(plans)}
    for i, (block, plan) in enumerate(zip(blocks, plans)):
        if i > 0 and plan is not plans[i - 1]:
            tokens = move_tokens(tokens, plans[i - 1], plan)
        padding = paddings[plan]
        if grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint(block.forward_windows, tokens, plan, padding, use_reentrant=False)
        else:
            tokens = block.forward_windows(tokens, plan, padding)
    last = plans[-1]
    x = last.reverse(tokens.view(batch, last.num_windows, last.window_tokens, channels))
    return x[:, :height, :width] if last.grid != (height, width) else x


class SwinBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, on ``(B, H, W, C)``.

    The normalised map is zero-padded up to a multiple of the window before the cyclic shift
    (as torchvision and Hugging Face do); padded tokens take part as keys, as in those peers.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        shift: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        drop_path: float,
        window_rule: WindowRule,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = (window_size[0] // 2, window_size[1] // 2) if shift else (0, 0)
        self.window_rule = window_rule
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, proj_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path)
        #: Training on the CPU: recompute the MLP's hidden layer in backward instead of
        #: keeping it (see :func:`~winattn.layers.fused_norm.norm_mlp`).
        self.recompute_mlp_hidden = False

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        return attend_in_windows(self.attn, x, self.window_size, self.shift_size, self.window_rule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def plan(self, height: int, width: int, device: torch.device) -> WindowPlan:
        """The window plan of this block on an ``height x width`` map, padded to its window."""
        return block_plan(self, height, width, device)

    def forward_windows(
        self, x: torch.Tensor, plan: WindowPlan, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block on tokens kept in ``plan``'s window order, ``(B, L, C)`` -> same.

        LayerNorm, MLP and the residual adds are per token, so only attention cares about the
        order. ``padding`` ``(L, 1)`` (True on padded slots) zeroes them after ``norm1``, as the
        grid path's zero-padding does; what the padded slots hold otherwise is never read.
        """
        if self._runs_in_window_groups(x):
            return self._forward_window_groups(x, plan, padding)
        if not (torch.is_grad_enabled() or self.training):
            # Eval (drop path and dropout are identities): each residual add inside the
            # oneDNN call of the projection before it (fused.linear_add).
            if fused.inference_ready(x, self.attn.qkv):
                return self._infer(x, plan, padding)
            x = self.attn.forward_windows(x, plan, self.norm1, padding, residual=x)
            mlp = self.mlp
            return fused.linear_add(fused.linear(self.norm2(x), mlp.fc1, gelu=True), mlp.fc2, x)
        x = x + self.drop_path1(self.attn.forward_windows(x, plan, self.norm1, padding))
        mlp = self.mlp
        if mlp.drop1.p or mlp.drop2.p:
            return x + self.drop_path2(mlp(self.norm2(x)))
        mlp_out = fused_norm.norm_mlp(x, self.norm2, mlp.fc1, mlp.fc2, self.recompute_mlp_hidden)
        return x + self.drop_path2(mlp_out)

    def _infer(
        self, x: torch.Tensor, plan: WindowPlan, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """Eval of :meth:`forward_windows` where :func:`fused.inference_ready`: two LayerNorm,
        four oneDNN calls (each residual add inside the one before it) and SDPA, with the
        fewest Python steps between them the block allows, and each intermediate released
        as soon as it is used (the normalised input before attention, the qkv buffer before
        the projection's output is made). Swin-T bf16 measured 1.06-1.08x faster at batch 1
        and 1.03-1.055x at batch 8 than through the general functions, which check per call
        (docs/fast-path.md, item 12)."""
        attn, mlp = self.attn, self.mlp
        (w_qkv, b_qkv), (w_proj, b_proj), (w_fc1, b_fc1), (w_fc2, b_fc2) = (
            fused.inference_weights(self, (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), x.dtype)
        )
        norm = self.norm1
        h = torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        if padding is not None:
            h = h.masked_fill(padding, 0.0)
        qkv = fused.infer_linear(h, w_qkv, b_qkv)
        del h
        out = attn.infer_attention(qkv, plan)
        del qkv
        x = fused.infer_linear_add(out, w_proj, b_proj, x)
        del out
        norm = self.norm2
        h = torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = fused.infer_linear(h, w_fc1, b_fc1, gelu=True)
        return fused.infer_linear_add(h, w_fc2, b_fc2, x)

    def _runs_in_window_groups(self, x: torch.Tensor) -> bool:
        """Inference on the CPU goes through :meth:`_forward_window_groups` (in bfloat16 its
        attention is two matmuls around a float32 softmax, faster than SDPA's bf16 kernel at
        every Swin-T stage; in float32 SDPA, per group), except:

        - bfloat16 on a CPU with AMX, where whole stages on SDPA's bf16 kernel measured 1.2x
          faster than groups;
        - float32 on a stage of fewer than :data:`WINDOW_GROUPS_FROM_TOKENS` tokens (batch
          included), which would be one group: :meth:`_infer` on the whole stage measured
          1.03-1.07x faster at batch 1 and level at batch 8.

        Training keeps the whole-stage path, whose Functions recompute in backward
        (docs/performance.md)."""
        if torch.is_grad_enabled() or self.training or x.device.type != "cpu":
            return False
        dtype = fused.compute_dtype(x)
        if dtype == torch.bfloat16:
            return not sdpa.cpu_has_amx()
        return dtype != torch.float32 or x.shape[0] * x.shape[1] >= WINDOW_GROUPS_FROM_TOKENS

    def _forward_window_groups(
        self, x: torch.Tensor, plan: WindowPlan, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`forward_windows` for inference, a group of windows at a time.

        In window order the whole block is per window, so each group's intermediates (the qkv
        projection, the attention logits, the MLP's hidden layer) stay in the CPU's cache
        instead of streaming through memory at full-batch size. A stage of fewer than
        :data:`WINDOW_GROUPS_FROM_TOKENS` tokens is one group.
        """
        batch, length, channels = x.shape
        windows, tokens = plan.num_windows, plan.window_tokens
        rows = batch * windows
        if rows * tokens < WINDOW_GROUPS_FROM_TOKENS:
            group = rows
        else:
            group = window_group_size(windows, tokens)
        x_rows = x.reshape(rows, tokens, channels)
        pad = None if padding is None else padding.view(windows, tokens, 1)
        if group >= rows:  # one group: no copy into a separate output
            return self._window_group(x_rows, plan, pad, 0).view(batch, length, channels)
        out = torch.empty_like(x_rows)
        for start in range(0, rows, group):
            chunk = x_rows[start : start + group]  # (size, N, C)
            out[start : start + group] = self._window_group(chunk, plan, pad, start % windows)
        return out.view(batch, length, channels)

    def _window_group(
        self, chunk: torch.Tensor, plan: WindowPlan, pad: torch.Tensor | None, first: int
    ) -> torch.Tensor:
        """The block on ``chunk`` ``(size, N, C)``: windows ``first ..`` of one image, or whole
        images (``first == 0``, ``size`` a multiple of the image's windows)."""
        size, tokens, channels = chunk.shape
        windows = plan.num_windows
        attn_in = self.norm1(chunk)
        if pad is not None and size < windows:
            attn_in = attn_in.masked_fill(pad[first : first + size], 0.0)
        elif pad is not None:  # whole images
            attn_in = attn_in.view(-1, windows, tokens, channels).masked_fill(pad, 0.0)
            attn_in = attn_in.view(size, tokens, channels)
        y = chunk + self.attn.forward_window_rows(attn_in, plan, first)
        mlp = self.mlp
        return y + fused_norm.norm_mlp(y, self.norm2, mlp.fc1, mlp.fc2)


#: Tokens per group of :meth:`SwinBlock._forward_window_groups`: 64 windows of 7x7 measured
#: best of 16, 32, 64, 96 and 128 on a 2-core Zen 4 (Swin-T, batch 8, bf16).
WINDOW_GROUP_TOKENS = 3136

#: Fewest tokens in a stage (batch included) that are split into groups: below, the whole
#: stage fits in cache anyway and runs as one group (measured faster than smaller groups).
WINDOW_GROUPS_FROM_TOKENS = 6144


def window_group_size(windows: int, tokens: int) -> int:
    """Windows per group: about :data:`WINDOW_GROUP_TOKENS` tokens, and either a divisor of an
    image's ``windows`` or a multiple of it, so that a group never straddles two images part
    way (its mask is then one slice of the per-window mask, or all of it)."""
    group = max(1, WINDOW_GROUP_TOKENS // tokens)
    if group >= windows:
        return group // windows * windows
    while windows % group:
        group -= 1
    return group


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (timm's layout: at the start of the stage), then blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        downsample: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        drop_path: list[float],
        window_rule: WindowRule,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.attention_path: AttentionPath = "auto"
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                SwinBlock(
                    out_dim,
                    num_heads,
                    window_size,
                    shift=j % 2 == 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    drop_path=drop_path[j],
                    window_rule=window_rule,
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C)
        # Tracing: the window-order path bakes this shape's index maps into the graph; the
        # grid path's operator calls take the shape-generic route that exporters keep
        # dynamic. CUDA: the grid path is where the fused kernel serves.
        if not (is_tracing() or self._takes_grid_path(x)):
            out = run_in_window_order(self.blocks, x, self.grad_checkpointing)
            if out is not None:
                return out
        return self._forward_grid(x)

    def _takes_grid_path(self, x: torch.Tensor) -> bool:
        if x.shape[0] == 0:
            return True  # an empty batch: the operator's calls return empty outputs
        if self.attention_path == "auto":
            return fused_kernel_expected(x)
        return self.attention_path == "grid"

    def _forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool over (H, W), dropout, linear ``fc`` (timm's ``head.fc``)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # (B, C)
        if pre_logits:
            return x
        if isinstance(self.fc, nn.Linear) and not is_tracing():
            # The oneDNN linear keeps its cast (and packed) weight between no-grad calls;
            # autocast's nn.Linear recast Swin-T's 768x1000 weight every call (0.6 ms of a
            # 24 ms bf16 forward at batch 1).
            return fused.linear(x, self.fc)
        return self.fc(x)


@dataclass(frozen=True)
class SwinConfig:
    """Hyper-parameters of a Swin V1 model (defaults: Swin-T at 224)."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int | tuple[int, int] = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    window_rule: WindowRule = "official"
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        check_config(self)


class SwinTransformer(SwinBackbone):
    """Swin Transformer V1: patch embedding, stages of (shifted-)window blocks, pooled head.

    ``forward_features`` returns the final-norm map ``(B, H/32, W/32, C)`` (channels last, as
    timm); ``forward_head`` pools and classifies.

    Example:
        >>> model = SwinTransformer(SwinConfig(depths=(1, 1), num_heads=(2, 4), embed_dim=32))
        >>> model(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 1000])
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        window = to_2tuple(config.window_size, "window_size")
        num_stages = len(config.depths)
        dims = [config.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        # Stochastic depth grows linearly over the blocks (plain Python: builds on any device).
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        for i in range(num_stages):
            start = sum(config.depths[:i])
            stages.append(
                SwinStage(
                    dim=dims[max(i - 1, 0)],
                    out_dim=dims[i],
                    depth=config.depths[i],
                    num_heads=config.num_heads[i],
                    window_size=window,
                    downsample=i > 0,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    proj_drop=config.proj_drop_rate,
                    drop_path=rates[start : start + config.depths[i]],
                    window_rule=config.window_rule,
                )
            )
        self.layers = nn.Sequential(*stages)
        # The first stage holds the most activations per FLOP (tokens x width halves at each
        # stage while the FLOPs per block stay level): there, training recomputes the MLP's
        # hidden layer, in chunks. Swin-T, batch 8: activations 446 -> 373 MiB at about the
        # same step time (paired runs: 3% faster to 5% slower; docs/fast-path.md, item 5).
        for block in stages[0].blocks:
            block.recompute_mlp_hidden = True
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, config.num_classes, config.drop_rate)
        self.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: the relative-position bias tables."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def _register(name: str, **config: object) -> None:
    register_model(name, SwinTransformer, SwinConfig(**config))  # type: ignore[arg-type]


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

_register("swin_tiny_patch4_window7_224", **_T, drop_path_rate=0.2)
_register("swin_small_patch4_window7_224", **_S, drop_path_rate=0.3)
_register("swin_base_patch4_window7_224", **_B, drop_path_rate=0.5)
_register("swin_base_patch4_window12_384", **_B, img_size=384, window_size=12, crop_pct=1.0)
_register("swin_large_patch4_window7_224", **_L)
_register("swin_large_patch4_window12_384", **_L, img_size=384, window_size=12, crop_pct=1.0)
# The built-in demo: a small Swin for scikit-learn's 8x8 digits upsampled to 16x16, where each
# patch-2 token is one original pixel and the second stage's 4x4 window sees the whole digit.
_register(
    "swin_demo_patch2_window4_16",
    img_size=16,
    patch_size=2,
    num_classes=10,
    embed_dim=32,
    depths=(2, 2, 2),
    num_heads=(2, 4, 8),
    window_size=4,
    drop_path_rate=0.1,
    crop_pct=1.0,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
