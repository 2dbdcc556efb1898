"""Loading any Swin checkpoint into a winattn model: detect, convert, check, resize, load."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.base import stage_feature_sizes, to_2tuple
from ..models.config_checks import WINDOW_RULES
from ..models.swin import resolve_window
from ..models.swin_v2 import cpb_divisors
from .convert import CheckpointMismatchError, StateDict, to_native, unwrap
from .io import RawCheckpoint, open_checkpoint

HEAD_PREFIX = "head.fc."
_TABLE_SUFFIX = ".relative_position_bias_table"
_TABLE_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
# transformers' Swinv2Config defaults, for the keys save_pretrained leaves out of config.json.
_HF_DEFAULTS = (
    ("image_size", 224), ("patch_size", 4), ("window_size", 7),
    ("pretrained_window_sizes", [0, 0, 0, 0]),
)

# (embed dim, depths) of the published sizes, to name what a checkpoint looks like.
_SIZE_NAMES = {
    (96, (2, 2, 6, 2)): "tiny",
    (96, (2, 2, 18, 2)): "small",
    (128, (2, 2, 18, 2)): "base",
    (192, (2, 2, 18, 2)): "large",
}


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


def infer_layout(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> SwinLayout:
    """Read the architecture off a native (timm-layout) Swin state dict.

    ``source`` names the state dict in the error raised when it has no patch embedding.
    """
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointMismatchError(
            f"{source}: no patch_embed.proj.weight after conversion (first keys: {sample}); "
            "not a Swin state dict"
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
        raise ValueError(
            f"table: {length} rows is not a square (2w-1)^2 table; expected the table of a "
            "square window"
        )
    target = (2 * window_size[0] - 1, 2 * window_size[1] - 1)
    grid = table.float().permute(1, 0).reshape(1, heads, side, side)  # (1, heads, 2w-1, 2w-1)
    resized = nn.functional.interpolate(grid, size=target, mode="bicubic", align_corners=False)
    return resized.reshape(heads, -1).permute(1, 0).to(table.dtype).contiguous()  # (L', heads)


def _embed_bias_table(
    table: Tensor, window_size: tuple[int, int], table_window: tuple[int, int]
) -> Tensor:
    """The table of ``window_size`` in the centre of a ``table_window`` table.

    A window shrunk to its feature map reads the centre of its block's table (the offsets up to
    its own size), so placed there the smaller table gives the same biases. Larger offsets are
    never read at that map size; they take the values at the table's edge (replicated), the
    nearest offsets the checkpoint knows.
    """
    heads = table.shape[1]
    inner = (2 * window_size[0] - 1, 2 * window_size[1] - 1)
    rows = table.float().permute(1, 0).reshape(1, heads, *inner)  # (1, heads, 2wh-1, 2ww-1)
    pad_h, pad_w = table_window[0] - window_size[0], table_window[1] - window_size[1]
    padded = nn.functional.pad(rows, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    return padded.reshape(heads, -1).permute(1, 0).to(table.dtype).contiguous()  # (L', heads)


@dataclass(frozen=True)
class _TableWindows:
    """The windows behind one bias table of the model."""

    table: tuple[int, int]  # the window the model's table is built for (its configured window)
    used: tuple[int, int]  # the window the block uses at the model's img_size
    stage: int | None = None  # None: the model does not say (no config); used = table
    feature: tuple[int, int] | None = None  # the stage's map at img_size
    img_size: tuple[int, int] | None = None
    rule: str | None = None


def _table_windows(model: nn.Module, key: str, rows: int) -> _TableWindows:
    """Which window the model's table ``key`` (``rows`` rows) serves, and which one it uses."""
    try:
        attn = model.get_submodule(key[: -len(_TABLE_SUFFIX)])
        block = model.get_submodule(key[: -len(".attn" + _TABLE_SUFFIX)])
    except AttributeError:
        attn = block = None
    window = getattr(attn, "window_size", None)
    if window is None:
        side = (math.isqrt(rows) + 1) // 2
        return _TableWindows((side, side), (side, side))
    table = to_2tuple(window, "window_size")
    match = _TABLE_KEY.match(key)
    config = getattr(model, "config", None)
    rule = getattr(block, "window_rule", None)
    if match is None or rule is None or not hasattr(config, "img_size"):
        return _TableWindows(table, table)
    stage = int(match.group(1))
    feature = stage_feature_sizes(config, stage + 1)[stage]
    used, _ = resolve_window(feature, table, (0, 0), rule)
    img_size = to_2tuple(config.img_size, "img_size")
    return _TableWindows(table, tuple(used), stage, feature, img_size, rule)


