"""``winattn``: train, eval, predict, info, the one-command demo, bench, convert and export.

Run ``winattn COMMAND --help`` for each command's options. Multi-process training goes through
PyTorch's own launcher: ``torchrun --nproc_per_node N -m winattn train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from winattn.cli.argtypes import (
    device_name,
    non_negative_float,
    non_negative_int,
    open_fraction,
    output_folder,
    positive_float,
    positive_int,
    unit_interval,
)
from winattn.data.folder import DataError


def _add_train_args(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    # The demo's own values stand where a default is None there (winattn.cli.demo.DEMO_SETTINGS).
    def default(train_value):
        return None if demo else train_value

    def shown(train_value, demo_value):
        return f"default: {demo_value if demo else train_value}"

    if not demo:
        p.add_argument("--model", required=True, help="a registered model name (winattn info)")
        p.add_argument("--data", default="digits",
                       help="'digits', a folder with train/ (and val/), or a UTF-8 CSV of "
                       "path,label (default: digits)")
        p.add_argument("--val-data", default=None, help="validation folder or CSV")
        p.add_argument("--out", type=output_folder, default="runs/train",
                       help="output folder (default: runs/train)")
    p.add_argument("--val-fraction", type=open_fraction, default=0.2,
                   help="share held out for validation when there is no val set (default: 0.2)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input resolution (default: " + ("16" if demo else "the model's own") +
                   "; at least the model's patch size)")
    p.add_argument("--epochs", type=positive_int, default=default(10),
                   help="number of passes over the training set (" + shown(10, 20) + ")")
    p.add_argument("--batch-size", type=positive_int, default=default(64),
                   help="GLOBAL batch size, split evenly over torchrun processes (" +
                   shown(64, 32) + ")")
    p.add_argument("--lr", type=positive_float, default=default(1e-3),
                   help="peak learning rate, reached after the warm-up (" + shown(1e-3, 2e-3) +
                   ")")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-6,
                   help="learning rate at the end of the cosine decay; at most --lr "
                   "(default: 1e-06)")
    p.add_argument("--warmup-epochs", type=non_negative_float, default=default(1.0),
                   help="epochs of linear warm-up from lr/warmup-steps to --lr, may be "
                   "fractional (" + shown(1.0, 2.0) + ")")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05,
                   help="AdamW weight decay, on weights only (not norms, biases, position-bias "
                   "tables) (default: 0.05)")
    p.add_argument("--label-smoothing", type=unit_interval, default=0.1,
                   help="label smoothing of the training loss, in [0, 1) (default: 0.1)")
    p.add_argument("--clip-grad", type=non_negative_float, default=1.0,
                   help="max gradient norm; 0 = off (default: 1.0)")
    p.add_argument("--drop-path", type=unit_interval, default=None,
                   help="stochastic depth rate (default: the model's own)")
    p.add_argument("--augment", default="auto", choices=["auto", "none", "light", "imagenet"],
                   help="auto: light for digits, imagenet otherwise (default: auto)")
    p.add_argument("--mixup", type=non_negative_float, default=0.0,
                   help="mixup alpha; 0 = off (default: 0)")
    p.add_argument("--cutmix", type=non_negative_float, default=0.0,
                   help="cutmix alpha; 0 = off (default: 0)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, slower steps")
    p.add_argument("--ema-decay", type=unit_interval, default=0.0,
                   help="EMA of weights, used by eval/predict/export; 0 = off (default: 0)")
    p.add_argument("--finetune", default=None,
                   help="start from this checkpoint (any supported format), new head")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from OUT/last.pt, or from the given checkpoint, with the same "
                   "settings (a run already complete is reported, not retrained)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model's initialisation, the data order and split, the "
                   "augmentations and drop path (default: 0)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto, a GPU if there is one)")
    p.add_argument("--threads", type=positive_int, default=1 if demo else None,
                   help="CPU threads per process for torch ops (default: " +
                   ("1: the demo model's ops are too small to gain from more, and extra threads "
                    "spin badly on a busy machine)" if demo else "torch's choice)"))
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None,
                   help="cut each epoch to this many steps (default: the whole training set)")
    p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed heap memory for the next step instead of returning it to "
                   "the kernel (glibc; left alone when MALLOC_* variables or another allocator "
                   "are set; default: on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal only)")


def _train_config(args: argparse.Namespace, **override):
    from winattn.train.config import TrainConfig

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "malloc_tuning", False):
        from winattn.train.allocator import tune_malloc

        tune_malloc()  # process-wide: here, where this command owns the process
    skip = ("command", "func", "threads", "malloc_tuning")
    values = {k: v for k, v in vars(args).items() if k not in skip}
    values.update(override)
    values = {k: v for k, v in values.items() if v is not None or k in ("clip_grad",)}
    if values.get("clip_grad") == 0:
        values["clip_grad"] = None
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from winattn.train.loop import RunComplete, train

    try:
        metrics = train(_train_config(args))
    except RunComplete as done:
        if os.environ.get("RANK", "0") == "0":
            print(f"winattn train: {done}")
        return 0
    if metrics and os.environ.get("RANK", "0") == "0":
        print(f"final val_top1 {100 * metrics['val_top1']:.2f}%  checkpoint {args.out}/last.pt")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from winattn.cli import bench, commands, demo, tools

    parser = argparse.ArgumentParser(
        prog="winattn",
        description="winattn: train, evaluate, predict, inspect, benchmark, convert, export.",
        epilog="Multi-process: torchrun --nproc_per_node N -m winattn train ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (torchrun-aware)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 and a confusion matrix on a validation set")
    p.add_argument("checkpoint",
                   help="a winattn training checkpoint, or any checkpoint with --model")
    p.add_argument("--model", default=None, help="model name, for checkpoints of other formats")
    p.add_argument("--data", default=None,
                   help="'digits', folder or CSV; default: the checkpoint's own validation split")
    p.add_argument("--val-fraction", type=open_fraction, default=None,
                   help="share held out when --data has no val set (default: the checkpoint's "
                   "own, so its held-out images; else 0.2)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="(default: 64)")
    p.add_argument("--out", type=output_folder, default=None,
                   help="folder for confusion.png and eval.json (default: the checkpoint's)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw weights of a checkpoint that also holds EMA weights "
                   "(default: the EMA weights when there are any)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("predict", help="top-k classes for image files")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", default=None, help="a checkpoint (ours, or any with --model)")
    p.add_argument("--model", default=None, help="model name (for non-winattn checkpoints)")
    p.add_argument("--pretrained", action="store_true",
                   help="the model's published weights (timm's, from the Hugging Face hub); "
                   "instead of --checkpoint")
    p.add_argument("--topk", type=positive_int, default=5,
                   help="classes to print per image, at most the model's class count "
                   "(default: 5)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw weights of a checkpoint that also holds EMA weights "
                   "(default: the EMA weights when there are any)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser("info", help="registered models, parameter counts and FLOPs")
    p.add_argument("pattern", nargs="?", default=None, help="filter, e.g. 'swin_tiny*'")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="resolution for FLOPs (default: each model's own)")
    p.add_argument("--flops", action="store_true", help="count FLOPs (one forward pass each)")
    p.set_defaults(func=commands.cmd_info)

    p = sub.add_parser("demo", help="train the demo model on digits, evaluate, predict: one go")
    p.add_argument("--out", type=output_folder, default="runs/demo",
                   help="output folder (default: runs/demo)")
    p.add_argument("--model", default=demo.DEMO_MODEL,
                   help=f"a registered model name (default: {demo.DEMO_MODEL})")
    _add_train_args(p, demo=True)
    p.set_defaults(func=demo.cmd_demo)

    bench.add_parser(sub)
    tools.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``winattn`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"winattn: warning: {msg}\n"
    from winattn.train.loop import Interrupted, TrainingDiverged

    try:
        return args.func(args)
    except Interrupted as err:
        print(f"winattn: {err}; continue with --resume", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"winattn {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (DataError, ValueError, OSError) as err:
        # OSError: a file or folder named on the command line that cannot be read or written;
        # its message names the path.
        print(f"winattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
