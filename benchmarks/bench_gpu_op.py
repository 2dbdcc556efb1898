"""The windowed-attention op alone on a GPU: winattn's fused Triton kernel against its peers.

Peers, all on the same q, k, v (grid layout ``(B, H, W, heads, head_dim)``), bias and shift:

- ``timm-matmul``: timm's unfused path: roll, window_partition, q*scale @ k^T + bias + mask,
  softmax, @ v, window_reverse, roll back (q, k, v moved as one qkv tensor, as timm moves x).
- ``timm-sdpa``: timm's fused path: the same data movement, SDPA with the bias + shift mask
  expanded to a dense (B*nW, heads, N, N) mask.
- ``flex``: FlexAttention (compiled) on the window-ordered sequence, a block mask of
  same-window pairs and a score_mod adding bias and shift mask.
- ``winattn-sdpa``: winattn's own SDPA backend (one cached gather per tensor, SDPA, scatter).
- ``winattn-triton``: the fused kernel (grid layout in, grid layout out).

Reports median milliseconds (forward, and forward + backward), the ratio to winattn-triton,
achieved bytes/s of the floor traffic (forward: read q, k, v once, write out once; backward adds
reading out and d(out), writing dq, dk, dv) against a measured device copy bandwidth, and
achieved FLOP/s against a measured bf16 matmul rate. Prints a Markdown table and JSON.

    PYTHONPATH=src python benchmarks/bench_gpu_op.py --batch 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import winattn
from winattn.cli.argtypes import non_negative_int, positive_int
from winattn.ops import plan_windows

# Swin-T stages at 224: (name, grid, heads); head_dim 32, window 7, shift 3.
SHAPES = {
    "swin-t-stage1": ((56, 56), 3),
    "swin-t-stage3": ((14, 14), 12),
}
HEAD_DIM, WINDOW, SHIFT = 32, 7, 3


def swin_shift_mask(grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """timm's attn_mask: (nW, N, N) with -100 between shift regions, built from slices."""
    img = torch.zeros(1, *grid, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = count
            count += 1
    windows = timm_partition(img, window).view(-1, window * window)  # (nW, N)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def timm_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, w, w, C), timm's window_partition."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def timm_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B*nW, w, w, C) -> (B, H, W, C), timm's window_reverse."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def make_timm(fused: bool, bias: torch.Tensor, mask: torch.Tensor, scale: float) -> Callable:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, h, w, heads, head_dim = q.shape
        channels = heads * head_dim
        n = WINDOW * WINDOW
        qkv = torch.stack((q, k, v), dim=3).view(batch, h, w, 3 * channels)
        qkv = torch.roll(qkv, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        qkv = timm_partition(qkv, WINDOW).view(-1, n, 3, heads, head_dim)  # (B*nW, N, 3, h, d)
        qw, kw, vw = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, d)
        num_windows = mask.shape[0]
        if fused:
            attn_mask = bias + mask.view(1, num_windows, 1, n, n).expand(batch, -1, heads, -1, -1)
            out = F.scaled_dot_product_attention(
                qw, kw, vw, attn_mask=attn_mask.reshape(-1, heads, n, n), scale=scale
            )
        else:
            attn = (qw * scale) @ kw.transpose(-2, -1) + bias  # (B*nW, heads, N, N)
            attn = attn.view(-1, num_windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            out = attn.view(-1, heads, n, n).softmax(dim=-1) @ vw
        out = out.transpose(1, 2).reshape(-1, WINDOW, WINDOW, channels)
        out = timm_reverse(out, WINDOW, h, w)
        out = torch.roll(out, shifts=(SHIFT, SHIFT), dims=(1, 2))
        return out.view(batch, h, w, heads, head_dim)

    return run


def make_flex(grid: tuple[int, int], bias: torch.Tensor, scale: float, device) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    plan = plan_windows(grid, (WINDOW, WINDOW), (SHIFT, SHIFT), device)
    n, num_windows = plan.window_tokens, plan.num_windows
    region_mask = plan.mask_as(torch.float32)  # (nW, N, N): -100 between regions
    bias32 = bias.float()

    def same_window(b, h, q_idx, kv_idx):
        return q_idx // n == kv_idx // n

    def score_mod(score, b, h, q_idx, kv_idx):
        window, i, j = (q_idx // n) % num_windows, q_idx % n, kv_idx % n
        return score + bias32[h, i, j] + region_mask[window, i, j]

    compiled = torch.compile(flex_attention, fullgraph=True)
    masks: dict[int, object] = {}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
        length = batch * num_windows * n  # windows of every image on one sequence

        def to_seq(t):
            t = plan.partition(t.reshape(batch, *grid, heads * head_dim))  # (B, nW, N, C)
            return t.view(1, length, heads, head_dim).transpose(1, 2)  # (1, heads, L, d)

        if length not in masks:
            masks[length] = create_block_mask(same_window, None, None, length, length, device)
        out = compiled(to_seq(q), to_seq(k), to_seq(v), score_mod=score_mod,
                       block_mask=masks[length], scale=scale)  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, num_windows, n, heads * head_dim)
        return plan.reverse(out).view(q.shape)

    return run


def make_winattn(backend: str, bias: torch.Tensor, scale: float) -> Callable:
    def run(q, k, v):
        return winattn.window_attention(
            q, k, v, WINDOW, shift_size=SHIFT, bias=bias, scale=scale, backend=backend
        )

    return run


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device, warmup: int, repeats: int) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate(device, warmup: int, repeats: int) -> float:
    """FLOP/s of an 8192^3 bf16 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = time_ms(lambda: a @ a, warmup, repeats)
    return 2 * 8192**3 / (ms * 1e-3)


def environment(device: torch.device | None = None) -> dict:
    """Device, versions and commit (``device`` defaults to CUDA's)."""
    device = device or torch.device("cuda")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "winattn": winattn.__version__,
        "commit": commit,
    }
    for module in ("triton", "timm"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--warmup", type=non_negative_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=50)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_op.py needs a CUDA device: none is available here (nothing measured).")

    device = torch.device("cuda")
    dtype = torch.bfloat16
    scale = HEAD_DIM**-0.5
    env = environment()
    copy_bw = copy_bandwidth(device, args.warmup, args.repeats)
    mm_rate = matmul_rate(device, args.warmup, args.repeats)
    rows = []
    for shape_name in args.shapes:
        grid, heads = SHAPES[shape_name]
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch, *grid, heads, HEAD_DIM)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
        n = WINDOW * WINDOW
        bias = torch.randn(heads, n, n, generator=gen, device=device, dtype=dtype)
        mask = swin_shift_mask(grid, WINDOW, SHIFT).to(device, dtype)
        impls = {
            "timm-matmul": make_timm(False, bias, mask, scale),
            "timm-sdpa": make_timm(True, bias, mask, scale),
            "flex": make_flex(grid, bias, scale, device),
            "winattn-sdpa": make_winattn("sdpa", bias, scale),
            "winattn-triton": make_winattn("triton", bias, scale),
        }
        num_windows = math.prod(g // WINDOW for g in grid)
        element = q.element_size()
        fwd_bytes = 4 * q.numel() * element
        bwd_bytes = 8 * q.numel() * element
        fwd_flops = 4 * args.batch * num_windows * heads * n * n * HEAD_DIM
        expected = impls["winattn-sdpa"](q, k, v).float()
        results = {}
        for name, fn in impls.items():
            try:
                err = (fn(q, k, v).float() - expected).abs().max().item()
                fwd = time_ms(lambda: fn(q, k, v), args.warmup, args.repeats)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                grad = torch.randn_like(q)
                train = time_ms(
                    lambda: fn(*leaves).backward(grad), args.warmup, args.repeats
                )
                results[name] = dict(max_abs_err_vs_winattn_sdpa=err, fwd_ms=fwd, fwd_bwd_ms=train)
            except Exception as exc:  # a peer missing on this torch: say so, keep the others
                results[name] = dict(error=f"{type(exc).__name__}: {exc}")
        base = results.get("winattn-triton", {})
        for name, r in results.items():
            row = dict(shape=shape_name, impl=name, **r)
            if "fwd_ms" in r:
                row["fwd_GBps"] = fwd_bytes / (r["fwd_ms"] * 1e-3) / 1e9
                row["fwd_frac_copy_bw"] = fwd_bytes / (r["fwd_ms"] * 1e-3) / copy_bw
                row["fwd_TFLOPs"] = fwd_flops / (r["fwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_frac_copy_bw"] = (
                    (fwd_bytes + bwd_bytes) / (r["fwd_bwd_ms"] * 1e-3) / copy_bw
                )
                if "fwd_ms" in base:
                    row["fwd_vs_triton"] = r["fwd_ms"] / base["fwd_ms"]
                    row["fwd_bwd_vs_triton"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            rows.append(row)

    print(f"# bench_gpu_op: {env['device']}, batch {args.batch}, bf16, window {WINDOW}, "
          f"shift {SHIFT}, head_dim {HEAD_DIM}")  # fmt: skip
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s\n")
    header = ("shape", "impl", "fwd ms", "x triton", "fwd GB/s", "% copy bw", "fwd TFLOP/s",
              "fwd+bwd ms", "x triton", "fwd+bwd % copy bw", "max err")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['impl']} | {r['error']} |" + " |" * (len(header) - 3))
            continue
        print(
            f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r.get('fwd_vs_triton', 0):.2f} "
            f"| {r['fwd_GBps']:.0f} | {100 * r['fwd_frac_copy_bw']:.0f} | {r['fwd_TFLOPs']:.1f} "
            f"| {r['fwd_bwd_ms']:.3f} | {r.get('fwd_bwd_vs_triton', 0):.2f} "
            f"| {100 * r['fwd_bwd_frac_copy_bw']:.0f} | {r['max_abs_err_vs_winattn_sdpa']:.1e} |"
        )
    report = dict(environment=env, batch=args.batch, dtype="bfloat16", copy_bandwidth_Bps=copy_bw,
                  matmul_flops=mm_rate, rows=rows)  # fmt: skip
    print("\n" + json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
