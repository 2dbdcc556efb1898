"""Swin-T training steps on the CPU, split into forward, backward and optimizer, with the MLP
hidden-layer recomputation in no stage, the first (the default) or the first two, the default
with PyTorch's fused AdamW (what ``winattn train`` builds), and timm for scale; one process,
the variants taking turns step by step, each round's order from the balanced design of
``winattn bench`` (each variant follows each other one equally often; ``--repeats`` is rounded
up to whole cycles of it: 10 rounds for the five variants).

winattn's variants share one model and one AdamW, timm has its own (lr 1e-5, so the weights
barely move; both the AdamW that ``torch.optim.AdamW`` picks by default, on the CPU a loop over
the parameters, as ``winattn bench`` gives both libraries); the fused variant steps winattn's
model with a second, fused AdamW. Both models carry the same timm weights; drop path is off in
both. Prints the median milliseconds of each part and each variant's step time over winattn's
default (above 1: the default is faster), and the activation memory (bytes autograd saves in
one forward). These are the A/B figures docs/fast-path.md (item 5) quotes for the first stage's
recomputation and the bf16 step split.

    PYTHONPATH=src python benchmarks/ablate_train_step.py --dtype fp32 bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from winattn.cli.argtypes import non_negative_int, positive_int
from winattn.cli.bench_cases import (
    autocast_context,
    balanced_order,
    balanced_rounds,
    build_peers,
    saved_activation_bytes,
)

VARIANTS = {"none": (), "stage 1 (default)": (0,), "stages 1-2": (0, 1)}
FUSED = "stage 1, fused AdamW"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    peers, _ = build_peers("swin_tiny_patch4_window7_224", ["timm"])
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    ours, timm = peers["winattn"], peers["timm"]
    optimizers = {
        name: torch.optim.AdamW(peer.model.parameters(), lr=1e-5)
        for name, peer in (("winattn", ours), ("timm", timm))
    }
    optimizers[FUSED] = torch.optim.AdamW(ours.model.parameters(), lr=1e-5, fused=True)

    def recompute_in(stages: tuple[int, ...]) -> None:
        for i, stage in enumerate(ours.model.layers):
            for block in stage.blocks:
                block.recompute_mlp_hidden = i in stages

    def step(name: str, dtype: str, optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
        peer = ours if name == "winattn" else timm
        peer.model.train()
        start = time.perf_counter()
        with autocast_context(dtype):
            loss = F.cross_entropy(peer.logits(x).float(), y)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        return forward - start, backward - forward, done - backward

    for dtype in args.dtype:
        runs = {label: ("winattn", stages) for label, stages in VARIANTS.items()}
        runs[FUSED] = ("winattn", VARIANTS["stage 1 (default)"])
        runs["timm"] = ("timm", ())
        activations = {}
        for label, (name, stages) in runs.items():
            recompute_in(stages)
            peer = ours if name == "winattn" else timm
            activations[label] = saved_activation_bytes(peer, x, dtype) / 2**20
        times: dict[str, list[tuple[float, float, float]]] = {label: [] for label in runs}
        labels = list(runs)
        # The order of each round from the balanced design `winattn bench` uses: each variant
        # follows each other one equally often (repeats rounded up to whole cycles of it).
        rounds = [(False, balanced_order(len(labels))[0])] * args.warmup
        rounds += [(True, row) for row in balanced_rounds(len(labels), args.repeats)]
        for timed, row in rounds:
            for label in (labels[i] for i in row):
                name, stages = runs[label]
                recompute_in(stages)
                split = step(name, dtype, optimizers[label if label == FUSED else name])
                if timed:
                    times[label].append(split)
        recompute_in(VARIANTS["stage 1 (default)"])
        base = statistics.median(sum(t) for t in times["stage 1 (default)"])
        print(f"\n{dtype}, batch {args.batch}, {torch.get_num_threads()} threads, "
              f"{len(times['timm'])} repeats")
        print("| variant | forward ms | backward ms | optimizer ms | step ms | step / default's "
              "| activations MiB |")
        print("|---|---|---|---|---|---|---|")
        for label, rows in times.items():
            parts = [statistics.median(part) * 1e3 for part in zip(*rows)]
            total = statistics.median(sum(t) for t in rows)
            print(f"| {label} | {parts[0]:.0f} | {parts[1]:.0f} | {parts[2]:.0f} | "
                  f"{total * 1e3:.0f} | {total / base:.2f}x | {activations[label]:.0f} |")


if __name__ == "__main__":
    main()
