"""The model registry: timm's names, ``create_model`` and ``list_models``."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant: its name, builder and default configuration."""

    name: str
    build: Callable[..., nn.Module]  # build(config) -> model
    config: Any  # a config dataclass instance with the variant's defaults


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, build: Callable[..., nn.Module], config: Any) -> None:
    """Register ``name`` (timm's name for the variant) with its builder and default config."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name=name, build=build, config=config)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters with shell wildcards (``"swin*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if name.split("_")[0] in n][:8]
        hint = f"; similar: {close}" if close else ""
        raise ValueError(f"unknown model {name!r}: see winattn.list_models(){hint}")
    return _REGISTRY[name]


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Any = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    window_size: int | None = None,
    drop_path_rate: float | None = None,
    in_chans: int | None = None,
    strict: bool = True,
    drop_head: bool = False,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    output_fmt: str = "NCHW",
    global_pool: str | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models` (timm's names).
        pretrained: download timm's published weights for ``name`` through huggingface_hub.
        checkpoint: a path (.pth/.pt/.bin/.safetensors), a state dict, or a directory laid out
            like a Hugging Face hub repository, in any supported format (official, timm,
            torchvision, Hugging Face).
        num_classes, img_size, window_size, drop_path_rate, in_chans: override the variant's
            config; any other config field may be overridden by keyword.
        strict: with ``checkpoint``/``pretrained``: raise on missing or unexpected keys.
        drop_head: with ``checkpoint``/``pretrained``: skip the checkpoint's classifier and keep
            the freshly initialised head (fine-tuning with another ``num_classes``).
        features_only: return a backbone producing the stage maps (strides 4/8/16/32) listed in
            ``out_indices`` (None: every stage), laid out ``output_fmt`` ("NCHW" or "NHWC"),
            with ``feature_info`` (see ``winattn.models.features.SwinFeatures``).
        global_pool: as timm's: None or ``"avg"``, the average pooling of Swin's head (the
            only one it has).

    Example:
        >>> model = create_model("swin_tiny_patch4_window7_224", num_classes=10)
        >>> model.num_classes
        10
    """
    entry = model_entry(name)
    if global_pool not in (None, "avg"):
        raise ValueError(
            f"global_pool must be None or 'avg' (the average pooling of Swin's head), got "
            f"{global_pool!r}"
        )
    overrides = dict(config_overrides)
    for key, value in (
        ("num_classes", num_classes),
        ("img_size", img_size),
        ("window_size", window_size),
        ("drop_path_rate", drop_path_rate),
        ("in_chans", in_chans),
    ):
        if value is not None:
            overrides[key] = value
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"create_model({name!r}) got unknown config fields {unknown}; known: {sorted(fields)}"
        )
    config = dataclasses.replace(entry.config, **overrides)
    model = entry.build(config)
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    if pretrained:
        from ..checkpoints import resolve_pretrained

        checkpoint = resolve_pretrained(name)
    if checkpoint is not None:
        from ..checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint, strict=strict, drop_head=drop_head)
    if features_only:
        from .features import SwinFeatures

        model = SwinFeatures(model, out_indices=out_indices, output_fmt=output_fmt)
    return model
