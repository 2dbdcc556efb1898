"""``winattn bench``: winattn against timm, torchvision and transformers in one process.

Every section builds the peers on the same weights, checks that their outputs agree, warms up,
then times them taking turns and reports medians and the ratio of each peer's median to
winattn's (above 1: winattn is faster). Results go to ``results.json``, ``results.md`` and
``scaling.png`` in ``--out``, with the machine, library versions and git commit.

Example:
    PYTHONPATH=src python -m winattn.cli.bench --out bench-results   # the default set
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import winattn

from . import bench_cases as cases
from . import bench_memory
from .argtypes import output_folder, positive_int
from .bench_report import write_markdown, write_plot

PRESETS = {
    "default": dict(
        models=["swin_tiny_patch4_window7_224"], batches=[1, 8], dtypes=["fp32", "bf16"],
        train_dtypes=["fp32", "bf16"], resolutions=[224, 512, 1024], repeats=5, warmup=1,
        train_repeats=7,
    ),
    "full": dict(
        models=[*cases.VARIANTS, "swinv2_tiny_window8_256"], batches=[1, 8],
        dtypes=["fp32", "bf16"], train_dtypes=["fp32", "bf16"],
        resolutions=[224, 448, 512, 768, 1024], repeats=7, warmup=1, train_repeats=7,
    ),
}
SECTIONS = ("inference", "training", "features", "operator")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``winattn`` command line."""
    parser = subparsers.add_parser(
        "bench", help="benchmark winattn against timm, torchvision and transformers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: Swin-T, a few minutes; full: Swin-T/S/B and more sizes")
    v2 = [name for name in winattn.list_models() if cases.is_v2(name)]
    parser.add_argument("--models", nargs="+", choices=[*cases.VARIANTS, *v2],
                        help="models instead of the preset's (inference; training times the "
                        "first; features and operator the first Swin V1 one)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--peers", nargs="+", default=["timm", "torchvision", "transformers"],
                        choices=["timm", "torchvision", "transformers"])
    parser.add_argument("--repeats", type=positive_int,
                        help="timed calls per case (preset's otherwise), rounded up to whole "
                        "cycles of the balanced order (4 rounds for 4 libraries, 10 for 5)")
    parser.add_argument("--threads", type=positive_int,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--out", type=output_folder, default="bench-results",
                        help="output folder")


