"""``winattn eval``, ``winattn predict`` and ``winattn info``."""

from __future__ import annotations

import argparse
import fnmatch
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from winattn.data.folder import DataError, scan_image_folder
from winattn.train import build
from winattn.train.state import CHECKPOINT_FORMAT


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _read_checkpoint(path: str) -> dict[str, Any] | None:
    """Our training checkpoint as a dict, or None when ``path`` is some other format."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: {path!r} does not exist")
    if p.is_file() and p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # holds other Python objects: not a winattn checkpoint
            return None
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            return obj
    return None


def load_model_for_inference(checkpoint: str | None, model_name: str | None, *,
                             pretrained: bool = False, use_ema: bool = True
                             ) -> tuple[nn.Module, list[str], dict[str, Any], dict | None]:
    """Build a model for eval/predict: returns (model, class_names, data_config, our_ckpt).

    A winattn training checkpoint carries its model name, class names and data config. Any other
    checkpoint (official, timm, torchvision, Hugging Face) needs ``model_name``; its classes are
    ImageNet-1k's when it has 1000 outputs.
    """
    from winattn.data import imagenet_class_names

    ckpt = _read_checkpoint(checkpoint) if checkpoint else None
    if ckpt is not None:
        if model_name and model_name != ckpt["model_name"]:
            raise ValueError(f"model: {model_name!r} given, but checkpoint {checkpoint!r} holds a "
                             f"{ckpt['model_name']!r}")
        model = build.model_from_checkpoint(ckpt, use_ema=use_ema)
        return model, ckpt["class_names"], ckpt["data_config"], ckpt
    if not model_name:
        what = f"checkpoint {checkpoint!r} is not a winattn training checkpoint" if checkpoint \
            else "no checkpoint given"
        raise ValueError(f"model: {what}; pass --model NAME to say which model it holds")
    if checkpoint:
        model = build.create_model(model_name, checkpoint=checkpoint)
    else:
        model = build.create_model(model_name, pretrained=pretrained)
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

    model, class_names, data_config, ckpt = load_model_for_inference(
        checkpoint, model_name, use_ema=use_ema)
    saved = ckpt["config"] if ckpt else {}
    data = data or saved.get("data")
    if data is None:
        raise ValueError("data: this checkpoint does not name its dataset; pass --data")
    val_fraction = val_fraction or saved.get("val_fraction", 0.2)
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
    dev = _device(device)
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
    model, class_names, data_config, _ = load_model_for_inference(
        args.checkpoint, args.model, pretrained=args.pretrained, use_ema=not args.no_ema)
    results = predict_files(model, args.images, class_names, data_config, args.topk,
                            _device(args.device))
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
        params = sum(p.numel() for p in model.parameters())
        c, h, w = model.data_config["input_size"]
        line = f"{name:44s} {params / 1e6:9.2f}M {f'{c}x{h}x{w}':>12s}"
        if args.flops:
            flops = count_flops(model, (c, h, w))
            line += f" {flops / 1e9:9.2f} {flops / 2e9:8.2f}"
        print(line, flush=True)
    return 0
