"""What every Swin backbone shares: data config, features, the timm-style head interface."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.checks import is_int


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, refusing anything but an integer of at least ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)  # type: ignore[arg-type]


def to_2tuple(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints."""
    if is_int(value):
        return (int(value), int(value))  # type: ignore[arg-type]
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(is_int(i) for i in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(items[0]), int(items[1]))


def stage_feature_sizes(config: object, num_stages: int) -> list[tuple[int, int]]:
    """The feature map of each of the first ``num_stages`` stages at ``config.img_size``: the
    patch grid (padded up), then halved (rounded up) by each stage's 2x2 merging."""
    height, width = to_2tuple(config.img_size, "img_size")  # type: ignore[attr-defined]
    patch = config.patch_size  # type: ignore[attr-defined]
    feature = (math.ceil(height / patch), math.ceil(width / patch))
    sizes = []
    for i in range(num_stages):
        if i > 0:
            feature = (math.ceil(feature[0] / 2), math.ceil(feature[1] / 2))
        sizes.append(feature)
    return sizes


class SwinBackbone(nn.Module):
    """Base of Swin V1 and V2: subclasses build ``patch_embed``, ``layers`` (stages with a
    ``grad_checkpointing`` flag), ``norm``, ``head`` (with ``fc``) and set ``config``,
    ``num_classes`` and ``num_features``."""

    @property
    def data_config(self) -> dict:
        """Input size, normalisation and resize settings the model was configured for."""
        height, width = to_2tuple(self.config.img_size, "img_size")
        return {
            "input_size": (self.config.in_chans, height, width),
            "mean": self.config.mean,
            "std": self.config.std,
            "interpolation": "bicubic",
            "crop_pct": self.config.crop_pct,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` images -> ``(B, H/32, W/32, num_features)`` after the final norm."""
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        x = self.layers(x)
        return self.norm(x)

    @property
    def feature_info(self) -> list[dict]:
        """Per stage: channels, stride in pixels and module name (timm's ``feature_info``)."""
        return [
            {
                "num_chs": self.config.embed_dim * 2**i,
                "reduction": self.config.patch_size * 2**i,
                "module": f"layers.{i}",
            }
            for i in range(len(self.layers))
        ]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as timm returns them.

        See :func:`winattn.models.features.forward_intermediates`.
        """
        from .features import forward_intermediates

        return forward_intermediates(
            self,
            x,
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``(B, H, W, C)`` features; return pooled features or logits ``(B, classes)``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier layer (``head.fc``; an ``nn.Identity`` without one), as timm's."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier).

        ``global_pool`` as timm's: None or ``"avg"``, the pooling Swin's head has."""
        num_classes = check_int("num_classes", num_classes, 0)
        if global_pool not in (None, "avg"):
            raise ValueError(
                f"global_pool must be None or 'avg' (the average pooling of Swin's head), got "
                f"{global_pool!r}"
            )
        self.num_classes = num_classes
        self.head.fc = nn.Identity()
        if num_classes > 0:
            self.head.fc = nn.Linear(self.num_features, num_classes)
            _init_weights(self.head.fc)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def set_attention_path(self, path: str = "auto") -> None:
        """How the stages run attention: ``"window-order"`` (the CPU fast path), ``"grid"``
        (operator calls, the fused Triton kernel on CUDA) or ``"auto"`` (grid on CUDA with
        triton installed, else window order). Both compute the same function; only speed
        differs."""
        paths = ("auto", "window-order", "grid")
        if path not in paths:
            raise ValueError(f"path={path!r} is not one of {paths}")
        for stage in self.layers:
            if hasattr(stage, "attention_path"):
                stage.attention_path = path


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
