"""Swin-T bf16 inference on the CPU with each of winattn's bf16-only pieces switched off in
turn, in one process, the variants taking turns call by call (as ``winattn bench`` does).

Variants: ``default``; ``one-group`` (every stage as one group of windows, still on the matmul
attention); ``sdpa-stages`` (the whole-stage path that training and float32 take: SDPA's bf16
kernel, no groups); ``no-packing`` (plain bf16 weights instead of oneDNN's blocked layout);
``timm`` for scale. Prints median and
min milliseconds and each variant's median over the default's (above 1: the piece pays).
These are the A/B figures docs/performance.md quotes for the bf16 section; rerun them on a new
host before trusting the defaults there.

    PYTHONPATH=src python benchmarks/ablate_cpu_bf16.py --batch 1 8 --repeats 21
"""

from __future__ import annotations

import argparse
import statistics

import torch

from winattn.cli.bench_cases import build_peers, time_interleaved
from winattn.layers import fused
from winattn.models import swin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    peers, _ = build_peers("swin_tiny_patch4_window7_224", ["timm"])
    ours, timm = peers["winattn"].model.eval(), peers["timm"].model.eval()
    groups_from = swin.WINDOW_GROUPS_FROM_TOKENS
    chooser = swin.SwinBlock._runs_in_window_groups
    packed_weight = fused._inference_weight
    plain: dict = {}

    def plain_weight(layer: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        key = (id(layer), dtype)
        if key not in plain:
            plain[key] = layer.weight.detach().to(dtype)
        return plain[key]

    def variant(groups: bool, packing: bool, grouped_path: bool = True):
        def run(x: torch.Tensor):
            swin.WINDOW_GROUPS_FROM_TOKENS = groups_from if groups else 1 << 62
            swin.SwinBlock._runs_in_window_groups = (
                chooser if grouped_path else (lambda self, t: False)
            )
            fused._inference_weight = packed_weight if packing else plain_weight
            return ours(x)

        return run

    runs = {
        "default": variant(True, True),
        "one-group": variant(False, True),
        "sdpa-stages": variant(True, True, grouped_path=False),
        "no-packing": variant(True, False),
    }
    try:
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            fns = {name: (lambda f=f: f(x)) for name, f in runs.items()}
            fns["timm"] = lambda: timm(x)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                times = time_interleaved(fns, args.warmup, args.repeats)
            base = statistics.median(times["default"])
            print(f"batch {batch}, {torch.get_num_threads()} threads, {args.repeats} repeats")
            print("| variant | median ms | min ms | median / default's |")
            print("|---|---|---|---|")
            for name, ts in times.items():
                median = statistics.median(ts)
                fastest = min(ts) * 1e3
                print(f"| {name} | {median * 1e3:.1f} | {fastest:.1f} | {median / base:.2f}x |")
    finally:
        swin.WINDOW_GROUPS_FROM_TOKENS = groups_from
        swin.SwinBlock._runs_in_window_groups = chooser
        fused._inference_weight = packed_weight


if __name__ == "__main__":
    main()
