"""Training: the loop (one process or ``torchrun``), checkpoints, metrics and plots."""

from winattn.train.config import TrainConfig
from winattn.train.evaluate import EvalResult, evaluate
from winattn.train.loop import Interrupted, Trainer, train
from winattn.train.state import atomic_save, load_train_checkpoint

__all__ = ["EvalResult", "Interrupted", "TrainConfig", "Trainer", "atomic_save", "evaluate",
           "load_train_checkpoint", "train"]
