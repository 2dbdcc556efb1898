"""Loading any Swin checkpoint into a winattn model: detect, convert, check, resize, load."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .convert import StateDict, to_native, unwrap
from .io import read_checkpoint

HEAD_PREFIX = "head.fc."
_TABLE_SUFFIX = ".relative_position_bias_table"

# (embed dim, depths) of the published sizes, to name what a checkpoint looks like.
_SIZE_NAMES = {
    (96, (2, 2, 6, 2)): "tiny",
    (96, (2, 2, 18, 2)): "small",
    (128, (2, 2, 18, 2)): "base",
    (192, (2, 2, 18, 2)): "large",
}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message says how."""


@dataclass(frozen=True)
class SwinLayout:
    """What a native Swin state dict says about the architecture that produced it."""

    version: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    patch_size: tuple[int, ...]
    in_chans: int
    num_classes: int | None  # None: no classifier in the checkpoint

    @property
    def name(self) -> str:
        size = _SIZE_NAMES.get((self.embed_dim, self.depths), "custom size")
        return f"{'swinv2' if self.version == 2 else 'swin'}_{size}"

    def describe(self) -> str:
        depths = "(" + ",".join(map(str, self.depths)) + ")"
        heads = "(" + ",".join(map(str, self.num_heads)) + ")"
        classes = "no head" if self.num_classes is None else f"{self.num_classes} classes"
        return (
            f"Swin V{self.version}, embed dim {self.embed_dim}, depths {depths}, heads {heads}, "
            f"patch {self.patch_size[0]}, {self.in_chans} input channels, {classes}: {self.name}"
        )


