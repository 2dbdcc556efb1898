"""``winattn convert`` and ``winattn export``: checkpoint formats and ONNX."""

from __future__ import annotations

import argparse

FORMATS = ("winattn", "official", "torchvision", "huggingface")


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

    p = sub.add_parser("export", help="export a model to ONNX with dynamic batch/height/width")
    p.add_argument("--model", default=None, help="model name (any non-winattn checkpoint needs it)")
    p.add_argument("--checkpoint", default=None, help="checkpoint of any supported format")
    p.add_argument("--out", default="model.onnx", help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument(
        "--shape",
        choices=("dynamic", "batch", "static"),
        default="dynamic",
        help="dynamic: symbolic batch/height/width; batch: symbolic batch at the model's own "
        "size; static: the model's own size, batch 2",
    )
    p.set_defaults(func=cmd_export)


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from winattn.checkpoints.convert import from_native, to_native, unwrap
    from winattn.checkpoints.io import read_checkpoint, save_state_dict

    raw, where = read_checkpoint(args.source)
    native, detected = to_native(unwrap(raw))
    if args.model:
        import winattn

        winattn.load_checkpoint(winattn.create_model(args.model), native)
    out = native if args.to == "winattn" else from_native(native, args.to)
    if str(args.output).endswith((".pth", ".pt", ".bin")):
        torch.save(out, args.output)
    else:
        save_state_dict(args.output, out)
    print(f"{where}: {detected} layout, {len(native)} tensors -> {args.output} ({args.to} layout)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import winattn
    from winattn.cli.commands import load_model_for_inference

    model, _, _, _ = load_model_for_inference(args.checkpoint, args.model)
    shape = args.shape
    dynamic = {"dynamic": True, "batch": "batch", "static": False}[shape]
    path = winattn.export_onnx(model.eval(), args.out, opset=args.opset, dynamic=dynamic)
    size = "x".join(map(str, model.data_config["input_size"][1:]))
    what = {
        "dynamic": "dynamic batch/height/width",
        "batch": f"dynamic batch at {size} pixels",
        "static": f"fixed input shape 2x3x{size}",
    }[shape]
    print(f"exported {type(model).__name__} to {path} (opset {args.opset}, {what})")
    return 0
