"""``winattn eval``, ``winattn predict`` and ``winattn info``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from winattn.data.folder import DataError, scan_image_folder
from winattn.train import build


def _device(name: str) -> torch.device:
    from winattn.train.distributed import resolve_device

    return resolve_device(name)


def _fetch_pretrained(model_name: str) -> str:
    """The cached or downloaded file of ``--pretrained`` weights, or an error in CLI terms."""
    from winattn.checkpoints.hub import PRETRAINED_TAGS, resolve_pretrained

    if model_name not in PRETRAINED_TAGS:
        raise ValueError(f"--pretrained: no published weights for --model {model_name!r}; "
                         f"models with weights: {', '.join(sorted(PRETRAINED_TAGS))}")
    try:
        return str(resolve_pretrained(model_name))
    except RuntimeError as err:  # network, offline mode, missing repo
        cause = err.__cause__ or err
        raise ValueError(f"--pretrained: the published weights of {model_name} could not be "
                         f"fetched or found in the hub cache ({type(cause).__name__}: {cause}). "
                         f"Without network, download the weight file elsewhere and pass "
                         f"--checkpoint PATH instead") from err


def head_classes(raw: Any, where: str) -> int | None:
    """The class count of a foreign checkpoint's classifier, or None (no head, or not a layout
    we know: loading it then says what is wrong)."""
    from winattn.checkpoints.convert import to_native, unwrap
    from winattn.checkpoints.load import HEAD_PREFIX

    try:
        native, _ = to_native(unwrap(raw, source=f"checkpoint {where}"))
    except (TypeError, ValueError):
        return None
    head = native.get(HEAD_PREFIX + "weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def load_model_for_inference(checkpoint: str | None, model_name: str | None, *,
                             pretrained: bool = False, use_ema: bool = True,
                             random_weights: bool = False
                             ) -> tuple[nn.Module, list[str], dict[str, Any], dict | None]:
    """Build a model for eval/predict/export: returns (model, class_names, data_config, our_ckpt).

    A winattn training checkpoint carries its model name, class names and data config. Any other
    checkpoint (official, timm, torchvision, Hugging Face, or one ``winattn convert`` wrote)
    needs ``model_name``; the model gets the checkpoint's class count, whose names are
    ImageNet-1k's for 1000 classes and ``class_0``, ``class_1``, ... otherwise. Every file is
    read through ``winattn.checkpoints.read_checkpoint``, so an unreadable one is an error that
    names it. Without ``checkpoint`` or ``pretrained`` the weights would be random: refused
    unless ``random_weights`` (``export`` of a graph).
    """
    from winattn.checkpoints.io import read_checkpoint
    from winattn.data import imagenet_class_names
    from winattn.train.state import check_train_checkpoint, is_train_checkpoint

    if checkpoint and pretrained:
        raise ValueError(f"--pretrained and --checkpoint {checkpoint!r}: pass one of them, not "
                         f"both (which weights did you mean?)")
    if not checkpoint and not pretrained and not random_weights:
        raise ValueError("no weights: pass --checkpoint PATH or --pretrained (the model would "
                         "otherwise predict from random weights)")
    if pretrained and not model_name:
        raise ValueError("--pretrained: pass --model NAME to say whose published weights")
    source = _fetch_pretrained(model_name) if pretrained else checkpoint
    raw, where = read_checkpoint(source) if source else (None, None)
    if is_train_checkpoint(raw):
        ckpt = check_train_checkpoint(raw, where)
        if model_name and model_name != ckpt["model_name"]:
            raise ValueError(f"model: {model_name!r} given, but checkpoint {checkpoint!r} holds a "
                             f"{ckpt['model_name']!r}")
        model = build.model_from_checkpoint(ckpt, use_ema=use_ema, source=where)
        return model, ckpt["class_names"], ckpt["data_config"], ckpt
    if not model_name:
        raise ValueError(f"model: checkpoint {checkpoint!r} is not a winattn training checkpoint;"
                         f" pass --model NAME to say which model it holds")
    kwargs: dict[str, Any] = {}
    if raw is not None:
        num_classes = head_classes(raw, where)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        kwargs["checkpoint"] = where  # read again by the loader, which names it in its errors
    del raw
    model = build.create_model(model_name, **kwargs)
    num_classes = model.num_classes
    names = (imagenet_class_names() if num_classes == 1000
             else [f"class_{i}" for i in range(num_classes)])
    return model.eval(), names, dict(model.data_config), None


def run_eval(checkpoint: str, *, model_name: str | None = None, data: str | None = None,
             val_fraction: float | None = None, batch_size: int = 64, out: str | None = None,
             use_ema: bool = True, device: str = "auto"):
    """Evaluate a checkpoint on a validation set; writes confusion.png and eval.json to ``out``.

    Without ``data``, a winattn checkpoint is evaluated on the held-out split of the data it was
    trained on (same data, seed and val_fraction, so the same images).

    Returns:
        (EvalResult, output folder)
    """
    from winattn.data.sources import build_datasets
    from winattn.data.transforms import SeededTransformDataset, build_transform
    from winattn.train.evaluate import evaluate
    from winattn.train.report import plot_confusion

    dev = _device(device)  # checked before a large checkpoint is read
    model, class_names, data_config, ckpt = load_model_for_inference(
        checkpoint, model_name, use_ema=use_ema)
    saved = ckpt["config"] if ckpt else {}
    data = data or saved.get("data")
    if data is None:
        raise ValueError("data: this checkpoint does not name its dataset; pass --data")
    if val_fraction is None:
        val_fraction = saved.get("val_fraction", 0.2)
    elif not 0 < val_fraction < 1:
        raise DataError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    same_as_training = ckpt is not None and data == saved.get("data")
    if same_as_training and val_fraction != saved.get("val_fraction", 0.2):
        warnings.warn(f"val_fraction {val_fraction} differs from training's "
                      f"{saved.get('val_fraction')}: this split contains training images")
    if Path(data).is_dir() and not (Path(data) / "train").is_dir():
        # A plain <class>/<images> folder: all of it is the evaluation set.
        val_set = scan_image_folder(data, class_names if ckpt is not None else None)
        data_classes = val_set.class_names
    else:
        splits = build_datasets(data, val_data=saved.get("val_data") if same_as_training
                                else None, val_fraction=val_fraction, seed=saved.get("seed", 0))
        val_set, data_classes = splits.val, splits.class_names
    if ckpt is None and len(data_classes) == len(class_names):
        # Foreign checkpoints carry no names: sorted folder names are taken as the label order
        # (true of ImageNet's synset folders).
        class_names = data_classes
    if data_classes != class_names:
        raise DataError(f"data: classes {data_classes[:10]} of {data!r} do not match the "
                        f"model's {class_names[:10]}")
    val = SeededTransformDataset(val_set, build_transform(data_config, train=False))
    loader = torch.utils.data.DataLoader(val, batch_size=batch_size)
    result = evaluate(model.to(dev), loader, num_classes=len(class_names), device=dev)
    out_dir = Path(out) if out else Path(checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(result.confusion, class_names, out_dir / "confusion.png")
    summary = {"checkpoint": str(checkpoint), "data": str(data), "images": result.count,
               "top1": result.top1, "top5": result.top5, "loss": result.loss}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result, out_dir


def cmd_eval(args: argparse.Namespace) -> int:
    result, out_dir = run_eval(args.checkpoint, model_name=args.model, data=args.data,
                               val_fraction=args.val_fraction, batch_size=args.batch_size,
                               out=args.out, use_ema=not args.no_ema, device=args.device)
    print(f"{result.count} images  top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%"
          f"  loss {result.loss:.4f}  confusion matrix: {out_dir / 'confusion.png'}")
    return 0


@torch.no_grad()
def predict_files(model: nn.Module, paths: list[str], class_names: list[str],
                  data_config: dict[str, Any], topk: int, device: torch.device
                  ) -> list[dict[str, Any]]:
    """Top-k predictions per file; an unreadable file gets an ``error`` entry instead."""
    from winattn.data.images import BadImageError, load_rgb
    from winattn.data.transforms import build_transform

    transform = build_transform(data_config, train=False)
    model = model.to(device).eval()
    k = min(topk, len(class_names))
    results = []
    for path in paths:
        try:
            x = transform(load_rgb(path))[None].to(device)  # (1, C, H, W)
        except BadImageError as err:
            results.append({"image": path, "error": str(err)})
            continue
        probs = model(x).float().softmax(dim=1)[0]
        top = probs.topk(k)
        results.append({"image": path, "top": [
            {"class": class_names[int(i)], "index": int(i), "prob": float(p)}
            for p, i in zip(top.values, top.indices)]})
    return results


def cmd_predict(args: argparse.Namespace) -> int:
    device = _device(args.device)
    model, class_names, data_config, _ = load_model_for_inference(
        args.checkpoint, args.model, pretrained=args.pretrained, use_ema=not args.no_ema)
    results = predict_files(model, args.images, class_names, data_config, args.topk, device)
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['image']}: error: {r['error']}")
        else:
            tops = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])
            print(f"{r['image']}: {tops}")
    return 1 if any("error" in r for r in results) else 0


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass at batch 1 (a multiply-add counts 2), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..ops.backends import cpu_kernel

    # Load the CPU kernel (and register its FLOP formula) first: the counter copies the
    # formulas it knows when it is made.
    cpu_kernel.available()
    x = torch.zeros(1, *input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def cmd_info(args: argparse.Namespace) -> int:
    import winattn

    names = winattn.list_models()
    if args.pattern:
        names = [n for n in names if fnmatch.fnmatch(n, args.pattern) or args.pattern in n]
    if not names:
        raise ValueError(f"pattern: no registered model matches {args.pattern!r}; "
                         f"run 'winattn info' for the list")
    header = f"{'model':44s} {'params':>10s} {'input':>12s}"
    if args.flops:
        header += f" {'GFLOPs':>9s} {'GMACs':>8s}"
    print(header)
    for name in names:
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        model = build.create_model(name, **kwargs).eval()
        build.check_img_size(model, name, args.img_size)
        params = sum(p.numel() for p in model.parameters())
        c, h, w = model.data_config["input_size"]
        line = f"{name:44s} {params / 1e6:9.2f}M {f'{c}x{h}x{w}':>12s}"
        if args.flops:
            flops = count_flops(model, (c, h, w))
            line += f" {flops / 1e9:9.2f} {flops / 2e9:8.2f}"
        print(line, flush=True)
    return 0
