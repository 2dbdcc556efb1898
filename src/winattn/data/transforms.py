"""Train and eval transforms (torchvision transforms v2) and per-sample seeding.

Every random augmentation of sample ``i`` in epoch ``e`` draws from a generator seeded with
``(seed, e, i)``, so the pixels a sample gets do not depend on the number of DataLoader workers,
on the number of processes, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

AUGMENT_POLICIES = ("none", "light", "imagenet")


def _v2():
    try:
        from torchvision.transforms import v2
    except ImportError as err:
        raise ImportError("winattn's training and data code needs torchvision (transforms v2): "
                          "pip install 'winattn[train]'") from err
    return v2


def _interpolation(name: str):
    v2 = _v2()
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
             "nearest": v2.InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"interpolation: expected one of {sorted(modes)}, got {name!r}")
    return modes[name]


class ResizeKeepRatio:
    """Resize so that the image covers ``size`` (H, W) with its aspect ratio kept: the side that
    needs the smaller scale meets its target (timm's ``ResizeKeepRatio`` at ``longest=0``, which
    timm's eval transform uses for a non-square target)."""

    def __init__(self, size: tuple[int, int], interpolation):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img):
        v2 = _v2()
        width, height = img.size  # a PIL image
        ratio = min(height / self.size[0], width / self.size[1])
        new = [round(height / ratio), round(width / ratio)]
        return v2.functional.resize(img, new, interpolation=self.interpolation, antialias=True)


def eval_geometry(height: int, width: int, crop_pct: float, interpolation) -> list:
    """timm's evaluation resize and crop: scale the image, aspect ratio kept, until it covers
    ``(floor(height / crop_pct), floor(width / crop_pct))`` (for a square target: its shorter
    side becomes ``floor(height / crop_pct)``), then cut the centre ``height x width``.

    Applied to the PIL image, as timm and torchvision's reference scripts do, so the pixels are
    PIL's resampling, identical to timm's for the same ``data_config``.
    """
    v2 = _v2()
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if scale[0] == scale[1]:
        resize = v2.Resize(scale[0], interpolation=interpolation, antialias=True)  # shorter side
    else:
        resize = ResizeKeepRatio(scale, interpolation)
    return [resize, v2.CenterCrop((height, width))]


def build_transform(data_config: dict[str, Any], *, train: bool, augment: str = "imagenet"):
    """Build the PIL-RGB -> normalised float tensor ``(C, H, W)`` transform.

    The evaluation transform is timm's (``timm.data.create_transform`` with the same
    ``data_config``, crop mode ``center``): see :func:`eval_geometry`. No image is squashed:
    the aspect ratio is kept and the centre is cropped.

    Args:
        data_config: a model's ``data_config`` (``input_size`` (C, H, W), ``mean``, ``std``,
            ``interpolation``, ``crop_pct``; 1.0 when absent).
        train: training transform (random) or evaluation transform (deterministic).
        augment: training policy. ``"imagenet"``: random resized crop and horizontal flip;
            ``"light"``: the evaluation resize and crop, then a small random affine (rotation,
            shift, scale), no flip, for digits and other images where flipping changes the
            class; ``"none"``: the eval transform.
    """
    v2 = _v2()
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"augment: expected one of {AUGMENT_POLICIES}, got {augment!r}")
    _, height, width = data_config["input_size"]
    interp = _interpolation(data_config.get("interpolation", "bicubic"))
    crop_pct = float(data_config.get("crop_pct", 1.0))
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    normalize = [v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))]
    if train and augment == "imagenet":
        steps = [v2.ToImage(),
                 v2.RandomResizedCrop((height, width), interpolation=interp, antialias=True),
                 v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    elif train and augment == "light":
        steps = [*eval_geometry(height, width, crop_pct, interp), v2.ToImage(),
                 v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                 interpolation=v2.InterpolationMode.BILINEAR),
                 v2.ToDtype(torch.float32, scale=True)]
    else:
        steps = [*eval_geometry(height, width, crop_pct, interp), *to_tensor]
    return v2.Compose(steps + normalize)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a fixed function of (seed, epoch, index)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    offset = int(torch.randint(0, 2**62, (1,), generator=g))
    return (offset + index * 0x9E3779B97F4A7C15) % (2**63)


class SeededTransformDataset(Dataset):
    """Apply ``transform`` to ``base[i]`` under a generator seeded by (seed, epoch, i).

    Call :meth:`set_epoch` before each epoch (workers must not be persistent, so they pick it up).
    """

    def __init__(self, base: Dataset, transform, seed: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(img), label
