"""Swin-T training steps on the CPU with glibc's default malloc settings and with the ones
``winattn train`` sets (:func:`winattn.train.allocator.tune_malloc`), winattn and timm alike.

The settings are process-wide, so each measurement is a fresh process: build the model, warm
up, time ``--steps`` steps (forward, backward, AdamW; batch 8), report the median step and the
peak resident set over the built model (VmHWM, reset after building: the worker builds both
libraries' models and drops one). Processes run one at a time; each round runs every library
with every variant, libraries and variants alternating, the order reversed every other round
(ABBA), so a change of load on the host hits all alike. Prints each process's median step,
each (library, variant)'s median over the rounds, and the ratios default / tuned (above 1:
tuning is faster) and timm / winattn (above 1: winattn is faster), both as the ratio of the
medians and as the median of the ratios formed within each round.

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

    from winattn.cli.bench_cases import build_peers, train_step_fn
    from winattn.cli.bench_memory import measure_peak
    from winattn.train.allocator import tune_malloc

    done = tune_malloc() if spec["variant"] == "tuned" else "default"
    torch.manual_seed(0)
    peers, _ = build_peers("swin_tiny_patch4_window7_224", [spec["library"]])
    peer = peers.pop(spec["library"])  # the other library's model is freed, not kept
    del peers
    batch = spec["batch"]
    x = torch.randn(batch, 3, 224, 224)
    step = train_step_fn(peer, x, torch.randint(0, 1000, (batch,)), spec["dtype"])
    times = []

    def run() -> None:
        for _ in range(spec["warmup"]):
            step()
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

    # The peak is reset after building both models, so it is the steps' own.
    memory = measure_peak(run)
    return {"malloc": done, "step_ms": 1e3 * statistics.median(times),
            "peak_over_baseline_mib": memory["peak_over_baseline_mib"]}


def run(spec: dict) -> dict:
    env = dict(os.environ)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def schedule(libraries: list[str], rounds: int) -> list[list[tuple[str, str]]]:
    """The processes of each round: every library with every variant, libraries and variants
    alternating, the order reversed every other round (ABBA), so that a drift of the host's
    speed hits all alike (the ratios are also formed within each round)."""
    runs = [(library, variant) for variant in VARIANTS for library in libraries]
    return [runs if r % 2 == 0 else runs[::-1] for r in range(rounds)]


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
        rounds = schedule(args.library, args.rounds)
        results: dict[tuple[str, str], list[dict]] = {key: [] for key in rounds[0]}
        for order in rounds:
            for library, variant in order:
                spec = {"library": library, "variant": variant, "dtype": dtype,
                        "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
                results[library, variant].append(run(spec))
        print("| library | malloc | median step ms | rounds' medians | peak RSS over model MiB |")
        print("|---|---|---|---|---|")
        steps = {key: [r["step_ms"] for r in rows] for key, rows in results.items()}
        medians = {key: statistics.median(values) for key, values in steps.items()}
        for (library, variant), rows in results.items():
            measured = [r["peak_over_baseline_mib"] for r in rows
                        if r["peak_over_baseline_mib"] is not None]
            rss = f"{statistics.median(measured):.0f}" if measured else "-"
            print(f"| {library} | {variant} ({rows[0]['malloc']}) | "
                  f"{medians[library, variant]:.0f} | "
                  f"{', '.join(f'{s:.0f}' for s in steps[library, variant])} | {rss} |")
        print("\n| ratio | of the medians | median of the rounds' ratios | rounds' ratios |")
        print("|---|---|---|---|")
        pairs = [(f"{lib}: default / tuned", (lib, "default"), (lib, "tuned"))
                 for lib in args.library]
        if set(args.library) == {"winattn", "timm"}:
            pairs += [(f"{variant}: timm / winattn", ("timm", variant), ("winattn", variant))
                      for variant in VARIANTS]
        for label, top, bottom in pairs:
            per_round = [a / b for a, b in zip(steps[top], steps[bottom])]
            print(f"| {label} | {medians[top] / medians[bottom]:.2f}x | "
                  f"{statistics.median(per_round):.2f}x | "
                  f"{', '.join(f'{x:.2f}' for x in per_round)} |")

if __name__ == "__main__":
    main()
