"""Local-attention family: each pattern's fast path vs the naive masked-dense computation.

The naive computation is what a researcher writes by hand: one ``(L, L)`` mask over the whole
grid (built once, outside the timing) and ``F.scaled_dot_product_attention`` over all tokens.
Sizes are chosen so that dense still fits in memory. Prints a Markdown table (median ms, ratio,
achieved GFLOP/s of the useful work against the measured matmul peak) and writes JSON with the
machine, load, library versions and commit.

    PYTHONPATH=src python benchmarks/bench_family.py --threads 2 --json family_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import winattn  # noqa: E402
from winattn.cli.argtypes import non_negative_int, positive_int  # noqa: E402
from winattn.ops.backends.reference import token_geometry  # noqa: E402
from winattn.ops.family_reference import neighborhood_1d  # noqa: E402
from winattn.ops.geometry import SHIFT_REGION_PENALTY  # noqa: E402


@dataclass
class Case:
    pattern: str
    shape: str
    fast: Callable[[], torch.Tensor]
    dense: Callable[[], torch.Tensor]
    useful_flops: float  # 4 * B * heads * sum over queries of keys seen * head_dim


def timed_pair(
    fast: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor], warmup: int, repeat: int
) -> tuple[float, float]:
    """Median wall times (ms) of two functions, run alternately so that both see the same
    background load (the machine is shared)."""
    for _ in range(warmup):
        fast()
        dense()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, bucket in ((fast, times[0]), (dense, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def timed(fn: Callable[[], torch.Tensor], warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def with_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` followed by a backward pass of an all-ones upstream gradient."""

    def run() -> torch.Tensor:
        out = fn()
        out.backward(torch.ones_like(out))
        return out

    return run


def matmul_peak_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    ms = timed(lambda: a @ b, 2, 10)
    return 2 * 1024**3 / (ms * 1e-3) / 1e9


def copy_bandwidth_gbs() -> float:
    a = torch.randn(32 * 2**20 // 4)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 2, 10)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def dense_masked(q, k, v, allowed: torch.Tensor, additive: torch.Tensor | None = None):
    """The naive computation: all tokens, one (L, L) mask (bool, or additive float)."""
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]

    def flat(t):
        return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)

    mask = allowed if additive is None else additive
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape)


def neighbourhood_mask(grid, kernel, dilation, causal) -> torch.Tensor:
    allowed = torch.ones((), dtype=torch.bool)
    ndim = len(grid)
    for axis, (n, kk, d, c) in enumerate(zip(grid, kernel, dilation, causal)):
        rel = torch.zeros(n, n, dtype=torch.bool)
        for i, keys in enumerate(neighborhood_1d(n, kk, d, c)):
            rel[i, keys] = True
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = n, n
        allowed = allowed & rel.view(shape)
    tokens = math.prod(grid)
    return allowed.reshape(tokens, tokens)


def window_additive_mask(grid, window, shift) -> torch.Tensor:
    window_id, _, region = token_geometry(grid, window, shift)
    additive = (region[:, None] != region[None, :]).float() * SHIFT_REGION_PENALTY
    return additive.masked_fill(window_id[:, None] != window_id[None, :], float("-inf"))


