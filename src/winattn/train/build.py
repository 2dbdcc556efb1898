"""Building models and data loaders for a run, and rebuilding a model from a checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, Subset

from winattn.data.transforms import SeededTransformDataset


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``winattn.create_model``, looked up at call time (one seam for tests and the CLI)."""
    import winattn

    return winattn.create_model(name, **kwargs)


def check_img_size(model: nn.Module, name: str, img_size: int | None) -> None:
    """Refuse an input smaller than the model's patch now, naming ``--img-size`` and the smallest
    size accepted, instead of at the first forward pass."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and isinstance(patch, int) and img_size < patch:
        raise ValueError(f"--img-size: expected at least {patch} (one {patch}x{patch} patch of "
                         f"{name}), got {img_size}")


def load_weights(model: nn.Module, source: str, *, drop_head: bool = False) -> Any:
    """``winattn.load_checkpoint``: any supported checkpoint format."""
    import winattn

    return winattn.load_checkpoint(model, source, drop_head=drop_head)


def model_from_checkpoint(ckpt: dict[str, Any], *, use_ema: bool = True,
                          source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a training checkpoint describes and load its (EMA, if any) weights.

    Raises:
        CheckpointReadError: the weights do not fit the model the checkpoint names (a file
            edited or mixed up by hand); the message names ``source``.
    """
    from winattn.checkpoints.io import CheckpointReadError

    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointReadError(f"checkpoint: the weights in {source!r} do not fit the model "
                                  f"{ckpt['model_name']!r} it names: {err}") from err
    return model.eval()


class SkipBatchSampler(Sampler[list[int]]):
    """The batches of ``batch_sampler`` from number ``start`` on, at most ``num_batches`` of them.

    Skipping happens on indices, not on loaded samples, so a mid-epoch resume costs nothing.
    """

    def __init__(self, batch_sampler: BatchSampler, num_batches: int, start: int = 0):
        self.batch_sampler = batch_sampler
        self.num_batches = num_batches
        self.start = start

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.num_batches:
                return
            if i >= self.start:
                yield batch

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)


def train_loader(dataset: SeededTransformDataset, *, global_batch: int, world_size: int,
                 rank: int, seed: int, epoch: int, start_step: int, steps_per_epoch: int,
                 workers: int) -> DataLoader:
    """One epoch's loader. The sample order is a function of (seed, epoch) only.

    With N ranks, rank r takes every N-th index of the epoch's permutation, so the union of the
    ranks' batch k is exactly the 1-process run's batch k.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    batches = BatchSampler(sampler, global_batch // world_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=SkipBatchSampler(batches, steps_per_epoch, start_step),
                      num_workers=workers, persistent_workers=False)


def eval_loader(dataset, *, batch_size: int, world_size: int, rank: int, workers: int
                ) -> DataLoader:
    """Rank r evaluates indices r, r+N, ...: every sample exactly once over all ranks."""
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)


def batch_mixer(num_classes: int, mixup: float, cutmix: float):
    """torchvision v2 MixUp / CutMix (one of them at random when both are on), or None."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    parts = []
    if mixup > 0:
        parts.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        parts.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return parts[0] if len(parts) == 1 else v2.RandomChoice(parts)


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device):
    images, targets = batch
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