def infer_layout(state_dict: Mapping[str, Tensor]) -> SwinLayout:
    """Read the architecture off a native (timm-layout) Swin state dict."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointMismatchError(
            "checkpoint: no patch_embed.proj.weight after conversion; not a Swin state dict"
        )
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    for key, value in state_dict.items():
        m = re.match(
            r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.(relative_position_bias_table|logit_scale)$", key
        )
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            heads[stage] = value.shape[1] if m.group(3) != "logit_scale" else value.shape[0]
    stages = range(max(depths, default=-1) + 1)
    head = state_dict.get(HEAD_PREFIX + "weight")
    return SwinLayout(
        version=2 if any(k.endswith("logit_scale") for k in state_dict) else 1,
        embed_dim=proj.shape[0],
        depths=tuple(depths.get(i, 0) for i in stages),
        num_heads=tuple(heads.get(i, 0) for i in stages),
        patch_size=tuple(proj.shape[2:]),
        in_chans=proj.shape[1],
        num_classes=None if head is None else head.shape[0],
    )


def resize_bias_table(table: Tensor, window_size: tuple[int, int]) -> Tensor:
    """Resize a V1 relative-position bias table to another window, as the official loader does.

    The ``((2w-1)^2, heads)`` table is viewed per head as a ``(2w-1) x (2w-1)`` image and resized
    by bicubic interpolation (``align_corners=False``, no antialiasing), exactly as
    ``load_pretrained`` in microsoft/Swin-Transformer. The source window must be square (every
    published checkpoint is); the target may not be.

    Args:
        table: ``(L, heads)`` with ``L = (2w-1)^2``.
        window_size: the target window ``(wh, ww)``.

    Returns:
        ``((2wh-1) * (2ww-1), heads)`` in the input's dtype.
    """
    length, heads = table.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"table: {length} rows is not a square (2w-1)^2 table")
    target = (2 * window_size[0] - 1, 2 * window_size[1] - 1)
    grid = table.float().permute(1, 0).reshape(1, heads, side, side)  # (1, heads, 2w-1, 2w-1)
    resized = nn.functional.interpolate(grid, size=target, mode="bicubic", align_corners=False)
    return resized.reshape(heads, -1).permute(1, 0).to(table.dtype).contiguous()  # (L', heads)


def _target_window(model: nn.Module, key: str, length: int) -> tuple[int, int]:
    """The window of the attention module owning ``key``; square from the table size otherwise."""
    try:
        window = getattr(model.get_submodule(key[: -len(_TABLE_SUFFIX)]), "window_size", None)
    except AttributeError:
        window = None
    if window is not None:
        window = (window, window) if isinstance(window, int) else tuple(window)
        if len(window) == 2:
            return window
    side = math.isqrt(length)
    return ((side + 1) // 2, (side + 1) // 2)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    format: str
    source: str
    resized: list[str] = field(default_factory=list)  # bias tables interpolated to the window
    head_dropped: bool = False
    missing_keys: list[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected_keys: list[str] = field(default_factory=list)  # idem

    def __str__(self) -> str:
        parts = [f"loaded {self.format} checkpoint from {self.source}"]
        if self.resized:
            parts.append(f"{len(self.resized)} bias tables resized")
        if self.head_dropped:
            parts.append("classifier left freshly initialised")
        if self.missing_keys or self.unexpected_keys:
            parts.append(
                f"{len(self.missing_keys)} missing, {len(self.unexpected_keys)} unexpected keys"
            )
        return "; ".join(parts)


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_layout(ckpt: StateDict, target: StateDict, source: str, drop_head: bool) -> None:
    have, want = infer_layout(ckpt), infer_layout(target)
    same_body = (have.version, have.embed_dim, have.depths, have.num_heads, have.patch_size,
                 have.in_chans) == (want.version, want.embed_dim, want.depths, want.num_heads,
                                    want.patch_size, want.in_chans)
    if not same_body:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit the model:\n  checkpoint: {have.describe()}\n"
            f"  model:      {want.describe()}"
        )
    if drop_head or have.num_classes is None or want.num_classes is None:
        return
    if have.num_classes != want.num_classes:
        raise CheckpointMismatchError(
            f"checkpoint {source} has a {have.num_classes}-class head, the model "
            f"{want.num_classes} classes; pass drop_head=True to keep the model's fresh head "
            "and fine-tune it"
        )


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping,
    *,
    drop_head: bool = False,
    strict: bool = True,
    prefer_ema: bool = False,
) -> LoadReport:
    """Load a Swin V1/V2 checkpoint of any public layout into ``model``.

    The checkpoint's layout (official, timm, torchvision, Hugging Face) is detected and converted
    to the native one; V1 bias tables of another window are resized by bicubic interpolation (as
    the official fine-tuning code does); everything else must match key for key and shape for
    shape.

    Args:
        model: a winattn Swin model (or any module with timm's Swin state-dict layout).
        source: a state dict (possibly wrapped under ``model``/``state_dict``), a file (``.pth``,
            ``.pt``, ``.bin`` read with ``torch.load(weights_only=True)``, ``.safetensors``), or a
            folder laid out like a Hugging Face hub repo or cache entry.
        drop_head: ignore the checkpoint's classifier and keep the model's freshly initialised
            one (fine-tuning to another class count, or loading a headless checkpoint).
        strict: raise on missing or unexpected keys; with False they are only reported. Shape
            mismatches always raise.
        prefer_ema: load the EMA weights of a timm training checkpoint when it has them.

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointReadError: unreadable/corrupt file (the message names the path).
        CheckpointMismatchError: another architecture or size, another class count, missing or
            unexpected keys, or shape mismatches.

    Example:
        >>> import winattn  # doctest: +SKIP
        >>> name = "swin_tiny_patch4_window7_224"  # doctest: +SKIP
        >>> model = winattn.create_model(name, num_classes=10)  # doctest: +SKIP
        >>> report = load_checkpoint(model, "swin_tiny.pth", drop_head=True)  # doctest: +SKIP
    """
    raw, where = read_checkpoint(source)
    ckpt, fmt = to_native(unwrap(raw, prefer_ema=prefer_ema))
    target = model.state_dict()
    _check_layout(ckpt, target, where, drop_head)
    report = LoadReport(format=fmt, source=where)

    if drop_head:
        dropped = [k for k in ckpt if k.startswith(HEAD_PREFIX)]
        for key in dropped:
            del ckpt[key]
        for key in target:
            if key.startswith(HEAD_PREFIX):
                ckpt[key] = target[key]
        report.head_dropped = True

    mismatched = []
    for key, value in list(ckpt.items()):
        if key not in target or value.shape == target[key].shape:
            continue
        want = target[key]
        if key.endswith(_TABLE_SUFFIX) and value.ndim == 2 and value.shape[1] == want.shape[1]:
            ckpt[key] = resize_bias_table(value, _target_window(model, key, want.shape[0]))
            if ckpt[key].shape == want.shape:
                report.resized.append(key)
                continue
        mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(want.shape)}")

    missing = sorted(set(target) - set(ckpt))
    unexpected = sorted(set(ckpt) - set(target))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if problems:
        hint = ""
        if strict and missing and all(k.startswith(HEAD_PREFIX) for k in missing):
            hint = "\n(the checkpoint has no classifier: pass drop_head=True to keep the model's)"
        elif strict and unexpected and all(k.startswith(HEAD_PREFIX) for k in unexpected):
            hint = "\n(the model has no classifier: pass drop_head=True to ignore the checkpoint's)"
        raise CheckpointMismatchError(
            f"checkpoint {where} ({fmt} layout) does not match the model:\n  "
            + "\n  ".join(problems) + hint
        )
    report.missing_keys, report.unexpected_keys = missing, unexpected
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in ckpt.items() if k in target}, strict=False)
    return report
