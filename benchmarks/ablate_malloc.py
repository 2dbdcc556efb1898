"""Swin-T training steps on the CPU with glibc's default malloc settings and with the ones
``winattn train`` sets (:func:`winattn.train.allocator.tune_malloc`), winattn and timm alike.

The settings are process-wide, so each measurement is a fresh process: build the model, warm
up, time ``--steps`` steps (forward, backward, AdamW; batch 8), report the median step and the
peak resident set over the built model (VmHWM). Processes run one at a time, the variants
alternating round by round, so a change of load on the host hits both. Prints each variant's
median over the rounds' medians and the ratio default / tuned (above 1: tuning is faster).

    PYTHONPATH=src python benchmarks/ablate_malloc.py --dtype fp32 bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("default", "tuned")


def worker(spec: dict) -> dict:
    """One process: build ``spec["library"]``'s Swin-T, time training steps."""
    import torch

    from winattn.cli.bench_cases import _peak_rss_mib, _rss_mib, build_peers, train_step_fn
    from winattn.train.allocator import tune_malloc

    done = tune_malloc() if spec["variant"] == "tuned" else "default"
    torch.manual_seed(0)
    peers, _ = build_peers("swin_tiny_patch4_window7_224", [spec["library"]])
    peer = peers[spec["library"]]
    batch = spec["batch"]
    x = torch.randn(batch, 3, 224, 224)
    step = train_step_fn(peer, x, torch.randint(0, 1000, (batch,)), spec["dtype"])
    base = _rss_mib()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"malloc": done, "step_ms": 1e3 * statistics.median(times),
            "peak_over_baseline_mib": _peak_rss_mib() - base}


def run(spec: dict) -> dict:
    env = dict(os.environ)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from winattn.cli.argtypes import non_negative_int, positive_int
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--library", nargs="+", choices=["winattn", "timm"],
                        default=["winattn", "timm"])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for dtype in args.dtype:
        print(f"\ntraining step, {dtype}")
        print("| library | malloc | median step ms | rounds' medians | peak RSS over model MiB |")
        print("|---|---|---|---|---|")
        for library in args.library:
            results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    spec = {"library": library, "variant": variant, "dtype": dtype,
                            "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
                    results[variant].append(run(spec))
            medians = {}
            for variant in VARIANTS:
                steps = [r["step_ms"] for r in results[variant]]
                medians[variant] = statistics.median(steps)
                rss = statistics.median(r["peak_over_baseline_mib"] for r in results[variant])
                print(f"| {library} | {variant} ({results[variant][0]['malloc']}) | "
                      f"{medians[variant]:.0f} | {', '.join(f'{s:.0f}' for s in steps)} | "
                      f"{rss:.0f} |")
            print(f"| {library} | default / tuned | {medians['default'] / medians['tuned']:.2f}x"
                  " | | |")


if __name__ == "__main__":
    main()
