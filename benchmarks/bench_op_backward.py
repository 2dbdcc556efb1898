"""The windowed-attention operator in training: forward and backward at Swin-T's stage-1 and
stage-3 shapes (batch 8, window 7, shift 3, a relative-position bias that wants a gradient),
winattn's window-order path as the Swin stages train it against the peers' roll / partition /
matmul / softmax / reverse / roll-back path under autograd. winattn's row is the one row gather
that moves a block's tokens ``(B, L, heads * d)`` from the previous block's window order to its
own (:func:`~winattn.ops.geometry.move_tokens`; its backward the inverse gather) plus the
window-order call (``attend_qkv``), forward and backward: what the model pays per block in
place of the peers' roll, partition, reverse and roll back.

Both get the gradients of q, k, v and the bias; they are checked against a float64 run of the
peers' path before anything is timed (float32: within 1e-4 of the largest gradient; bf16:
winattn's error at most twice the peers' own plus 1e-3, STYLE.md's rule). bf16 runs both under
CPU autocast, as the models train: q, k, v in bf16 (the qkv projection's output), the bias a
float32 parameter. Also printed: the bytes each keeps for backward (distinct
storages, ``saved_tensors_hooks``). Medians over interleaved repeats (the balanced order of
``winattn bench``); ratio = the peers' time over winattn's (above 1: winattn is faster).
GFLOP/s counts the useful work of the six matmuls a forward and backward need (3x the
forward's 4 * tokens * N * heads * d), whatever each path recomputes; ``--json`` writes the
rows with the machine, versions and commit.

    PYTHONPATH=src python benchmarks/bench_op_backward.py [--repeats 16] [--dtype fp32 bf16]
        [--json op-backward.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from winattn.cli import bench_cases as cases
from winattn.cli.argtypes import non_negative_int, positive_int
from winattn.cli.bench import _peer_window_path
from winattn.cli.bench_report import format_ratio
from winattn.ops import plan_windows
from winattn.ops.backends.sdpa import attend_qkv, combine_mask
from winattn.ops.geometry import move_tokens

BATCH, WINDOW, SHIFT, HEAD_DIM = 8, 7, 3, 32
STAGES = (("stage 1", 56, 3), ("stage 3", 14, 12))


def _inputs(side: int, heads: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(BATCH, side, side, 3, heads, HEAD_DIM, generator=gen).to(dtype)
    # A float32 parameter in the models, under autocast too (only the qkv projection's
    # output, which q, k, v view, is bf16 there).
    bias = torch.randn(heads, WINDOW**2, WINDOW**2, generator=gen) * 0.5
    grad = torch.randn(BATCH, side, side, heads, HEAD_DIM, generator=gen).to(dtype)
    return qkv, bias, grad


#: The window-order path as a Swin block trains it: the block's token gather, then attention.
WINDOW_ORDER = "winattn window-order + block gather"


def _calls(side: int, heads: int, dtype_name: str):
    """Each library's forward + backward on fresh leaves: returns its leaves, the call, and a
    function giving its gradients of the grid-layout qkv and of the bias."""
    plain = plan_windows((side, side), (WINDOW, WINDOW), (0, 0))
    plan = plan_windows((side, side), (WINDOW, WINDOW), (SHIFT, SHIFT))
    tokens = WINDOW**2
    channels = heads * HEAD_DIM

    def ours(qkv, bias, grad):
        # The stage keeps its tokens in window order: no gather into windows and back, but
        # each block moves its input (B, L, C) from the previous block's order (plain) to its
        # own (shifted) with one row gather, whose backward is the inverse gather. Both are
        # timed; the qkv projection between them is not (the peers' path has it too).
        in_windows = plan.partition(qkv.reshape(BATCH, side, side, -1)).detach()
        leaf_qkv = in_windows.view(-1, tokens, 3, heads, HEAD_DIM).requires_grad_()
        leaf_bias = bias.clone().requires_grad_()
        gen = torch.Generator().manual_seed(1)
        block_input = torch.randn(BATCH, side * side, channels, generator=gen)  # (B, L, C)
        leaf_tokens = block_input.to(qkv.dtype).requires_grad_()
        grad_tokens = torch.randn(BATCH, side * side, channels, generator=gen).to(qkv.dtype)
        grad_w = plan.partition(grad.reshape(BATCH, side, side, -1))
        grad_w = grad_w.view(-1, tokens, heads, HEAD_DIM)

        def run():
            with cases.autocast_context(dtype_name):
                moved = move_tokens(leaf_tokens, plain, plan)  # (B, L, C) in shifted order
                mask = combine_mask(plan.mask_as(torch.float32), leaf_bias, torch.float32)
                q, k, v = leaf_qkv.permute(2, 0, 3, 1, 4).unbind(0)
                out = attend_qkv(q, k, v, mask, HEAD_DIM**-0.5)  # (B*nW, N, heads, d)
            torch.autograd.backward([out, moved], [grad_w.to(out.dtype), grad_tokens])

        def grads():
            grid = plan.reverse(leaf_qkv.grad.reshape(BATCH, -1, 3 * heads * HEAD_DIM))
            return grid.reshape(qkv.shape), leaf_bias.grad

        return (leaf_qkv, leaf_bias, leaf_tokens), run, grads

    def peers(qkv, bias, grad):
        leaf_qkv = qkv.clone().requires_grad_()
        leaf_bias = bias.clone().requires_grad_()

        def run():
            with cases.autocast_context(dtype_name):
                out = _peer_window_path(leaf_qkv, leaf_bias, WINDOW, SHIFT)
            out.backward(grad.to(out.dtype))

        return (leaf_qkv, leaf_bias), run, lambda: (leaf_qkv.grad, leaf_bias.grad)

    return {WINDOW_ORDER: ours, "roll/partition/matmul": peers}


def _saved_bytes(run) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def _check(side: int, heads: int, dtype_name: str, calls) -> dict[str, float]:
    """Largest gradient error of each library against float64, relative to the largest
    gradient; raises where winattn breaks the tolerance rule."""
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    qkv, bias, grad = _inputs(side, heads, dtype)
    _, run, grads = _calls(side, heads, "fp32")["roll/partition/matmul"](
        qkv.double(), bias.double(), grad.double()
    )
    run()  # float64, no autocast
    want = grads()
    errors = {}
    for name, make in calls.items():
        _, run, grads = make(qkv, bias, grad)
        run()
        errors[name] = max(
            ((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads(), want)
        )
    ours, peer = errors[WINDOW_ORDER], errors["roll/partition/matmul"]
    limit = 1e-4 if dtype_name == "fp32" else 2 * peer + 1e-3
    if ours > limit:
        raise AssertionError(
            f"{dtype_name} {side}: winattn's gradient error {ours:.2e} > {limit:.2e}"
        )
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=positive_int, default=16)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--json", help="also write the rows, machine and versions here")
    args = parser.parse_args()
    machine, versions, commit = cases.machine_info(), cases.versions(), cases.git_commit()
    print(f"{machine['cpu_model']}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, commit {commit}")
    print("| stage | dtype | path | forward + backward ms | ratio | GFLOP/s "
          "| saved for backward MiB | gradient error vs float64 |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for stage, side, heads in STAGES:
        for dtype_name in args.dtype:
            dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
            calls = _calls(side, heads, dtype_name)
            errors = _check(side, heads, dtype_name, calls)
            qkv, bias, grad = _inputs(side, heads, dtype)
            runs, saved = {}, {}
            for name, make in calls.items():
                leaves, run, _ = make(qkv, bias, grad)

                def timed(run=run, leaves=leaves):
                    for leaf in leaves:
                        leaf.grad = None
                    run()

                runs[name] = timed
                saved[name] = _saved_bytes(run) / 2**20
            summary = cases.summarise(
                cases.time_interleaved(runs, args.warmup, args.repeats), ours=WINDOW_ORDER
            )
            flops = 3 * 4 * BATCH * side * side * WINDOW**2 * heads * HEAD_DIM
            for name, stats in summary.items():
                gflops = flops / (stats["median_ms"] / 1e3) / 1e9
                print(f"| {stage} ({BATCH}, {side}, {side}, {heads}, {HEAD_DIM}) | {dtype_name} | "
                      f"{name} | {stats['median_ms']:.2f} | {format_ratio(stats)} | "
                      f"{gflops:.1f} | {saved[name]:.1f} | {errors[name]:.1e} |")
                rows.append(dict(stage=stage, dtype=dtype_name, path=name, flops=flops,
                                 gflops=gflops, saved_mib=saved[name],
                                 gradient_error=errors[name], **stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, versions=versions, commit=commit,
                           threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