def build_cases(batch: int, heads: int, head_dim: int, grad: bool = False) -> list[Case]:
    def qkv(*grid, b=batch, h=heads):
        return [torch.randn(b, *grid, h, head_dim, requires_grad=grad) for _ in range(3)]

    cases = []

    def add(pattern, shape, fast, dense, keys_per_query, q):
        tokens = math.prod(q.shape[1:-2])
        flops = 4 * q.shape[0] * q.shape[-2] * tokens * keys_per_query * head_dim
        cases.append(Case(pattern, shape, fast, dense, flops))

    # Neighbourhood attention (NAT), 2-D, and dilated (DiNAT).
    for dilation in (1, 4):
        q, k, v = qkv(56, 56)
        mask = neighbourhood_mask((56, 56), (7, 7), (dilation, dilation), (False, False))
        add(
            "neighborhood 2-D" + (f" dilation {dilation}" if dilation > 1 else ""),
            f"B{batch} 56x56 h{heads} d{head_dim} k7",
            lambda q=q, k=k, v=v, d=dilation: winattn.neighborhood_attention(
                q, k, v, 7, dilation=d
            ),
            lambda q=q, k=k, v=v, m=mask: dense_masked(q, k, v, m),
            49,
            q,
        )
    # Neighbourhood attention 3-D.
    q, k, v = qkv(8, 28, 28, b=1)
    mask = neighbourhood_mask((8, 28, 28), (3, 7, 7), (1, 1, 1), (False,) * 3)
    add(
        "neighborhood 3-D",
        f"B1 8x28x28 h{heads} d{head_dim} k(3,7,7)",
        lambda q=q, k=k, v=v: winattn.neighborhood_attention(q, k, v, (3, 7, 7)),
        lambda q=q, k=k, v=v, m=mask: dense_masked(q, k, v, m),
        147,
        q,
    )
    # Causal sliding window with sinks over a sequence, and causal blocks.
    length, window, sinks = 4096, 255, 4
    q, k, v = qkv(length, b=1)
    allowed = neighbourhood_mask((length,), (window,), (1,), (True,))
    allowed[:, :sinks] |= torch.ones(length, sinks, dtype=torch.bool).tril()
    add(
        "sequence sliding causal + 4 sinks",
        f"B1 L{length} h{heads} d{head_dim} w{window}",
        lambda q=q, k=k, v=v, w=window: winattn.sequence_window_attention(
            q, k, v, w, is_causal=True, num_sink_tokens=sinks
        ),
        lambda q=q, k=k, v=v, m=allowed: dense_masked(q, k, v, m),
        0,  # counted from the mask below
        q,
    )
    cases[-1].useful_flops = 4 * heads * head_dim * float(allowed.sum())
    block = 256
    blocks = torch.arange(length) // block
    allowed_blocked = (blocks[:, None] == blocks[None, :]) & torch.ones(
        length, length, dtype=torch.bool
    ).tril()
    add(
        "sequence blocked causal",
        f"B1 L{length} h{heads} d{head_dim} w{block}",
        lambda q=q, k=k, v=v: winattn.sequence_window_attention(
            q, k, v, block, mode="blocked", is_causal=True
        ),
        lambda q=q, k=k, v=v, m=allowed_blocked: dense_masked(q, k, v, m),
        0,
        q,
    )
    cases[-1].useful_flops = 4 * heads * head_dim * float(allowed_blocked.sum())
    # CSWin stripes.
    q, k, v = qkv(56, 56)
    cols = (torch.arange(56).repeat(56) // 7)[:, None]
    rows = (torch.arange(56).repeat_interleave(56) // 7)[:, None]
    half = heads // 2
    stripes = torch.stack(
        [cols == cols.T] * half + [rows == rows.T] * (heads - half)
    )  # (heads, L, L)
    add(
        "cross-shaped stripes (CSWin)",
        f"B{batch} 56x56 h{heads} d{head_dim} sw7",
        lambda q=q, k=k, v=v: winattn.cross_shaped_window_attention(q, k, v, 7),
        lambda q=q, k=k, v=v, m=stripes: dense_masked(q, k, v, m),
        7 * 56,
        q,
    )
    # Video Swin 3-D shifted windows.
    grid, window, shift = (8, 28, 28), (8, 7, 7), (4, 3, 3)
    q, k, v = qkv(*grid, b=1)
    additive = window_additive_mask(grid, window, shift)
    add(
        "3-D shifted windows (Video Swin)",
        f"B1 8x28x28 h{heads} d{head_dim} w(8,7,7) s(4,3,3)",
        lambda q=q, k=k, v=v: winattn.window_attention(q, k, v, window, shift_size=shift),
        lambda q=q, k=k, v=v, m=additive: dense_masked(q, k, v, None, m),
        392,
        q,
    )
    # Windows plus 16 global tokens (HiLo-style pooled keys).
    q, k, v = qkv(56, 56)
    gk, gv = (torch.randn(batch, 64, heads, head_dim, requires_grad=grad) for _ in range(2))
    additive = window_additive_mask((56, 56), (7, 7), (3, 3))
    additive = torch.cat([additive, torch.zeros(56 * 56, 64)], dim=1)
    add(
        "shifted windows + 64 global tokens",
        f"B{batch} 56x56 h{heads} d{head_dim} w7 s3 G64",
        lambda q=q, k=k, v=v: winattn.window_attention_with_globals(
            q, k, v, 7, gk, gv, shift_size=3
        ),
        lambda q=q, k=k, v=v, m=additive: _dense_with_globals(q, k, v, gk, gv, m),
        49 + 64,
        q,
    )
    return cases


def _dense_with_globals(q, k, v, gk, gv, additive):
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    keys = torch.cat([k.reshape(batch, -1, heads, head_dim), gk], 1).transpose(1, 2)
    values = torch.cat([v.reshape(batch, -1, heads, head_dim), gv], 1).transpose(1, 2)
    queries = q.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=additive)
    return out.transpose(1, 2).reshape(q.shape)


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "winattn": winattn.__version__,
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=32)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--repeat", type=positive_int, default=7)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    peak, bandwidth = matmul_peak_gflops(), copy_bandwidth_gbs()
    rows = []
    with torch.set_grad_enabled(args.backward):
        for case in build_cases(args.batch, args.heads, args.head_dim, args.backward):
            fast = case.fast().detach()
            dense = case.dense().detach()
            if args.backward:
                case.fast, case.dense = with_backward(case.fast), with_backward(case.dense)
                case.useful_flops *= 3  # backward: about twice the forward's matmul work
            max_diff = (fast - dense).abs().max().item()
            fast_ms, dense_ms = timed_pair(case.fast, case.dense, args.warmup, args.repeat)
            rows.append(
                {
                    "pattern": case.pattern,
                    "shape": case.shape,
                    "fast_ms": fast_ms,
                    "dense_ms": dense_ms,
                    "speedup": dense_ms / fast_ms,
                    "fast_gflops": case.useful_flops / (fast_ms * 1e-3) / 1e9,
                    "max_abs_diff": max_diff,
                }
            )
            print(f"done: {case.pattern}", file=sys.stderr)
    info = machine_info(args.threads)
    info["load_average"] = load_before
    info["load_average_after"] = os.getloadavg()
    info["matmul_peak_gflops"] = peak
    info["copy_bandwidth_gbs"] = bandwidth
    print(
        f"Machine: {info['cpu']}, {args.threads} threads, torch {info['torch']}, commit "
        f"{info['commit']}; load average before/after "
        f"{'/'.join(f'{x:.1f}' for x in info['load_average'])} / "
        f"{'/'.join(f'{x:.1f}' for x in info['load_average_after'])}; matmul peak "
        f"{peak:.0f} GFLOP/s, copy {bandwidth:.1f} GB/s. float32, "
        f"{'forward + backward' if args.backward else 'forward only, no grad'}.\n"
    )
    print(
        "| pattern | shape | fast (ms) | dense masked (ms) | speed-up | fast GFLOP/s (useful) "
        "| max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['pattern']} | {r['shape']} | {r['fast_ms']:.1f} | {r['dense_ms']:.1f} | "
            f"{r['speedup']:.1f}x | {r['fast_gflops']:.1f} ({100 * r['fast_gflops'] / peak:.0f}%"
            f" of peak) | {r['max_abs_diff']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
