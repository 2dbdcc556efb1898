"""Metrics: top-k accuracy, confusion matrices, the JSONL log and the PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = top == targets[:, None]  # (B, maxk)
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole log (it is small), so a resumed run drops epochs it will redo."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'winattn[train]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss (train, val) and accuracy (val top-1, EMA if present) per epoch, one PNG."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # One colour per split on both panels, so train and val read the same everywhere.
    train_style = dict(marker="o", color="C0")
    val_style = dict(marker="o", color="C1")
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train", **train_style)
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val", **val_style)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    if rows and rows[0].get("train_top1") is not None:
        ax_acc.plot(epochs, [100 * r["train_top1"] for r in rows], label="train top-1",
                    **train_style)
    ax_acc.plot(epochs, [100 * r["val_top1"] for r in rows], label="val top-1", **val_style)
    if rows and "val_top1_ema" in rows[0]:
        ax_acc.plot(epochs, [100 * r["val_top1_ema"] for r in rows], marker="o", color="C2",
                    label="val top-1 (EMA)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: torch.Tensor, class_names: list[str], path: str | os.PathLike) -> None:
    """Confusion matrix PNG; counts are written in the cells when there are at most 30 classes."""
    plt = _pyplot()
    n = len(class_names)
    size = min(4 + 0.4 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        peak = max(1, int(matrix.max()))
        for i in range(n):
            for j in range(n):
                v = int(matrix[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