def run(args: argparse.Namespace) -> int:
    """Run the selected sections, write the results, print the Markdown table."""
    needs_timm = sorted(set(args.sections) - {"operator"})
    if needs_timm and importlib.util.find_spec("timm") is None:
        print(f"winattn bench: error: the {', '.join(needs_timm)} section(s) compare against "
              "timm, which is not installed: pip install 'winattn[bench]' (or run "
              "--sections operator alone)", file=sys.stderr)
        return 2
    settings = dict(PRESETS[args.preset])
    if args.models:
        settings["models"] = list(args.models)
    if args.repeats:
        settings["repeats"] = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    results: dict = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "preset": args.preset,
        "machine": cases.machine_info(),
        "versions": cases.versions(),
        "commit": cases.git_commit(),
        "settings": settings,
        "notes": [],
    }
    print("measuring the machine's matmul peak and copy bandwidth ...", flush=True)
    results["peak_gflops"] = cases.matmul_peak()
    results["copy_gbps"] = cases.copy_bandwidth()
    if "inference" in args.sections:
        results["inference"] = inference_section(settings, args.peers, results)
    if "training" in args.sections:
        results["training"] = training_section(settings, args.peers, not args.no_memory, results)
    if "features" in args.sections:
        results["features"] = features_section(settings, not args.no_memory, results)
    if "operator" in args.sections:
        results["operator"] = operator_section(settings, results)
    # The peak again at the end: the higher of the two is the ceiling (load only lowers it).
    again = cases.matmul_peak()
    results["peak_gflops_start"] = dict(results["peak_gflops"])
    results["peak_gflops_end"] = dict(again)
    results["peak_gflops"] = {k: max(v, again[k]) for k, v in results["peak_gflops"].items()}
    for row in results.get("inference", []):
        for stats in row["peers"].values():
            stats["utilisation"] = stats["gflops"] / results["peak_gflops"][row["dtype"]]
    results["machine"]["load_average_end"] = os.getloadavg()
    results["wall_seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The plot first, so that the report can say why it is missing.
    if results.get("features") and not write_plot(results, out / "scaling.png"):
        results["notes"].append("scaling.png not written: matplotlib is not installed "
                                "(pip install 'winattn[bench]')")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = write_markdown(results, out / "results.md")
    print(markdown)
    return 0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def inference_section(settings: dict, peer_names: list[str], results: dict) -> list[dict]:
    rows = []
    for variant in settings["models"]:
        peers, notes = cases.build_peers(variant, peer_names)
        results["notes"] += [f"{variant}: {name} {why}" for name, why in notes.items()]
        size = cases.image_size(variant)
        for batch in settings["batches"]:
            x = torch.randn(batch, 3, size, size)
            # Counted on timm's model: plain aten ops that the counter knows (winattn's fused
            # oneDNN calls are invisible to it); the nominal work is the same for every peer.
            timm_model = peers["timm"].model
            flops = cases.count_flops(lambda: timm_model(x))
            for dtype in settings["dtypes"]:
                _log(f"inference {variant} batch {batch} {dtype}")
                parity = cases.check_parity(variant, peers, x, dtype)
                fns = {name: (lambda p=p: p.logits(x)) for name, p in peers.items()}
                with torch.no_grad(), cases.autocast_context(dtype):
                    times = cases.time_interleaved(fns, settings["warmup"], settings["repeats"])
                summary = cases.summarise(times)
                for stats in summary.values():
                    stats["gflops"] = flops / (stats["median_ms"] / 1e3) / 1e9
                    stats["utilisation"] = stats["gflops"] / results["peak_gflops"][dtype]
                rows.append(dict(model=variant, batch=batch, dtype=dtype, flops=flops,
                                 size=size, parity=parity, peers=summary))
        del peers
    return rows


def training_section(settings: dict, peer_names: list[str], memory: bool, results: dict) -> list[dict]:
    """One step (forward, backward, AdamW) at batch 8, drop path off so that the peers run the
    same function (loss and gradients checked first); activation memory from autograd's saved
    tensors, peak RSS per fresh process (on this process's thread count)."""
    rows = []
    variant = settings["models"][0]
    batch = 8
    size = cases.image_size(variant)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    for dtype in settings["train_dtypes"]:
        peers, _ = cases.build_peers(variant, [p for p in peer_names if p == "timm"])
        _log(f"training {variant} batch {batch} {dtype}")
        summary, parity = cases.time_training_steps(
            peers, x, target, dtype, settings["warmup"], settings["train_repeats"])
        for name, stats in summary.items():
            if memory:
                _log(f"  peak RSS of a training process: {name}")
                stats["memory"] = bench_memory.measure_memory(dict(
                    variant=variant, peer=name, mode="train", batch=batch, dtype=dtype, steps=2))
        rows.append(dict(model=variant, batch=batch, dtype=dtype, size=size, parity=parity,
                         peers=summary))
        del peers
    return rows


def features_section(settings: dict, memory: bool, results: dict) -> list[dict]:
    """forward_features at growing resolution, batch 1, float32: time and memory vs pixels.

    Where the feature maps are not multiples of the window (512, 1024), timm pads after the
    cyclic shift while winattn (like torchvision and Hugging Face) pads before it, so the two
    compute different functions there; the agreement is then recorded, not required.
    """
    rows = []
    v1 = [m for m in settings["models"] if m in cases.VARIANTS]
    if not v1:
        results["notes"].append("features: no Swin V1 model among the models; section skipped")
        return rows
    variant = v1[0]
    for res in settings["resolutions"]:
        _log(f"features {variant} {res}x{res}")
        peers, _ = cases.build_peers(variant, ["timm"], img_size=res)
        x = torch.randn(1, 3, res, res)
        with torch.no_grad():
            ours = peers["winattn"].features(x)
            theirs = peers["timm"].features(x)
            err = (ours - theirs).abs().max().item()
        comparable = all((res // 4 // 2**i) % 7 == 0 for i in range(4))
        if comparable and err > 1e-4:
            raise AssertionError(f"features at {res} disagree with timm: {err}")
        fns = {n: (lambda p=p: p.features(x)) for n, p in peers.items()}
        with torch.no_grad():
            times = cases.time_interleaved(fns, settings["warmup"], settings["repeats"])
        summary = cases.summarise(times)
        if memory:
            for name, stats in summary.items():
                stats["memory"] = bench_memory.measure_memory(dict(
                    variant=variant, peer=name, mode="features", batch=1, dtype="fp32",
                    img_size=res, resolution=res))
        rows.append(dict(model=variant, resolution=res, pixels=res * res, max_abs_diff=err,
                         same_function=comparable, peers=summary))
        del peers
    return rows


# --------------------------------------------------------------------------- operator
def _peer_window_path(qkv: torch.Tensor, bias: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """The peers' attention path on a fused ``(B, H, W, 3, heads, d)`` qkv: roll, partition,
    matmul, softmax, reverse, roll back (timm's code, mask built as timm builds it)."""
    batch, height, width, _, heads, head_dim = qkv.shape
    tokens = window * window
    x = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
    x = x.view(batch, height // window, window, width // window, window, 3, heads, head_dim)
    x = x.permute(0, 1, 3, 2, 4, 5, 6, 7).reshape(-1, tokens, 3, heads, head_dim)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d)
    attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    mask = _timm_shift_mask(height, width, window, shift, attn.dtype)  # (nW, N, N)
    num_windows = mask.shape[0]
    attn = attn.view(-1, num_windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, heads, tokens, tokens).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(-1, window, window, heads * head_dim)
    out = out.view(batch, height // window, width // window, window, window, -1)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, heads, head_dim)
    return torch.roll(out, shifts=(shift, shift), dims=(1, 2))


_MASKS: dict = {}


def _timm_shift_mask(height: int, width: int, window: int, shift: int, dtype: torch.dtype) -> torch.Tensor:
    key = (height, width, window, shift, dtype)
    if key not in _MASKS:
        img = torch.zeros(1, height, width, 1)
        cnt = 0
        for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                img[:, h, w, :] = cnt
                cnt += 1
        win = img.view(1, height // window, window, width // window, window, 1)
        win = win.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
        diff = win.unsqueeze(1) - win.unsqueeze(2)
        _MASKS[key] = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0).to(dtype)
    return _MASKS[key]


def _dense_mask(height: int, width: int, window: int, shift: int, bias: torch.Tensor) -> torch.Tensor:
    """``(heads, L, L)`` additive mask for SDPA over the whole grid: -inf outside the window,
    -100 across shift regions, the bias inside."""
    from ..ops.backends.reference import token_geometry

    window_id, inner, region = token_geometry((height, width), (window, window), (shift, shift))
    mask = bias[:, inner[:, None], inner[None, :]].clone()  # (heads, L, L)
    mask += (region[:, None] != region[None, :]).to(mask.dtype) * -100.0
    return mask.masked_fill(window_id[:, None] != window_id[None, :], float("-inf"))


#: The window-order rows: the stage-internal attention call plus the one row gather that each
#: block pays to move its tokens from the previous block's window order (plain <-> shifted).
WINDOW_ORDER = "winattn window-order + block gather"
WINDOW_ORDER_MATMULS = "winattn window-order + block gather, matmuls"


def operator_calls(batch: int, side: int, heads: int, head_dim: int, window: int, shift: int,
                   dtype: torch.dtype, seed: int = 0) -> dict[str, tuple[Callable, Callable]]:
    """The operator section's calls on one random input: name -> (call, to_grid), where
    ``to_grid`` turns the call's output into the grid layout ``(B, H, W, heads, d)`` of the
    peers' path, for the check before timing.

    The window-order rows charge what a Swin block runs: one gather of the block's tokens
    ``(B, L, heads * d)`` from the plain windows' order to the shifted ones'
    (:func:`~winattn.ops.geometry.move_tokens`), then attention on q, k, v already in window
    order (the qkv projection, not timed here, sits between the two), the mask expanded to the
    batch beforehand as the block's eval cache keeps it (compact where winattn's CPU kernel
    serves). The grid-layout ``winattn`` row folds and expands its mask on its first call and
    keeps it while the bias stays the same
    (:class:`~winattn.ops.backends.sdpa.CallMaskCache`).
    """
    from ..ops import plan_windows, window_attention
    from ..ops.backends.sdpa import (
        attend_qkv,
        combine_mask,
        expand_to_batch,
        explicit_attention,
        mask_rows,
    )
    from ..ops.geometry import move_tokens

    gen = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    qkv = torch.randn(batch, side, side, 3, heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.unbind(3)
    bias = (torch.randn(heads, window**2, window**2, generator=gen) * 0.5).to(dtype)
    plain = plan_windows((side, side), (window, window), (0, 0))
    plan = plan_windows((side, side), (window, window), (shift, shift))
    # The block's input, left in the previous (plain) block's window order.
    tokens = torch.randn(batch, side * side, channels, generator=gen).to(dtype)  # (B, L, C)
    in_windows = plan.partition(qkv.view(batch, side, side, -1))  # (B, nW, N, 3*C)
    per_window = in_windows.view(-1, window**2, 3, heads, head_dim)  # (B*nW, N, 3, heads, d)
    q_w, k_w, v_w = per_window.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d)
    folded = combine_mask(plan.mask_as(dtype), bias, dtype)
    # As a block's eval mask cache holds it between calls: compact where winattn's CPU kernel
    # serves, else expanded to the batch for SDPA.
    kept = expand_to_batch(folded, mask_rows(q_w, k_w, v_w, batch * plan.num_windows,
                                              plan.num_windows))
    dense = _dense_mask(side, side, window, shift, bias.float()).to(dtype).unsqueeze(0)
    qd, kd, vd = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    grid_shape = (batch, side, side, heads, head_dim)

    def from_windows(out: torch.Tensor) -> torch.Tensor:  # (B*nW, N, heads, d) -> grid
        return plan.reverse(out.reshape(batch, plan.num_windows, -1, channels)).view(grid_shape)

    def window_order() -> torch.Tensor:
        move_tokens(tokens, plain, plan)  # (B, L, C) plain -> shifted order
        return attend_qkv(q_w, k_w, v_w, kept, head_dim**-0.5)

    calls = {
        "winattn": (lambda: window_attention(q, k, v, window, shift_size=shift, bias=bias),
                    lambda out: out),
        WINDOW_ORDER: (window_order, from_windows),
        "roll/partition/matmul": (lambda: _peer_window_path(qkv, bias, window, shift),
                                  lambda out: out),
        "SDPA dense mask": (
            lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dense),
            lambda out: out.transpose(1, 2).reshape(grid_shape),
        ),
    }
    if dtype == torch.bfloat16:
        # What the bf16 stages call instead of SDPA (float32 mask, softmax in float32).
        folded32 = combine_mask(plan.mask_as(torch.float32), bias, torch.float32)

        def window_order_matmuls() -> torch.Tensor:
            move_tokens(tokens, plain, plan)
            return explicit_attention(q_w, k_w, v_w, folded32, head_dim**-0.5)

        calls[WINDOW_ORDER_MATMULS] = (window_order_matmuls, from_windows)
    return calls


def check_operator(calls: dict[str, tuple[Callable, Callable]], dtype: torch.dtype,
                   label: str) -> dict[str, float]:
    """Every call's output, in grid order, against the peers' path before anything is timed:
    max |difference| within 1e-4 (float32) or 5e-2 (bf16). Returns the differences; raises
    AssertionError naming the call that is off."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        fn, to_grid = calls["roll/partition/matmul"]
        ref = to_grid(fn()).float()
        errors = {}
        for name, (fn, to_grid) in calls.items():
            if name == "roll/partition/matmul":
                continue
            out = to_grid(fn()).float()
            if out.shape != ref.shape:
                raise AssertionError(f"operator {label}: {name} gives {tuple(out.shape)}, "
                                     f"the peers' path {tuple(ref.shape)}")
            errors[name] = (out - ref).abs().max().item()
            if errors[name] > tol:
                raise AssertionError(f"operator {label}: {name} off by {errors[name]} (> {tol})")
    return errors


def operator_section(settings: dict, results: dict) -> list[dict]:
    """The attention alone at Swin-T's stage-1 and stage-3 shapes (shifted windows, bias),
    every path checked against the peers' before timing (:func:`check_operator`)."""
    rows = []
    batch, window, shift, head_dim = 8, 7, 3, 32
    for stage, side, heads in (("stage 1", 56, 3), ("stage 3", 14, 12)):
        for dtype_name in settings["dtypes"]:
            dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
            _log(f"operator {stage} {dtype_name}")
            calls = operator_calls(batch, side, heads, head_dim, window, shift, dtype)
            errors = check_operator(calls, dtype, f"{stage} {dtype_name}")
            fns = {name: fn for name, (fn, _) in calls.items()}
            with torch.no_grad():
                times = cases.time_interleaved(fns, settings["warmup"], settings["repeats"])
            summary = cases.summarise(times)
            flops = 4 * batch * side * side * window**2 * heads * head_dim
            dense_flops = 4 * batch * (side * side) ** 2 * heads * head_dim
            for name, stats in summary.items():
                work = dense_flops if name == "SDPA dense mask" else flops
                stats["gflops"] = work / (stats["median_ms"] / 1e3) / 1e9
                stats["max_abs_diff"] = errors.get(name, 0.0)
            rows.append(dict(stage=stage, dtype=dtype_name, shape=[batch, side, side, heads, head_dim],
                             window=window, shift=shift, flops=flops, peers=summary))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="winattn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
