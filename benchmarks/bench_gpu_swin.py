"""Swin V1 models on a GPU: winattn (fused Triton kernel, and its window-order SDPA path)
against timm, eager and compiled, in bf16.

For each model and batch size, on timm's random-init weights loaded into winattn:

- parity first: bf16-autocast logits of every entry against timm's float32 logits; winattn's
  error must be at most 2x timm's own bf16 error plus 1e-3 (STYLE.md's rule), else it stops;
- inference: images/s of a bf16-autocast forward without gradients;
- training: images/s of forward + cross-entropy + backward + AdamW step (the same
  ``torch.optim.AdamW`` for every entry), and its peak allocated memory.

Entries: ``winattn-fused`` (``set_attention_path("grid")``: every block's attention goes to
the operator, whose dispatcher picks the Triton kernel on CUDA), ``winattn-window-order``
(tokens kept in window order, SDPA with the folded mask), ``timm``, and with ``--compile``
``timm-compiled`` and ``winattn-fused-compiled`` (``torch.compile``, default mode).

Prints a Markdown table (ratios: an entry's images/s over timm eager's) and writes JSON.

    PYTHONPATH=src python benchmarks/bench_gpu_swin.py --compile --json gpu-swin.json

``--device cpu --smoke`` runs the same code on the CPU at batch 2 with one repeat, to check
the script where there is no GPU (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from bench_gpu_op import environment  # this folder (a script's own folder is on sys.path)

from winattn.cli.argtypes import non_negative_int, positive_int
from winattn.cli.bench_cases import build_peers

MODELS = ("swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224")


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def entries(variant: str, device: torch.device, compile_too: bool) -> dict[str, torch.nn.Module]:
    """The models to compare, all on timm's weights."""
    peers, _ = build_peers(variant, ["timm"])
    timm_model = peers["timm"].model.to(device)
    ours = peers["winattn"].model.to(device)
    fused = ours
    window_order = type(ours)(ours.config).to(device)  # a twin whose stages keep window order
    window_order.load_state_dict(ours.state_dict())
    fused.set_attention_path("grid")
    window_order.set_attention_path("window-order")
    models = {"winattn-fused": fused, "winattn-window-order": window_order, "timm": timm_model}
    if compile_too:
        models["timm-compiled"] = torch.compile(timm_model)
        models["winattn-fused-compiled"] = torch.compile(fused)
    return models


def check_parity(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Each entry's max |bf16 logits - timm float32 logits|; stops on a failure of the rule."""
    for model in models.values():
        model.eval()
    with torch.no_grad():
        exact = models["timm"](x).float()
        errors = {}
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            for name, model in models.items():
                errors[name] = (model(x).float() - exact).abs().max().item()
    allowed = 2 * errors["timm"] + 1e-3
    for name, err in errors.items():
        if name.startswith("winattn") and err > allowed:
            sys.exit(f"parity failed: {name} bf16 error {err:.3g} > 2 x timm's "
                     f"{errors['timm']:.3g} + 1e-3")
    return errors


def inference_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run() -> object:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x)

    return run


def training_fn(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor
) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[64, 128])
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd entries")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="batch 2, one repeat: a dry run")
    parser.add_argument("--warmup", type=non_negative_int, default=5)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_swin.py needs a CUDA device: none is available here (nothing measured;"
                 " --device cpu --smoke checks the script).")
    if args.smoke:
        args.batch, args.warmup, args.repeats = [2], 1, 1

    rows = []
    for variant in args.models:
        models = entries(variant, device, args.compile)
        for batch in args.batch:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(batch, 3, 224, 224, generator=gen, device=device)
            target = torch.randint(0, 1000, (batch,), generator=gen, device=device)
            errors = check_parity(models, x)
            for name, model in models.items():
                row = dict(model=variant, batch=batch, entry=name, bf16_error=errors[name])
                try:
                    ms = time_ms(inference_fn(model, x), device, args.warmup, args.repeats)
                    row["infer_img_s"] = batch / (ms * 1e-3)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    ms = time_ms(training_fn(model, x, target), device, args.warmup, args.repeats)
                    row["train_img_s"] = batch / (ms * 1e-3)
                    if device.type == "cuda":
                        row["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"out of memory: {exc}".splitlines()[0]
                    torch.cuda.empty_cache()
                rows.append(row)

    base = {(r["model"], r["batch"]): r for r in rows if r["entry"] == "timm"}
    print(f"environment: {json.dumps(environment(device))}")
    print("| model | batch | entry | inference img/s | vs timm | training img/s | vs timm "
          "| training peak GiB | bf16 error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[(r["model"], r["batch"])]
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['entry']} | {r['error']} |  |  |  |  |  |")
            continue
        peak = f"{r['train_peak_gib']:.1f}" if "train_peak_gib" in r else "-"
        print(f"| {r['model']} | {r['batch']} | {r['entry']} | {r['infer_img_s']:.0f} "
              f"| {r['infer_img_s'] / b['infer_img_s']:.2f}x | {r['train_img_s']:.0f} "
              f"| {r['train_img_s'] / b['train_img_s']:.2f}x | {peak} | {r['bf16_error']:.2g} |")
    if args.json:
        args.json.write_text(json.dumps(dict(environment=environment(device), rows=rows), indent=2))


if __name__ == "__main__":
    main()
