"""The training configuration: one dataclass, filled from the command line or by hand."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from winattn.train.distributed import DEVICE_CHOICES, device_problem


def folder_problem(path: str | Path) -> str | None:
    """``path`` and why it cannot be made into (or used as) an output folder, or None when it
    can: it, or the nearest part of it that exists, must be a folder. Checked before a run starts,
    so that a typo does not surface only when the first result is written."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if part.is_dir():
                return None
            if part == path:
                return f"{str(path)!r}, which is a file"
            return f"{str(path)!r}, inside the file {str(part)!r}"
    return None


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    ``batch_size`` and ``lr`` are global: the same command trains the same model on 1 or N
    processes (each rank takes ``batch_size // world_size`` samples per step).
    """

    model: str
    data: str = "digits"
    out: str = "runs/train"
    val_data: str | None = None
    val_fraction: float = 0.2
    img_size: int | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    drop_path: float | None = None
    augment: str = "auto"
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: bool = False
    grad_checkpointing: bool = False
    ema_decay: float = 0.0
    finetune: str | None = None
    resume: str | None = None
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    progress: bool | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field, the value and what was expected."""
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in FLOAT_FIELDS:  # inf and nan compare false or true where they should not
            value = getattr(self, name)
            need(value is None or math.isfinite(value), name, "a finite number")
        need(self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.lr > 0, "lr", "a positive number")
        need(self.min_lr >= 0, "min_lr", "a number >= 0")
        need(self.min_lr <= self.lr, "min_lr", f"a number <= lr ({self.lr!r}), the rate the "
             f"cosine schedule decays from")
        need(0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)")
        need(self.warmup_epochs >= 0, "warmup_epochs", "a number >= 0")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)")
        need(self.clip_grad is None or self.clip_grad >= 0, "clip_grad", "a number >= 0")
        need(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path", "a number in [0, 1)")
        need(self.augment in ("auto", "none", "light", "imagenet"), "augment",
             "one of auto, none, light, imagenet")
        need(self.mixup >= 0, "mixup", "an alpha >= 0 (0 = off)")
        need(self.cutmix >= 0, "cutmix", "an alpha >= 0 (0 = off)")
        need(0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1) (0 = off)")
        need(self.workers >= 0, "workers", "an integer >= 0")
        need(device_problem(self.device) is None, "device", DEVICE_CHOICES)
        problem = folder_problem(self.out)
        if problem:
            raise ValueError(f"out: expected a folder (it may not exist yet), got {problem}")
        need(self.img_size is None or self.img_size >= 1, "img_size", "a positive integer")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             "max_steps_per_epoch", "a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


#: The real-valued settings: each must be finite (``float("inf")`` passes ``> 0``).
FLOAT_FIELDS = tuple(f.name for f in fields(TrainConfig) if "float" in str(f.type))
