"""Evaluation over a (possibly sharded) loader: loss, top-1, top-5 and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from winattn.train.distributed import DistEnv, all_reduce_sum
from winattn.train.report import confusion_matrix, topk_correct


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    confusion: torch.Tensor  # (C, C), rows = true class

    def as_dict(self, prefix: str = "val") -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_top1": self.top1,
                f"{prefix}_top5": self.top5}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, num_classes: int, device: torch.device,
             amp: bool = False, env: DistEnv | None = None) -> EvalResult:
    """Evaluate ``model`` on ``loader``; sums are reduced over ranks when ``env`` is distributed.

    The loss is plain cross-entropy (no label smoothing), averaged over samples.
    """
    env = env or DistEnv(device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        logits = logits.float()
        sums[0] += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top1, top5 = topk_correct(logits, targets, (1, 5))
        sums[1] += top1
        sums[2] += top5
        sums[3] += len(targets)
        confusion += confusion_matrix(logits.argmax(1).cpu(), targets.cpu(), num_classes)
    model.train(was_training)
    if env.distributed:
        sums = all_reduce_sum(sums.to(env.device), env).cpu()
        confusion = all_reduce_sum(confusion.to(env.device), env).cpu()
    count = int(sums[3])
    denom = max(count, 1)
    return EvalResult(loss=float(sums[0]) / denom, top1=float(sums[1]) / denom,
                      top5=float(sums[2]) / denom, count=count, confusion=confusion)
