"""Training: the loop (one process or ``torchrun``), checkpoints, metrics and plots."""

from winattn.train.config import TrainConfig
from winattn.train.evaluate import EvalResult, evaluate
from winattn.train.loop import Interrupted, RunComplete, Trainer, TrainingDiverged, train
from winattn.train.state import atomic_save, load_train_checkpoint

__all__ = ["EvalResult", "Interrupted", "RunComplete", "TrainConfig", "Trainer",
           "TrainingDiverged", "atomic_save", "evaluate", "load_train_checkpoint", "train"]
