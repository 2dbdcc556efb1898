"""Swin Transformer V2 (Liu et al., 2022) on winattn's windowed-attention operator.

Parameter names and shapes are timm's (``swinv2_*``), key for key. Compared with V1: the residual
branches are post-normalised (``x + norm(attn(x))``), attention is scaled cosine attention with a
continuous position bias (:class:`~winattn.layers.WindowAttentionV2`), and patch merging applies
the reduction before the norm. Any input resolution runs on one model object, as in V1.

Reads top to bottom: block -> stage -> model -> checkpoint checks -> config -> registered variants.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import DropPath, Mlp, PatchEmbed, PatchMerging, fused, fused_norm
from ..layers.attention_v2 import WindowAttentionV2
from ..ops import WindowPlan
from ..ops.traceable import is_tracing
from .base import SwinBackbone, stage_feature_sizes
from .registry import register_model
from .swin import (
    AttentionPath,
    ClassifierHead,
    SwinConfig,
    WindowRule,
    _init_weights,
    attend_in_windows,
    block_plan,
    fused_kernel_expected,
    resolve_window,
    run_in_window_order,
    to_2tuple,
)


class SwinV2Block(nn.Module):
    """Post-norm block: ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))``, on ``(B, H, W, C)``.

    The map is zero-padded up to a multiple of the window before the cyclic shift (torchvision
    and Hugging Face); the padded tokens take part as keys, as in those peers.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        shift: bool,
        pretrained_window_size: tuple[int, int],
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
        self.attn = WindowAttentionV2(dim, num_heads, pretrained_window_size, qkv_bias, proj_drop)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path)
        #: Training on the CPU: recompute the MLP's hidden layer in backward instead of
        #: keeping it (see :func:`~winattn.layers.fused_norm.mlp`).
        self.recompute_mlp_hidden = False

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        return attend_in_windows(self.attn, x, self.window_size, self.shift_size, self.window_rule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self._attention(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))

    def plan(self, height: int, width: int, device: torch.device) -> WindowPlan:
        """The window plan of this block on an ``height x width`` map, padded to its window."""
        return block_plan(self, height, width, device)

    def forward_windows(
        self, x: torch.Tensor, plan: WindowPlan, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block on tokens kept in ``plan``'s window order: ``(B, L, C)`` -> same.
        ``padding`` ``(L, 1)`` (True on padded slots) zeroes them at the attention's input, as
        the grid path's zero-padding does; what they hold otherwise is never read."""
        if not (torch.is_grad_enabled() or self.training) and fused.inference_ready(
            x, self.attn.qkv
        ):
            return self._infer(x, plan, padding)
        attn_in = x if padding is None else x.masked_fill(padding, 0.0)
        x = x + self.drop_path1(self.norm1(self.attn.forward_windows(attn_in, plan)))
        mlp = self.mlp
        if self.training and (mlp.drop1.p or mlp.drop2.p):
            mlp_out = mlp(x)
        else:
            mlp_out = fused_norm.mlp(x, mlp.fc1, mlp.fc2, self.recompute_mlp_hidden)
        return x + self.drop_path2(self.norm2(mlp_out))

    def _infer(
        self, x: torch.Tensor, plan: WindowPlan, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """Eval of :meth:`forward_windows` where :func:`fused.inference_ready`, as V1's
        ``SwinBlock._infer``: the four linears' weights from one lookup, the qkv bias and
        logit scale cached (:meth:`WindowAttentionV2.inference_constants`), bare oneDNN
        calls, each intermediate released once used."""
        attn, mlp = self.attn, self.mlp
        (w_qkv, _), (w_proj, b_proj), (w_fc1, b_fc1), (w_fc2, b_fc2) = (
            fused.inference_weights(self, (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), x.dtype)
        )
        qkv_bias, logit_scale = attn.inference_constants(x.dtype)
        attn_in = x if padding is None else x.masked_fill(padding, 0.0)
        qkv = fused.infer_linear(attn_in, w_qkv, qkv_bias)
        del attn_in
        out = attn.attend_inference(qkv, plan, logit_scale)
        del qkv
        y = fused.infer_linear(out, w_proj, b_proj)
        del out
        norm = self.norm1
        x = x + torch.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        del y
        y = fused.infer_linear(fused.infer_linear(x, w_fc1, b_fc1, gelu=True), w_fc2, b_fc2)
        norm = self.norm2
        return x + torch.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class SwinV2Stage(nn.Module):
    """Optional 2x2 patch merging (reduction, then norm; at the start of the stage), then blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        pretrained_window_size: tuple[int, int],
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
        self.downsample = (
            PatchMerging(dim, out_dim, norm_first=False) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[
                SwinV2Block(
                    out_dim,
                    num_heads,
                    window_size,
                    shift=j % 2 == 1,
                    pretrained_window_size=pretrained_window_size,
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
        x = self.downsample(x)
        if self._takes_window_order(x):
            out = run_in_window_order(self.blocks, x, self.grad_checkpointing)
            if out is not None:
                return out
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)

    def _takes_window_order(self, x: torch.Tensor) -> bool:
        """Whether the tokens stay in window order through the stage, as in V1's stages
        (``attention_path`` as there); tracing takes the grid path."""
        if is_tracing() or x.shape[0] == 0:  # an empty batch: the grid path's calls return
            return False  # empty outputs
        if self.attention_path == "auto":
            return not fused_kernel_expected(x)
        return self.attention_path == "window-order"


@dataclass(frozen=True)
class SwinV2Config(SwinConfig):
    """Hyper-parameters of a Swin V2 model (defaults: SwinV2-T, window 8, at 256).

    Attributes (beyond :class:`~winattn.SwinConfig`):
        pretrained_window_sizes: per stage, the window the continuous position bias was trained
            at; 0: the window in use. Fine-tuned checkpoints (``*_window12to16_*``) need the
            pre-training windows here, or their CPB sees coordinates on another scale.
            None: 0 for every stage.
    """

    img_size: int | tuple[int, int] = 256
    window_size: int | tuple[int, int] = 8
    pretrained_window_sizes: tuple[int, ...] | None = None

    @property
    def stage_pretrained_windows(self) -> tuple[int, ...]:
        """``pretrained_window_sizes`` with None spelled out as one 0 per stage."""
        return self.pretrained_window_sizes or (0,) * len(self.depths)

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.pretrained_window_sizes
        if sizes is None:
            return
        if not isinstance(sizes, tuple) or len(sizes) != len(self.depths):
            raise ValueError(
                f"pretrained_window_sizes must be a tuple with one window per stage "
                f"({len(self.depths)} stages), got {sizes!r}"
            )
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"pretrained_window_sizes must hold ints >= 0 (0: the window in use), got "
                    f"{sizes!r}"
                )


class SwinTransformerV2(SwinBackbone):
    """Swin Transformer V2: patch embedding, post-norm cosine-attention stages, pooled head.

    ``forward_features`` returns the final-norm map ``(B, H/32, W/32, C)`` (channels last, as
    timm); ``forward_head`` pools and classifies. Initialisation follows timm and the official
    code, including zeroed post-norms (every block starts as the identity).

    Example:
        >>> model = SwinTransformerV2(SwinV2Config(depths=(1, 1), num_heads=(2, 4), embed_dim=32))
        >>> model(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 1000])
    """

    def __init__(self, config: SwinV2Config) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        window = to_2tuple(config.window_size, "window_size")
        num_stages = len(config.depths)
        dims = [config.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        stages = []
        for i in range(num_stages):
            start = sum(config.depths[:i])
            stages.append(
                SwinV2Stage(
                    dim=dims[max(i - 1, 0)],
                    out_dim=dims[i],
                    depth=config.depths[i],
                    num_heads=config.num_heads[i],
                    window_size=window,
                    pretrained_window_size=to_2tuple(
                        config.stage_pretrained_windows[i], "pretrained_window_sizes"
                    ),
                    downsample=i > 0,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    proj_drop=config.proj_drop_rate,
                    drop_path=rates[start : start + config.depths[i]],
                    window_rule=config.window_rule,
                )
            )
        self.layers = nn.Sequential(*stages)
        # As in V1: the first stage recomputes its MLPs' hidden layers in training. SwinV2-T
        # w8, batch 8, same-process A/B: activations 876 -> 780 MiB (fp32), 584 -> 536 (bf16),
        # steps 1.04-1.06x (fp32) and 1.11-1.29x (bf16) as fast; the second stage as well
        # saved 48-96 MiB more at level speed, so it keeps its hidden layers.
        for block in stages[0].blocks:
            block.recompute_mlp_hidden = True
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, config.num_classes, config.drop_rate)
        self.apply(_init_weights)
        for stage in self.layers:
            for block in stage.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: the CPB MLPs and logit scales (timm)."""
        return {
            n for n, _ in self.named_parameters() if "cpb_mlp" in n or "logit_scale" in n
        }

    def check_checkpoint_buffers(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check the CPB coordinate tables a checkpoint carries against this model's settings.

        Official and torchvision checkpoints keep each block's ``relative_coords_table``; its
        largest entry tells by which window the coordinates were normalised
        (``pretrained_window_size - 1`` or ``window - 1``). The CPB MLP only gives the trained
        biases when the model normalises by the same window; a fine-tuned checkpoint loaded
        without its ``pretrained_window_sizes`` silently gives other outputs. Official/timm keys
        (``layers.{i}.blocks.{j}.attn.relative_coords_table``) and torchvision keys
        (``features.{2i+1}.{j}.attn.relative_coords_table``) are read; checkpoints without
        tables (timm, Hugging Face) pass. Call it on the raw state dict, before conversion
        drops the buffers.

        Raises:
            ValueError: naming the stage, the checkpoint's window and the setting to use.
        """
        expected = cpb_divisors(self)
        for key, table in state_dict.items():
            official = _OFFICIAL_TABLE.match(key)
            torchvision = _TORCHVISION_TABLE.match(key)
            if official:
                stage = int(official.group(1))
            elif torchvision and int(torchvision.group(1)) % 2 == 1:
                stage = (int(torchvision.group(1)) - 1) // 2
            else:
                continue
            if stage >= len(expected):
                continue
            found = _table_divisor(table)
            if found is None or expected[stage] is None:
                continue
            if found != expected[stage]:
                ckpt_window = found[0] + 1
                raise ValueError(
                    f"{key}: the checkpoint's position-bias coordinates of stage {stage} were "
                    f"normalised by a window of {ckpt_window}, the model normalises by "
                    f"{expected[stage][0] + 1} (window_size={self.config.window_size}, "
                    f"pretrained_window_sizes={self.config.pretrained_window_sizes}); build the "
                    f"model with pretrained_window_sizes[{stage}]={ckpt_window}"
                )


# Where the coordinate tables sit: official/timm ``layers.{i}.blocks.{j}``, torchvision
# ``features.{2i+1}.{j}``.
_OFFICIAL_TABLE = re.compile(
    r"^(?:module\.)?layers\.(\d+)\.blocks\.\d+\.attn\.relative_coords_table$"
)
_TORCHVISION_TABLE = re.compile(
    r"^(?:module\.)?features\.(\d+)\.\d+\.attn\.relative_coords_table$"
)


def _table_divisor(table: torch.Tensor) -> tuple[int, int] | None:
    """The ``(pretrained) window - 1`` a stored ``(1, 2wh-1, 2ww-1, 2)`` table was divided by."""
    if table.dim() != 4 or table.shape[-1] != 2:
        return None
    divisors = []
    for axis, size in enumerate(table.shape[1:3]):
        largest = float(table[..., axis].abs().max())
        offset = (size - 1) // 2  # the largest offset, window - 1
        if offset == 0 or largest == 0:
            return None
        scaled = 2 ** (largest * math.log2(8)) - 1  # = 8 * offset / divisor
        divisors.append(round(8 * offset / scaled))
    return divisors[0], divisors[1]


def cpb_divisors(model: SwinTransformerV2) -> list[tuple[int, int] | None]:
    """Per stage, the divisor the model uses at its configured image size."""
    features = stage_feature_sizes(model.config, len(model.layers))
    divisors: list[tuple[int, int] | None] = []
    for feature, stage in zip(features, model.layers):
        block = stage.blocks[0] if len(stage.blocks) else None
        if block is None:
            divisors.append(None)
            continue
        window, _ = resolve_window(feature, block.window_size, (0, 0), block.window_rule)
        pretrained = block.attn.pretrained_window_size
        source = pretrained if pretrained[0] > 0 else window
        divisors.append((max(source[0] - 1, 1), max(source[1] - 1, 1)))
    return divisors


def _register(name: str, **config: object) -> None:
    register_model(name, SwinTransformerV2, SwinV2Config(**config))  # type: ignore[arg-type]


# timm's defaults for every V2 variant: drop path 0.1, crop 0.9 (1.0 at 384), ImageNet-1k heads
# except the 22k pre-training checkpoints (21841 classes).
_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FROM_192 = dict(pretrained_window_sizes=(12, 12, 12, 6))

_register("swinv2_tiny_window8_256", **_T, window_size=8)
_register("swinv2_tiny_window16_256", **_T, window_size=16)
_register("swinv2_small_window8_256", **_S, window_size=8)
_register("swinv2_small_window16_256", **_S, window_size=16)
_register("swinv2_base_window8_256", **_B, window_size=8)
_register("swinv2_base_window16_256", **_B, window_size=16)
_register("swinv2_base_window12_192", **_B, img_size=192, window_size=12, num_classes=21841)
_register("swinv2_base_window12to16_192to256", **_B, window_size=16, **_FROM_192)
_register(
    "swinv2_base_window12to24_192to384", **_B, img_size=384, window_size=24, crop_pct=1.0,
    **_FROM_192,
)
_register("swinv2_large_window12_192", **_L, img_size=192, window_size=12, num_classes=21841)
_register("swinv2_large_window12to16_192to256", **_L, window_size=16, **_FROM_192)
_register(
    "swinv2_large_window12to24_192to384", **_L, img_size=384, window_size=24, crop_pct=1.0,
    **_FROM_192,
)
