"""Training checkpoints: written atomically, holding everything a resume needs.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "winattn-train", "version": 1,
     "model": state_dict, "ema": state_dict | None,
     "optimizer": ..., "scheduler": ..., "epoch": completed epochs,
     "step_in_epoch": steps done in the epoch in progress (non-zero after an interrupt),
     "global_step": ..., "rng": {...}, "config": TrainConfig as a dict,
     "model_name": str, "model_kwargs": dict, "class_names": list[str],
     "data_config": dict, "metrics": dict}

The weights sit under ``"model"`` (like official Swin checkpoints), so
``winattn.load_checkpoint`` reads them too.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from winattn.checkpoints.io import CheckpointReadError, read_checkpoint

CHECKPOINT_FORMAT = "winattn-train"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    Writes a temp file in the same folder, flushes and fsyncs it, then ``os.replace``s it over
    ``path`` and fsyncs the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    # Plain lists and tensors only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: What eval/predict/export read from a training checkpoint; a resume needs ``RESUME_KEYS`` too.
INFERENCE_KEYS = ("model", "config", "model_name", "model_kwargs", "class_names", "data_config")
RESUME_KEYS = ("optimizer", "scheduler", "rng", "epoch", "step_in_epoch", "global_step",
               "partial")


def is_train_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (what a checkpoint file holds) is a winattn training checkpoint."""
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def check_train_checkpoint(ckpt: Mapping, where: str) -> dict[str, Any]:
    """``ckpt`` as a dict if it holds what eval/predict need, else a CheckpointReadError naming
    ``where`` and the missing entries (a file cut short or edited by hand)."""
    missing = [k for k in INFERENCE_KEYS if k not in ckpt]
    if missing:
        raise CheckpointReadError(f"checkpoint: {where!r} is a winattn training checkpoint "
                                  f"without {', '.join(missing)}; it cannot be used")
    return dict(ckpt)


def load_train_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` during training, checking its format.

    Read like every other checkpoint (``winattn.checkpoints.read_checkpoint``), so a truncated or
    foreign file is a :class:`CheckpointReadError` that names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt, where = read_checkpoint(path)
    if not is_train_checkpoint(ckpt):
        raise CheckpointReadError(f"checkpoint {where!r} is not a winattn training checkpoint "
                                  f"(expected a dict with format={CHECKPOINT_FORMAT!r})")
    return check_train_checkpoint(ckpt, where)


# ---- resuming ---------------------------------------------------------------------------------
#: TrainConfig fields a resumed run must share with its checkpoint: each changes what is computed
#: (``epochs``, ``lr``, ``min_lr`` and ``warmup_epochs`` shape the restored schedule, whose own
#: state would silently win over a new value).
RESUME_MUST_MATCH = ("model", "img_size", "epochs", "batch_size", "lr", "min_lr",
                     "warmup_epochs", "weight_decay", "label_smoothing", "clip_grad", "drop_path",
                     "augment", "mixup", "cutmix", "amp", "ema_decay", "seed",
                     "max_steps_per_epoch", "val_fraction", "finetune")
#: Fields that may differ: where the run reads and writes and how fast it goes, not what it
#: computes. The data's paths may move; its classes and sizes are checked instead
#: (:func:`resume_mismatches`' ``dataset``).
RESUME_MAY_DIFFER = ("data", "val_data", "out", "resume", "workers", "device", "progress",
                     "grad_checkpointing")


def resume_mismatches(saved: Mapping[str, Any], given: Mapping[str, Any],
                      defaults: Mapping[str, Any]) -> list[str]:
    """The settings in which ``given`` (a TrainConfig as a dict) differs from the checkpoint's
    ``saved`` one, as ``--option: checkpoint X, given Y`` (a field older checkpoints lack counts
    as its default)."""
    problems = []
    for key in RESUME_MUST_MATCH:
        was, now = saved.get(key, defaults.get(key)), given.get(key)
        if was != now:
            problems.append(f"--{key.replace('_', '-')}: checkpoint {was!r}, given {now!r}")
    return problems
