"""Swin-T on the CPU with each of winattn's CPU-specific choices switched in turn, in one
process, the variants taking turns call by call (as ``winattn bench`` does), timm for scale.

Inference (``--dtype fp32 bf16``, ``--batch``): ``default``; ``matmul-attn`` / ``sdpa-attn``
(bf16 attention as two matmuls around a float32 softmax, or SDPA's fused kernel, whatever the
CPU; float32 always takes SDPA);
``groups`` / ``whole-stages`` (blocks run a group of windows at a time, or on whole stages);
``no-packing`` (plain bf16 weights instead of oneDNN's blocked layout); ``no-onednn`` (the
linears as ``nn.Linear`` runs them). Training (``--train``, batch 8): ``default``, ``no-flush``
(subnormal probabilities left to the softmax), ``onednn-bwd`` / ``blas-bwd`` (float32
backward matmuls through oneDNN, or the BLAS). Prints medians and each variant's median over
the default's (above 1: the default is faster). These are the A/B figures docs/fast-path.md
quotes; the defaults follow ``cpu_has_amx()``, so rerun this on a new CPU before trusting them.

    PYTHONPATH=src python benchmarks/ablate_cpu_choices.py --dtype bf16 fp32 --batch 1 8 --train
"""

from __future__ import annotations

import argparse

import torch

from winattn.cli.argtypes import non_negative_int, positive_int
from winattn.cli.bench_cases import (
    autocast_context,
    build_peers,
    summarise,
    time_interleaved,
    train_step_fn,
)
from winattn.cli.bench_report import format_ratio
from winattn.layers import attention, fused
from winattn.models import swin
from winattn.ops.backends import sdpa

ORIGINAL = {
    "prefers_matmuls": sdpa.prefers_matmuls,
    "runs_in_groups": swin.SwinBlock._runs_in_window_groups,
    "inference_params": fused._inference_params,
    "onednn_ready": fused._onednn_ready,
    "deep_slots": sdpa._deep_mask_slots,
    "onednn_bwd": fused._onednn_float32_backward,
}
_PLAIN: dict = {}


def _plain_params(
    layer: torch.nn.Linear, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    key = (id(layer), dtype)
    if key not in _PLAIN:
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        _PLAIN[key] = (layer.weight.detach().to(dtype), bias)
    return _PLAIN[key]


def _is_cpu_low_precision(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def _in_groups(block: swin.SwinBlock, x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and not block.training and x.device.type == "cpu"


def apply(variant: str) -> None:
    """Set the switches for ``variant`` (``default`` restores them all)."""
    matmuls = {"matmul-attn": _is_cpu_low_precision, "sdpa-attn": lambda q: False}
    sdpa.prefers_matmuls = attention.prefers_matmuls = matmuls.get(
        variant, ORIGINAL["prefers_matmuls"]
    )
    groups = {"groups": _in_groups, "whole-stages": lambda self, x: False}
    swin.SwinBlock._runs_in_window_groups = groups.get(variant, ORIGINAL["runs_in_groups"])
    packed = variant != "no-packing"
    fused._inference_params = ORIGINAL["inference_params"] if packed else _plain_params
    fused._INFERENCE_SETS.clear()  # the blocks' weight sets were built by the previous choice
    onednn = variant != "no-onednn"
    fused._onednn_ready = ORIGINAL["onednn_ready"] if onednn else (lambda x: False)
    flush = variant != "no-flush"
    sdpa._deep_mask_slots = ORIGINAL["deep_slots"] if flush else (lambda mask: None)
    backward = {"onednn-bwd": lambda: True, "blas-bwd": lambda: False}
    fused._onednn_float32_backward = backward.get(variant, ORIGINAL["onednn_bwd"])


def _table(title: str, times: dict[str, list[float]]) -> None:
    """Medians, and each variant's median over the default's with the per-round ratios'
    median and quartiles (:func:`summarise` against the default, as ``winattn bench`` reports
    a peer against winattn)."""
    print(title)
    print("| variant | median ms | min ms | median / default's (rounds: median, quartiles) |")
    print("|---|---|---|---|")
    for name, stats in summarise(times, ours="default").items():
        print(f"| {name} | {stats['median_ms']:.1f} | {stats['min_ms']:.1f} | "
              f"{format_ratio(stats)} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["bf16"])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=positive_int, default=11)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--train", action="store_true", help="also A/B the training step")
    args = parser.parse_args()

    peers, _ = build_peers("swin_tiny_patch4_window7_224", ["timm"])
    ours, timm = peers["winattn"].model, peers["timm"].model
    print(f"cpu_has_amx() = {sdpa.cpu_has_amx()}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats\n")
    inference = ["default", "matmul-attn", "sdpa-attn", "groups", "whole-stages",
                 "no-packing", "no-onednn"]
    try:
        for dtype in args.dtype:
            ours.eval(), timm.eval()
            for batch in args.batch:
                x = torch.randn(batch, 3, 224, 224)
                fns = {v: (lambda v=v: (apply(v), ours(x))) for v in inference}
                fns["timm"] = lambda: timm(x)
                with torch.no_grad(), autocast_context(dtype):
                    times = time_interleaved(fns, args.warmup, args.repeats)
                _table(f"inference, {dtype}, batch {batch}", times)
            if args.train:
                _training(peers, dtype, args)
    finally:
        apply("default")


def _training(peers: dict, dtype: str, args) -> None:
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    ours, timm = (train_step_fn(peers[name], x, y, dtype) for name in ("winattn", "timm"))
    variants = ["default", "no-flush"] + (["onednn-bwd", "blas-bwd"] if dtype == "fp32" else [])
    fns = {v: (lambda v=v: (apply(v), ours())) for v in variants}
    fns["timm"] = lambda: (apply("default"), timm())
    times = time_interleaved(fns, args.warmup, args.repeats)
    _table(f"training step, {dtype}, batch 8", times)


if __name__ == "__main__":
    main()