def _fit_bias_table(value: Tensor, windows: _TableWindows, key: str, where: str) -> Tensor:
    """A checkpoint's V1 bias table made to fit the model's table of ``windows.table``.

    The rule, per stage, from the window the block uses at the model's ``img_size``:

    - the checkpoint's table is that window's (a peer built at this size shrank the window to
      the map, as official, timm and Hugging Face do): it goes in the centre of the model's
      table, where the shrunk window reads it; exact;
    - otherwise (a square table of another window): bicubic resize to the window in use, as
      the official fine-tuning code does (7 -> 12 for the 384 fine-tunes), then into the centre
      if that window is shrunk.
    """
    rows = value.shape[0]
    used = windows.used
    used_rows = (2 * used[0] - 1) * (2 * used[1] - 1)
    if rows == used_rows:
        fitted = value
    elif math.isqrt(rows) ** 2 == rows:
        fitted = resize_bias_table(value, used)
    else:
        raise CheckpointMismatchError(_unfit_table_message(value, windows, key, where))
    if used != windows.table:
        fitted = _embed_bias_table(fitted, used, windows.table)
    return fitted


def _unfit_table_message(value: Tensor, windows: _TableWindows, key: str, where: str) -> str:
    rows, heads = value.shape
    used = windows.used
    used_rows = (2 * used[0] - 1) * (2 * used[1] - 1)
    message = (
        f"{key} in checkpoint {where}: a bias table of shape {tuple(value.shape)} fits no window "
        f"of the model; expected ((2w-1)^2, {heads}) for a square window w, or ({used_rows}, "
        f"{heads}) for the {used[0]}x{used[1]} window"
    )
    if windows.stage is None:
        return message + " of the model's table"
    message += (
        f" stage {windows.stage} uses at img_size {windows.img_size} (a {windows.feature[0]}x"
        f"{windows.feature[1]} map, window_rule={windows.rule!r})"
    )
    for rule in WINDOW_RULES:
        other, _ = resolve_window(windows.feature, windows.table, (0, 0), rule)
        if rule != windows.rule and (2 * other[0] - 1) * (2 * other[1] - 1) == rows:
            return message + (
                f"; with window_rule={rule!r} that stage uses a {other[0]}x{other[1]} window, "
                f"which fits: build the model with window_rule={rule!r}"
            )
    return message


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    format: str
    source: str
    resized: list[str] = field(default_factory=list)  # bias tables fitted to the model's window
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


def _outside(key: str, num_stages: int) -> bool:
    """Whether ``key`` belongs to the part a backbone drops: final norm, head, later stages."""
    stage = re.match(r"^layers\.(\d+)\.", key)
    return key.startswith((HEAD_PREFIX, "norm.")) or (
        stage is not None and int(stage.group(1)) >= num_stages
    )


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_layout(
    ckpt: StateDict, target: StateDict, source: str, drop_head: bool, strict: bool
) -> SwinLayout:
    """Raise unless the checkpoint's architecture is the model's; return the model's layout.

    A model holding only the first stages of the architecture (a ``features_only`` backbone
    with ``out_indices=(0, 1)``) takes those stages of a full checkpoint with ``strict=False``;
    the later stages, final norm and head are then reported as unexpected keys.
    """
    have, want = infer_layout(ckpt, f"checkpoint {source}"), infer_layout(target, "model")
    stages = len(want.depths)
    prefix = (have.depths[:stages], have.num_heads[:stages]) == (want.depths, want.num_heads)
    fits = have.depths == want.depths and have.num_heads == want.num_heads
    if not strict and prefix:
        fits = True
    same_body = fits and (have.version, have.embed_dim, have.patch_size, have.in_chans) == (
        want.version, want.embed_dim, want.patch_size, want.in_chans
    )
    if not same_body:
        hint = ""
        if prefix and len(have.depths) > stages:
            hint = (
                f"\n(the model holds the first {stages} of the checkpoint's "
                f"{len(have.depths)} stages: pass strict=False to load those)"
            )
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit the model:\n  checkpoint: {have.describe()}\n"
            f"  model:      {want.describe()}{hint}"
        )
    if drop_head or have.num_classes is None or want.num_classes is None:
        return want
    if have.num_classes != want.num_classes:
        raise CheckpointMismatchError(
            f"checkpoint {source} has a {have.num_classes}-class head, the model "
            f"{want.num_classes} classes; pass drop_head=True to keep the model's fresh head "
            "and fine-tune it"
        )
    return want


