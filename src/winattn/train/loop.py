"""The training loop: one process or many (``torchrun``), resumable at any step.

Determinism: the sample order is a function of (seed, epoch), each sample's augmentation of
(seed, epoch, index), and the random state of step ``k`` (dropout, drop path, mixup) is reseeded
from (seed, k, rank) before the step. A run interrupted at any step boundary and resumed from its
checkpoint therefore computes exactly the steps the uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from winattn.data.folder import DataError
from winattn.data.sources import build_datasets
from winattn.data.transforms import SeededTransformDataset, build_transform
from winattn.train import build
from winattn.train.config import TrainConfig
from winattn.train.distributed import DistEnv, all_reduce_sum, barrier, setup, teardown
from winattn.train.evaluate import evaluate
from winattn.train.optim import ModelEma, build_optimizer, build_scheduler
from winattn.train.report import plot_curves, read_metrics, write_metrics
from winattn.train.state import (
    CHECKPOINT_FORMAT,
    RESUME_KEYS,
    atomic_save,
    load_train_checkpoint,
    resume_mismatches,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


class RunComplete(Exception):
    """``--resume`` of a checkpoint that already holds every epoch: nothing to train."""

    def __init__(self, checkpoint: Path, epochs: int, out: Path):
        written = "" if checkpoint.parent.resolve() == out.resolve() else \
            f"; nothing was written to {out}"
        super().__init__(f"the run is already complete: {checkpoint} holds all {epochs} epochs "
                         f"(its weights are final){written}")
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """The loss (or the validation loss) became inf or nan; nothing was saved after it."""


def step_seed(seed: int, global_step: int, rank: int) -> int:
    return (seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63)


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        # A second signal acts at once (the default handlers).
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Holds the state of one run. Use :func:`train` unless you need the pieces."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        cfg.validate()
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        if cfg.batch_size % env.world_size:
            raise ValueError(f"batch_size: the global batch {cfg.batch_size} must be divisible by "
                             f"the number of processes {env.world_size}")
        splits = build_datasets(cfg.data, val_data=cfg.val_data, val_fraction=cfg.val_fraction,
                                seed=cfg.seed)
        self.class_names = splits.class_names
        self.num_classes = len(self.class_names)
        if self.num_classes < 2:
            raise DataError(f"data: {cfg.data!r} has {self.num_classes} class "
                            f"({', '.join(self.class_names)}); a classifier needs at least 2 "
                            f"classes (class folders or CSV labels)")
        self.dataset_sizes = {"train_samples": len(splits.train), "val_samples": len(splits.val)}
        self.resume_path: Path | None = None
        resume_ckpt = self._find_resume()

        torch.manual_seed(cfg.seed)
        self.model_kwargs: dict[str, Any] = {"num_classes": self.num_classes, "in_chans": 3}
        if cfg.img_size is not None:
            self.model_kwargs["img_size"] = cfg.img_size
        if cfg.drop_path is not None:
            self.model_kwargs["drop_path_rate"] = cfg.drop_path
        model = build.create_model(cfg.model, **self.model_kwargs)
        build.check_img_size(model, cfg.model, cfg.img_size)
        if cfg.finetune and resume_ckpt is None:
            build.load_weights(model, cfg.finetune, drop_head=True)
        if resume_ckpt is not None:
            self._check_compatible(resume_ckpt)
            model.load_state_dict(resume_ckpt["model"])
        self.data_config = dict(model.data_config)

        augment = cfg.augment
        if augment == "auto":
            augment = "light" if splits.kind == "digits" else "imagenet"
        self.train_set = SeededTransformDataset(
            splits.train, build_transform(self.data_config, train=True, augment=augment), cfg.seed)
        self.val_set = SeededTransformDataset(
            splits.val, build_transform(self.data_config, train=False), cfg.seed)
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"batch_size: {cfg.batch_size} is larger than the training set "
                            f"({len(self.train_set)} samples)")
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing: model {cfg.model!r} does not support it")
            model.set_grad_checkpointing(True)
        self.model = model.to(env.device)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.ddp = (DistributedDataParallel(self.model, device_ids=[env.device.index]
                                            if env.device.type == "cuda" else None)
                    if env.distributed else self.model)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        warmup = min(total, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, total, warmup, cfg.lr, cfg.min_lr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.mixer = build.batch_mixer(self.num_classes, cfg.mixup, cfg.cutmix)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        self.best_top1 = -1.0
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
            if self.epoch >= cfg.epochs:
                raise RunComplete(self.resume_path, cfg.epochs, self.out)

    # ---- checkpoints -------------------------------------------------------------------------
    def _find_resume(self) -> dict[str, Any] | None:
        if not self.cfg.resume:
            return None
        path = self.out / LAST if self.cfg.resume == "auto" else Path(self.cfg.resume)
        if not path.is_file():
            if self.cfg.resume == "auto":
                if self.env.is_main:
                    print(f"resume: no checkpoint at {path}; starting from scratch")
                return None
            raise FileNotFoundError(f"resume: checkpoint {str(path)!r} does not exist")
        ckpt = load_train_checkpoint(path)
        if "optimizer" not in ckpt:
            raise ValueError(f"resume: {str(path)!r} holds weights only (like best.pt); resume "
                             f"from a full checkpoint such as {str(self.out / LAST)!r}")
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"resume: {str(path)!r} lacks {', '.join(missing)}; it cannot be "
                             f"resumed")
        self.resume_path = path
        if self.env.is_main:
            print(f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt['step_in_epoch']})")
        return ckpt

    def _check_compatible(self, ckpt: dict[str, Any]) -> None:
        """Refuse to continue a run under settings that change what it computes: the restored
        optimizer and schedule would carry on with the old ones, or mix the two."""
        defaults = TrainConfig(model=self.cfg.model).to_dict()
        problems = resume_mismatches(ckpt["config"], self.cfg.to_dict(), defaults)
        if ckpt["class_names"] != self.class_names:
            problems.append(f"--data classes: checkpoint {ckpt['class_names'][:10]}, given "
                            f"{self.class_names[:10]}")
        for key, size in self.dataset_sizes.items():
            if key in ckpt and ckpt[key] != size:
                problems.append(f"--data {key.replace('_', ' ')}: checkpoint {ckpt[key]}, "
                                f"given {size}")
        if problems:
            raise ValueError(f"resume: {self.resume_path} was trained with other settings: "
                             + "; ".join(problems) + ". Resume with the checkpoint's values "
                             "(--workers, --device, --progress, --grad-checkpointing and the "
                             "data's location may differ)")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.epoch = ckpt["epoch"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.partial = ckpt["partial"].clone()
        self.best_top1 = ckpt.get("best_top1", -1.0)
        set_rng_state(ckpt["rng"])

    def checkpoint(self, metrics: dict[str, Any] | None = None, *, full: bool = True
                   ) -> dict[str, Any]:
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": 1,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "partial": self.partial.clone(),
            "best_top1": self.best_top1,
            "config": self.cfg.to_dict(), "model_name": self.cfg.model,
            "model_kwargs": self.model_kwargs, "class_names": self.class_names,
            "data_config": self.data_config, "metrics": metrics or {}, **self.dataset_sizes,
        }
        if full:
            ckpt.update(optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), rng=rng_state())
        return ckpt

    # ---- the loop ----------------------------------------------------------------------------
    def _train_epoch(self, stop: _StopFlag, progress) -> bool:
        """Train the rest of epoch ``self.epoch``; returns False if a stop was requested."""
        cfg, env = self.cfg, self.env
        loader = build.train_loader(
            self.train_set, global_batch=cfg.batch_size, world_size=env.world_size,
            rank=env.rank, seed=cfg.seed, epoch=self.epoch, start_step=self.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch, workers=cfg.workers)
        self.ddp.train()
        batches = iter(loader)
        while self.step_in_epoch < self.steps_per_epoch:
            try:
                images, targets = build.to_device(next(batches), env.device)
            except RuntimeError:
                if stop.requested:  # a DataLoader worker took the Ctrl-C and exited
                    return False
                raise
            torch.manual_seed(step_seed(cfg.seed, self.global_step, env.rank))
            hard_targets = targets
            if self.mixer is not None:
                images, targets = self.mixer(images, targets)
            with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16,
                                enabled=cfg.amp):
                logits = self.ddp(images)
            loss = self.criterion(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            loss = loss.detach()
            n = len(hard_targets)
            self.partial += torch.tensor([float(loss) * n, float(
                (logits.argmax(1) == hard_targets).sum()) if self.mixer is None else 0.0, n],
                dtype=torch.float64)
            self.step_in_epoch += 1
            self.global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss):.3f}",
                                 lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self._should_stop(stop, loss):
                return False
        return True

    def _should_stop(self, stop: _StopFlag, loss: torch.Tensor) -> bool:
        """Whether a stop was requested on any rank; raises TrainingDiverged when the step's
        loss is not finite on any rank. One all-reduce decides both, so every rank stops at
        the same step."""
        finite = bool(torch.isfinite(loss))
        flags = torch.tensor([float(stop.requested), float(not finite)], device=self.env.device)
        stop_requested, diverged = (all_reduce_sum(flags, self.env) > 0).tolist()
        if diverged:
            value = f"is {float(loss)}" if not finite else "of another process is not finite"
            self._diverged(f"the training loss {value} at step {self.step_in_epoch} of epoch "
                           f"{self.epoch + 1} (step {self.global_step} overall)")
        return stop_requested

    def _diverged(self, what: str) -> None:
        last = self.out / LAST
        kept = f"{last} is left as it was" if last.is_file() else "no checkpoint was written"
        raise TrainingDiverged(f"training diverged: {what}; stopped without saving anything "
                               f"after the last good checkpoint ({kept}). Try a lower --lr (now "
                               f"{self.cfg.lr}) or gradient clipping (--clip-grad)")

    def _validate(self) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        loader = build.eval_loader(self.val_set, batch_size=max(1, cfg.batch_size //
                                                                env.world_size),
                                   world_size=env.world_size, rank=env.rank, workers=cfg.workers)
        metrics = evaluate(self.model, loader, num_classes=self.num_classes, device=env.device,
                           amp=cfg.amp, env=env).as_dict("val")
        if self.ema is not None:
            ema = evaluate(self.ema.module, loader, num_classes=self.num_classes,
                           device=env.device, amp=cfg.amp, env=env)
            metrics.update({k + "_ema": v for k, v in ema.as_dict("val").items()})
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``; return the last epoch's metrics. Raise Interrupted on a stop."""
        cfg, env = self.cfg, self.env
        rows: list[dict[str, Any]] = []
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".*.pt.tmp-*"):  # left by a run killed mid-write
                stale.unlink()
            rows = [r for r in read_metrics(self.out / METRICS) if r["epoch"] <= self.epoch]
        metrics: dict[str, Any] = rows[-1] if rows else {}
        # None = tqdm's own choice: a bar on a terminal, none when the output is redirected.
        show = None if cfg.progress is None else not cfg.progress
        from tqdm.auto import tqdm

        with _StopFlag() as stop:
            while self.epoch < cfg.epochs:
                start = time.perf_counter()
                progress = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                                desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                                disable=show if env.is_main else True)
                finished = self._train_epoch(stop, progress)
                progress.close()
                if not finished:
                    path = self.out / LAST
                    if env.is_main:
                        atomic_save(self.checkpoint(metrics), path)
                    barrier(env)
                    raise Interrupted(path)
                sums = all_reduce_sum(self.partial.to(env.device), env).cpu()
                count = max(1.0, float(sums[2]))
                train_stats = {"train_loss": float(sums[0]) / count,
                               "train_top1": float(sums[1]) / count if self.mixer is None
                               else None}
                val = self._validate()
                bad = {k: v for k, v in {**train_stats, **val}.items()
                       if v is not None and not math.isfinite(v)}
                if bad:
                    self._diverged(f"after epoch {self.epoch + 1}, {bad}")
                self.epoch += 1
                self.step_in_epoch = 0
                self.partial.zero_()
                elapsed = time.perf_counter() - start
                metrics = {"epoch": self.epoch, **train_stats, **val,
                           "lr": self.scheduler.get_last_lr()[0], "epoch_seconds": elapsed}
                if env.is_main:
                    rows.append(metrics)
                    write_metrics(self.out / METRICS, rows)
                    plot_curves(rows, self.out / CURVES)
                    if val["val_top1"] > self.best_top1:
                        self.best_top1 = val["val_top1"]
                        atomic_save(self.checkpoint(metrics, full=False), self.out / BEST)
                    atomic_save(self.checkpoint(metrics), self.out / LAST)
                    print(f"epoch {self.epoch}/{cfg.epochs}  train_loss {metrics['train_loss']:.4f}"
                          f"  val_loss {val['val_loss']:.4f}  val_top1 {100 * val['val_top1']:.2f}%"
                          f"  ({elapsed:.1f}s)", flush=True)
                barrier(env)
        return metrics


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as ``cfg`` says, on this process and whatever ``torchrun`` started beside it.

    Returns:
        The final epoch's metrics (``val_top1`` etc.), on every rank.

    Raises:
        Interrupted: a SIGINT/SIGTERM arrived; the checkpoint was saved first.
        RunComplete: ``cfg.resume`` names a checkpoint that holds all ``cfg.epochs`` epochs.
        TrainingDiverged: the loss became inf or nan; the last checkpoint was left as it was.
    """
    cfg.validate()
    env = setup(cfg.device)
    try:
        metrics = Trainer(cfg, env).fit()
    except (Interrupted, RunComplete):
        teardown(env)  # every rank stops here together, after the checkpoint's barrier
        raise
    except BaseException:
        # The error may be this rank's alone, its peers inside a collective. Under NCCL,
        # destroying the group is collective too and would hang here instead of letting the
        # traceback out (pytorch/torchtitan#1342); torchrun ends the peers once this rank
        # exits. gloo's (CPU) destroy is local, and exiting without it can abort at exit.
        if env.device.type != "cuda":
            teardown(env)
        raise
    teardown(env)
    return metrics
