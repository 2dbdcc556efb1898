"""``winattn convert`` and ``winattn export``: checkpoint formats and ONNX."""

from __future__ import annotations

import argparse

from winattn.cli.argtypes import int_at_least, output_file

FORMATS = ("winattn", "official", "torchvision", "huggingface")


def opset(text: str) -> int:
    """An ONNX opset number the exporter supports (>= 17)."""
    return int_at_least(text, 17, "an integer >= 17")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats (official, timm, torchvision, Hugging Face)",
        description="Read a checkpoint in any supported format, check it against --model "
        "(optional) and write it as safetensors in the chosen layout. 'winattn' is timm's "
        "layout, key for key.",
    )
    p.add_argument("source", help="checkpoint file or hub-style folder")
    p.add_argument("output", help="output file (.safetensors, or .pth for torch.save)")
    p.add_argument("--to", choices=FORMATS, default="winattn", help="layout to write")
    p.add_argument("--model", default=None, help="check the weights load into this model first")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export",
        help="export a model to ONNX with dynamic batch/height/width",
        description="Export a model to one ONNX file. With a winattn training checkpoint that "
        "holds EMA weights (--ema-decay), the EMA weights are exported, as eval and predict use "
        "them (--no-ema: the raw weights). Without --checkpoint the weights are random (a graph "
        "to inspect or time). A dynamic graph is exact at every size but one range, non-square "
        "maps below the window under the official window rule: see docs/export.md, 'Which sizes "
        "an exported file is exact for'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model name (any non-winattn checkpoint needs it)")
    p.add_argument("--checkpoint", default=None, help="checkpoint of any supported format")
    p.add_argument("--out", type=output_file, default="model.onnx",
                   help="output .onnx file (its folder is created)")
    p.add_argument("--opset", type=opset, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw weights of a checkpoint that also holds EMA weights")
    p.add_argument(
        "--shape",
        choices=("dynamic", "batch", "static"),
        default="dynamic",
        help="dynamic: symbolic batch/height/width; batch: symbolic batch at the model's own "
        "size; static: the model's own size, batch 2",
    )
    p.set_defaults(func=cmd_export)


def cmd_convert(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from winattn.checkpoints.convert import from_native, is_v2, to_native, unwrap
    from winattn.checkpoints.io import open_checkpoint, save_state_dict

    checkpoint = open_checkpoint(args.source)
    where = checkpoint.source
    if args.model:
        import winattn
        from winattn.cli.commands import head_classes

        # Checked on the checkpoint as read: conversion drops what says which windows a V2
        # position bias was trained at (coordinate tables, config.json). The model takes the
        # checkpoint's class count (a fine-tune's head is not the variant's 1000 classes).
        classes = head_classes(checkpoint.content, where)
        kwargs = {} if classes is None else {"num_classes": classes}
        winattn.load_checkpoint(winattn.create_model(args.model, **kwargs), checkpoint)
    raw = unwrap(checkpoint.content, source=f"checkpoint {where}")
    native, detected = to_native(raw, source=f"checkpoint {where}")
    if not args.model and is_v2(native) and (
        checkpoint.hf_config is not None or any(k.endswith("relative_coords_table") for k in raw)
    ):
        print(f"note: {where} says at which windows its position bias was trained, which the "
              "converted file does not keep; pass --model NAME to check it against the model "
              "you will load it into", file=sys.stderr)
    out = native if args.to == "winattn" else from_native(native, args.to)
    output = Path(args.output)
    if output.suffix in (".pth", ".pt", ".bin"):
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, output)
    else:
        save_state_dict(output, out)
    print(f"{where}: {detected} layout, {len(native)} tensors -> {args.output} ({args.to} layout)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import winattn
    from winattn.cli.commands import load_model_for_inference

    model, _, _, ckpt = load_model_for_inference(args.checkpoint, args.model,
                                                 use_ema=not args.no_ema, random_weights=True)
    out = Path(args.out)
    # Found before the export (which takes minutes for the large models), not after it.
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out: cannot write {str(out)!r} (no write permission)")
    shape = args.shape
    dynamic = {"dynamic": True, "batch": "batch", "static": False}[shape]
    path = winattn.export_onnx(model.eval(), out, opset=args.opset, dynamic=dynamic)
    size = "x".join(map(str, model.data_config["input_size"][1:]))
    what = {
        "dynamic": "dynamic batch/height/width",
        "batch": f"dynamic batch at {size} pixels",
        "static": f"fixed input shape 2x3x{size}",
    }[shape]
    if not args.checkpoint:
        weights = "random weights: no --checkpoint"
    elif ckpt is not None and ckpt.get("ema") is not None:
        weights = "raw weights" if args.no_ema else "EMA weights"
    else:
        weights = "the checkpoint's weights"
    print(f"exported {type(model).__name__} to {path} (opset {args.opset}, {what}; {weights})")
    return 0