def _hf_windows(config: Mapping, num_stages: int) -> list[tuple[int, int] | None]:
    """Per stage, the window transformers' Swinv2 normalised its CPB coordinates by.

    That is the stage's ``pretrained_window_sizes`` entry when set, else the window the model
    was built with: ``window_size`` shrunk to the stage's map at ``image_size`` (transformers
    decides once, at build time). None where that window is 1 (nothing is normalised). Missing
    keys take ``Swinv2Config``'s defaults, as ``save_pretrained`` leaves them out.
    """
    settings = {key: config.get(key, default) for key, default in _HF_DEFAULTS}
    image = to_2tuple(settings["image_size"], "image_size")
    patch = to_2tuple(settings["patch_size"], "patch_size")
    window = to_2tuple(settings["window_size"], "window_size")
    pretrained = list(settings["pretrained_window_sizes"] or ())
    grid = (image[0] // patch[0], image[1] // patch[1])
    windows: list[tuple[int, int] | None] = []
    for stage in range(num_stages):
        size = pretrained[stage] if stage < len(pretrained) else 0
        if size > 0:
            windows.append((size, size))
            continue
        built = (min(grid[0] // 2**stage, window[0]), min(grid[1] // 2**stage, window[1]))
        windows.append(None if built[0] <= 1 else built)
    return windows


def _check_pretrained_windows(
    model: nn.Module, state_dict: StateDict, checkpoint: RawCheckpoint
) -> None:
    """Swin V2: the window the checkpoint's position bias was trained at must be the model's.

    The CPB MLP only gives the trained biases when the model normalises its coordinates by the
    same window; otherwise outputs are silently wrong. Official and torchvision checkpoints say
    it in their coordinate tables (checked by ``model.check_checkpoint_buffers``, on the dict
    before conversion drops them); Hugging Face folders in the ``config.json`` beside the
    weights.
    """
    where = checkpoint.source
    check_buffers = getattr(model, "check_checkpoint_buffers", None)
    if check_buffers is not None:
        try:
            check_buffers(state_dict)
        except CheckpointMismatchError:
            raise
        except ValueError as err:
            raise CheckpointMismatchError(f"checkpoint {where}: {err}") from err
    config = checkpoint.hf_config
    if config is None or config.get("model_type") != "swinv2" or not hasattr(model, "config"):
        return
    expected = cpb_divisors(model)
    found = _hf_windows(config, len(expected))
    wrong = [
        stage for stage, (window, divisor) in enumerate(zip(found, expected))
        if window is not None and divisor is not None
        and (window[0] - 1, window[1] - 1) != divisor
    ]
    if not wrong:
        return
    stage = wrong[0]
    window = found[stage]
    model_config = model.config
    settings = ", ".join(f"{key}={config.get(key, default)}" for key, default in _HF_DEFAULTS)
    message = (
        f"checkpoint {where}: the checkpoint's position-bias coordinates of stage {stage} were "
        f"normalised by a window of {_size(window)} ({checkpoint.hf_config_path}: {settings}), "
        f"the model normalises by {_size((expected[stage][0] + 1, expected[stage][1] + 1))} "
        f"(window_size={model_config.window_size}, "
        f"pretrained_window_sizes={model_config.pretrained_window_sizes})"
    )
    if all(found[i] is not None and found[i][0] == found[i][1] for i in wrong):
        current = list(model_config.pretrained_window_sizes or (0,) * len(expected))
        for i in wrong:
            current[i] = found[i][0]
        message += f"; build the model with pretrained_window_sizes={tuple(current)}"
    raise CheckpointMismatchError(message)


def _size(window: tuple[int, int]) -> str:
    return str(window[0]) if window[0] == window[1] else f"{window[0]}x{window[1]}"


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping | RawCheckpoint,
    *,
    drop_head: bool = False,
    strict: bool = True,
    prefer_ema: bool = False,
) -> LoadReport:
    """Load a Swin V1/V2 checkpoint of any public layout into ``model``.

    The checkpoint's layout (official, timm, torchvision, Hugging Face) is detected and converted
    to the native one; V1 bias tables of another window are fitted to the model's (see
    docs/checkpoints.md: bicubic resize as the official fine-tuning code does, or, for a window
    shrunk to its map, the smaller table placed where the model reads it); V2 checkpoints must
    have been trained at the model's pretrained windows; everything else must match key for key
    and shape for shape.

    Args:
        model: a winattn Swin model or ``features_only`` backbone (or any module with timm's
            Swin state-dict layout).
        source: a state dict (possibly wrapped under ``model``/``state_dict``), a file (``.pth``,
            ``.pt``, ``.bin`` read with ``torch.load(weights_only=True)``, ``.safetensors``), a
            folder laid out like a Hugging Face hub repo or cache entry (its ``config.json`` is
            checked too), or what :func:`~winattn.checkpoints.io.open_checkpoint` returned.
        drop_head: ignore the checkpoint's classifier and keep the model's freshly initialised
            one (fine-tuning to another class count, or loading a headless checkpoint).
        strict: raise on missing or unexpected keys; with False they are only reported, and a
            model holding only the first stages (a ``features_only`` backbone) takes those of
            a full checkpoint. Shape mismatches always raise.
        prefer_ema: load the EMA weights of a training checkpoint (timm's ``state_dict_ema``,
            torchvision's reference ``model_ema``) when it has them.

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointReadError: unreadable/corrupt file (the message names the path).
        CheckpointMismatchError: no tensors or not a Swin state dict; another architecture or
            size; another class count; V2 weights trained at other pretrained windows; missing
            or unexpected keys; shape mismatches. The message names the checkpoint.

    Example:
        >>> import winattn  # doctest: +SKIP
        >>> name = "swin_tiny_patch4_window7_224"  # doctest: +SKIP
        >>> model = winattn.create_model(name, num_classes=10)  # doctest: +SKIP
        >>> report = load_checkpoint(model, "swin_tiny.pth", drop_head=True)  # doctest: +SKIP
    """
    checkpoint = source if isinstance(source, RawCheckpoint) else open_checkpoint(source)
    where = checkpoint.source
    name = f"checkpoint {where}"
    unwrapped = unwrap(checkpoint.content, prefer_ema=prefer_ema, source=name)
    ckpt, fmt = to_native(unwrapped, source=name)
    target = model.state_dict()
    layout = _check_layout(ckpt, target, where, drop_head, strict)
    if layout.version == 2:
        _check_pretrained_windows(model, unwrapped, checkpoint)
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
        if (key.endswith(_TABLE_SUFFIX) and value.ndim == 2 and want.ndim == 2
                and value.shape[1] == want.shape[1]):
            windows = _table_windows(model, key, want.shape[0])
            fitted = _fit_bias_table(value, windows, key, where)
            if fitted.shape == want.shape:
                ckpt[key] = fitted
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
        elif strict and unexpected and not missing and not mismatched and all(
            _outside(k, len(layout.depths)) for k in unexpected
        ):
            hint = (
                "\n(the model holds only part of the network, as a features_only backbone "
                "does: pass strict=False to load that part)"
            )
        raise CheckpointMismatchError(
            f"checkpoint {where} ({fmt} layout) does not match the model:\n  "
            + "\n  ".join(problems) + hint
        )
    report.missing_keys, report.unexpected_keys = missing, unexpected
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in ckpt.items() if k in target}, strict=False)
    return report
