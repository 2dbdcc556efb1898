"""Swin V2 on the CPU: winattn against timm and torchvision, in one process on the same
weights and inputs: inference, and with ``--train`` a training step against timm.

timm's model gets random weights with non-trivial post-norms (timm initialises them to zero,
which makes every block the identity and would hide a wrong attention), and winattn loads its
state dict; torchvision's ``swin_v2_t`` (window 8, 256x256: only for
``swinv2_tiny_window8_256``) keeps its own random weights, and a winattn model converted from
them with ``winattn.load_checkpoint`` must reproduce it. Before anything is timed the outputs
must agree: float32 within 1e-4, bf16 autocast by STYLE's rule (winattn's error against its
float32 output at most 2x the peer's own plus 1e-3). Then the libraries take turns call by
call (each round's order from ``winattn bench``'s balanced design); medians and ratio = peer
median / winattn median (above 1: winattn is faster). Hugging Face's Swinv2 adds the shift
mask twice (docs/swin_v2.md), so it computes another function and is not timed here.

The training step (``--train``; batch 8, forward, cross-entropy, backward, AdamW as
``winattn bench`` times it, drop path off in both so that they compute the same function)
is timed against timm only, with the activation memory (bytes autograd saves in one forward).
Before it, the step is checked with gradients on, through the same code the step runs
(``bench_cases.check_training_parity``): the loss and the gradients of the patch embedding,
two qkv weights, the continuous-bias MLP, the logit scale and the head, float32 within 1e-4,
bf16 by STYLE's rule (2x the peer's error for the loss, 3x for gradients, plus 1e-3).

    PYTHONPATH=src python benchmarks/bench_swin_v2.py --train --out docs/perf-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import winattn
from winattn.cli import bench_cases as cases
from winattn.cli.argtypes import non_negative_int, output_folder, positive_int
from winattn.cli.bench_report import format_ratio


def build(name: str, peer_names: list[str]) -> dict[str, cases.Peer]:
    """winattn (timm's weights, non-trivial post-norms) and the requested peers, built as
    ``winattn bench --models`` builds them (:func:`~winattn.cli.bench_cases.build_peers`)."""
    peers, notes = cases.build_peers(name, peer_names)
    for lib, why in notes.items():
        print(f"{name}: {lib} {why}", flush=True)
    return peers


def training_rows(name: str, built: dict[str, cases.Peer], resolution: int, dtypes: list[str],
                  repeats: int, lines: list[str]) -> list[dict]:
    """A training step of winattn and timm at batch 8 (see the module docstring)."""
    batch = 8
    x = torch.randn(batch, 3, resolution, resolution)
    target = torch.randint(0, 1000, (batch,))
    peers = {lib: built[lib] for lib in ("winattn", "timm")}
    rows = []
    for dtype in dtypes:
        print(f"[{time.strftime('%H:%M:%S')}] {name} training step {dtype}", flush=True)
        summary, parity = cases.time_training_steps(peers, x, target, dtype, 1, repeats)
        for lib, stats in summary.items():
            lines.append(f"| {name} train | {batch} | {dtype} | {lib} | "
                         f"{stats['median_ms']:.0f} | {format_ratio(stats)} | "
                         f"activations {stats['activation_mib']:.0f} MiB |")
        rows.append(dict(model=name, batch=batch, dtype=dtype, mode="train", parity=parity,
                         peers=summary))
    for peer in peers.values():
        peer.model.eval()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swinv2_tiny_window8_256"],
                        choices=[n for n in winattn.list_models() if cases.is_v2(n)])
    parser.add_argument("--peers", nargs="+", default=["timm", "torchvision"],
                        choices=["timm", "torchvision"])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--train", action="store_true", help="also time a training step")
    parser.add_argument("--train-repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=output_folder, help="folder for results.json and results.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"command": " ".join([Path(sys.executable).name] + sys.argv),
               "machine": cases.machine_info(), "versions": cases.versions(),
               "commit": cases.git_commit(), "threads": torch.get_num_threads(), "rows": []}
    lines = ["| model | batch | dtype | library | median ms | ratio | parity |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models:
        built = build(name, args.peers)
        resolution = cases.image_size(name)
        for batch in args.batches:
            x = torch.randn(batch, 3, resolution, resolution)
            for dtype in args.dtypes:
                print(f"[{time.strftime('%H:%M:%S')}] {name} batch {batch} {dtype}", flush=True)
                parity = cases.check_parity(name, built, x, dtype)
                fns = {lib: (lambda p=p: p.logits(x)) for lib, p in built.items()}
                with torch.no_grad(), cases.autocast_context(dtype):
                    times = cases.time_interleaved(fns, args.warmup, args.repeats)
                summary = cases.summarise(times)
                results["rows"].append(dict(model=name, batch=batch, dtype=dtype,
                                            parity=parity, peers=summary))
                for lib, stats in summary.items():
                    check = "-" if lib == "winattn" else ("ok" if parity[lib]["ok"] else "FAIL")
                    lines.append(f"| {name} | {batch} | {dtype} | {lib} | "
                                 f"{stats['median_ms']:.1f} | {format_ratio(stats)} | {check} |")
        if args.train:
            results["rows"] += training_rows(name, built, resolution, args.dtypes,
                                             args.train_repeats, lines)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out = Path(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        header = (f"Swin V2 inference, `{results['command']}`, commit `{results['commit']}`, "
                  f"{results['threads']} threads, torch {results['versions'].get('torch')}\n\n")
        (args.out / "results.md").write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
