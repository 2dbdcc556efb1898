"""AdamW with decay only where it belongs, a warm-up + cosine schedule, an EMA of the weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def _skips_decay(name: str, param: torch.Tensor, no_decay: set[str]) -> bool:
    # no_weight_decay() names parameters in full or by their last component
    # ("relative_position_bias_table", "absolute_pos_embed"), as timm's models do.
    last = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name in no_decay or last in no_decay or any(
        name.endswith("." + k) for k in no_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a group without weight decay.

    No decay for every parameter with ``ndim <= 1`` (norm weights, biases) and every parameter
    that ``model.no_weight_decay()`` names (position tables, bias tables).
    """
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, skip = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (skip if _skips_decay(name, param, no_decay) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": skip, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, on PyTorch's fused kernel where every parameter is a
    float tensor on the CPU or a CUDA GPU: one pass over each parameter, its gradient and both
    moments instead of the default path's several (on the CPU a loop over the parameters;
    Swin-T on the 2-core CPU: 19 ms a step against 76; ``benchmarks/ablate_train_step.py``
    times a whole step with each)."""
    groups = param_groups(model, weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier per step: linear warm-up from 1/warmup to 1, then cosine down to min_ratio."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, min(1.0, min_lr / lr)))


class ModelEma(nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
