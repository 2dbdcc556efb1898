"""The checks of a Swin V1/V2 config (:class:`~winattn.models.swin.SwinConfig` and V2's, which
adds its own): every field's type and range, and how the fields fit together, so that a bad
value fails when the config is made, named, and not deep inside the model's construction or
first forward."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Literal

from .base import check_int, is_int, to_2tuple

if TYPE_CHECKING:
    from .swin import SwinConfig

WindowRule = Literal["official", "timm", "torchvision"]
WINDOW_RULES = ("official", "timm", "torchvision")


def _check_real(name: str, value: object, low: float, high: float | None = None) -> None:
    """A real number (not a bool) with ``low <= value`` (``< high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (low <= value and (high is None or value < high)):  # NaN fails both
        expected = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_ints(name: str, values: object, minimum: int) -> tuple[int, ...]:
    """A non-empty sequence of ints, each at least ``minimum``."""
    try:
        items = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints (one per stage), got {values!r}") from None
    if not items or not all(is_int(i) for i in items) or min(items) < minimum:
        raise ValueError(
            f"{name} must be a non-empty tuple of ints >= {minimum} (one per stage), got "
            f"{values!r}"
        )
    return items


def check_config(config: SwinConfig) -> None:
    """Every field of a V1/V2 config: its type and range, and how the fields fit together (a
    stage's width divisible by its heads), so that a bad value fails here, named, and not
    deep inside the model's construction or first forward."""
    for name in ("patch_size", "in_chans", "embed_dim"):
        check_int(name, getattr(config, name), 1)
    check_int("num_classes", config.num_classes, 0)
    for size in to_2tuple(config.img_size, "img_size"):
        if size < 1:
            raise ValueError(f"img_size must be >= 1, got {config.img_size!r}")
    for w in to_2tuple(config.window_size, "window_size"):
        if w < 1:
            raise ValueError(f"window_size must be >= 1, got {config.window_size!r}")
    depths = _check_ints("depths", config.depths, 1)
    heads = _check_ints("num_heads", config.num_heads, 1)
    if len(depths) != len(heads):
        raise ValueError(
            f"depths {config.depths} and num_heads {config.num_heads} must have one entry per "
            f"stage"
        )
    for i, h in enumerate(heads):
        width = config.embed_dim * 2**i
        if width % h:
            raise ValueError(
                f"num_heads[{i}]={h} does not divide stage {i}'s width {width} (embed_dim "
                f"{config.embed_dim} * 2**{i}); expected a divisor of {width}"
            )
    _check_real("mlp_ratio", config.mlp_ratio, 0.0)
    if int(config.embed_dim * config.mlp_ratio) < 1:
        raise ValueError(
            f"mlp_ratio={config.mlp_ratio} leaves the first stage's MLP no hidden unit "
            f"(embed_dim {config.embed_dim}); expected embed_dim * mlp_ratio >= 1"
        )
    for name in ("drop_rate", "proj_drop_rate", "drop_path_rate"):
        _check_real(name, getattr(config, name), 0.0, 1.0)
    if config.window_rule not in WINDOW_RULES:
        raise ValueError(f"window_rule must be one of {WINDOW_RULES}, got {config.window_rule!r}")
    _check_real("crop_pct", config.crop_pct, 0.0)
    if config.crop_pct == 0:
        raise ValueError(f"crop_pct must be > 0, got {config.crop_pct!r}")
    mean, std = tuple(config.mean), tuple(config.std)
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean {config.mean} and std {config.std} must have one entry per channel")
    for m in mean:
        _check_real("mean", m, float("-inf"))
    for value in std:
        _check_real("std", value, 0.0)
        if value == 0:
            raise ValueError(f"std must hold numbers > 0, got {config.std!r}")
