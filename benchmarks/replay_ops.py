"""Where a Swin pass spends its time, op by op, without torch.profiler: every aten op the pass
dispatches is recorded (a ``TorchDispatchMode``), then each is run again alone on fresh tensors
of the same shapes, strides and dtypes, best of ``--replays``. Set against the pass's own
measured time (median; the libraries taking turns), the sum of those isolated times separates
what the ops cost from what the pass pays around them: caches refilled between ops, page
faults of fresh buffers, Python and dispatch between calls ("around the ops" below).
winattn and timm (and torchvision) on the same weights and inputs, in one process.

Why not the profiler: on this 2-core host it slowed a Swin-T bf16 training forward and
backward from 0.47 to 0.8 s, and single ops inside it by up to 13x (a float32 softmax of Swin-T
stage 1 ran 1.7 ms alone and averaged 28 ms under the profiler), unevenly, so its split misled.

Each call is also timed where it runs in the recorded pass (the recording slows the pass
between calls, not inside them), so the table shows per op what the pass makes it cost against
what it costs alone. The isolated times are a floor: each replay finds its inputs in cache.
View ops (no kernel) are recorded but not timed. Inference runs the model in eval mode
without gradients; ``forward`` and ``backward`` are the two halves of a training step (train
mode, cross entropy on random labels); bf16 is CPU autocast, as ``winattn bench`` runs it.

    PYTHONPATH=src python benchmarks/replay_ops.py --phase backward --dtype bf16 [--by-shape]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from winattn.cli.argtypes import positive_int
from winattn.cli.bench_cases import (
    autocast_context,
    build_peers,
    git_commit,
    image_size,
    machine_info,
    time_interleaved,
    versions,
)

#: Ops that only make views or read metadata: recorded, counted, never timed.
VIEW_OPS = frozenset({
    "aten.alias", "aten.as_strided", "aten.detach", "aten.expand", "aten.permute",
    "aten.select", "aten.slice", "aten.split", "aten.squeeze", "aten.t", "aten.transpose",
    "aten.unbind", "aten.unsqueeze", "aten.view", "aten._unsafe_view", "aten.promote_types",
})
#: Ops grouped as "matmul" unless --by-shape: the linears and batched matmuls of either library.
MATMUL_OPS = frozenset({
    "aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.matmul", "aten.linear",
    "mkldnn._linear_pointwise",
})


class TensorSpec:
    """A recorded tensor argument: shape, strides, dtype and storage offset."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.dtype = tuple(t.shape), t.dtype
        # oneDNN's opaque tensors (the bf16 weights fused.py reorders once) have no strides to
        # copy; the replay reuses them, as the model does on every call.
        self.opaque = t if t.is_mkldnn else None
        if self.opaque is None:
            self.stride, self.offset = t.stride(), t.storage_offset()

    def make(self) -> torch.Tensor:
        """A fresh tensor laid out as the recorded one (random floats, zero integers and
        booleans, so that recorded indices stay in range); an opaque one as recorded."""
        if self.opaque is not None:
            return self.opaque
        extent = 1 + self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        if 0 in self.shape:
            extent = 1 + self.offset
        if self.dtype.is_floating_point:
            base = torch.rand(extent, dtype=self.dtype)
        else:
            base = torch.zeros(extent, dtype=self.dtype)
        return base.as_strided(self.shape, self.stride, self.offset)

    def __repr__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}{list(self.shape)}"


Call = tuple[object, tuple, dict, float]


class Recorder(TorchDispatchMode):
    """Records ``(op, args, kwargs, seconds)`` of each aten call, tensors as
    :class:`TensorSpec`, ``seconds`` the call's own time where it ran in the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        spec = lambda a: TensorSpec(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        self.calls.append((func, tree_map(spec, args), tree_map(spec, kwargs), seconds))
        return out


def record(fn: Callable[[], object]) -> list[Call]:
    """The aten calls ``fn`` makes on this thread (the CPU autograd engine's backward included
    when ``fn`` calls ``backward``)."""
    recorder = Recorder()
    with recorder:
        fn()
    return recorder.calls


def op_name(func: object) -> str:
    return str(getattr(func, "overloadpacket", func))


Timed = tuple[str, str, float, float]


def replay(calls: list[Call], replays: int = 3) -> list[Timed]:
    """``(op, first tensor argument, seconds in the pass, best seconds alone)`` for each
    recorded call that is not a view, run again alone on fresh tensors; a call that cannot be
    rebuilt raises."""
    make = lambda a: a.make() if isinstance(a, TensorSpec) else a  # noqa: E731
    timed = []
    for func, args, kwargs, in_pass in calls:
        name = op_name(func)
        if name in VIEW_OPS:
            continue
        real_args, real_kwargs = tree_map(make, args), tree_map(make, kwargs)
        best = float("inf")
        for _ in range(replays):
            start = time.perf_counter()
            func(*real_args, **real_kwargs)
            best = min(best, time.perf_counter() - start)
        first = next((a for a in args if isinstance(a, TensorSpec)), "")
        timed.append((name, repr(first), in_pass, best))
    return timed


def group(timed: list[Timed], by_shape: bool) -> dict[str, tuple[float, float, int]]:
    """Milliseconds in the pass, milliseconds alone and calls, per op kind (matmuls
    together), or per op and first input."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, first, in_pass, alone in timed:
        key = f"{name} {first}" if by_shape else ("matmul" if name in MATMUL_OPS else name)
        totals[key][0] += in_pass * 1e3
        totals[key][1] += alone * 1e3
        totals[key][2] += 1
    return {key: tuple(values) for key, values in totals.items()}


def _pass(peer, x, y, phase: str, dtype: str):
    """(prepare, timed): ``timed()`` runs the pass to measure, after ``prepare()``."""
    state: dict[str, torch.Tensor] = {}

    def forward():
        with autocast_context(dtype):
            state["loss"] = F.cross_entropy(peer.logits(x).float(), y)

    def backward():
        state.pop("loss").backward()
        peer.model.zero_grad(set_to_none=True)

    if phase == "inference":
        peer.model.eval()

        def infer():
            with torch.no_grad(), autocast_context(dtype):
                peer.logits(x)

        return (lambda: None), infer
    peer.model.train()
    if phase == "forward":
        return (lambda: None), forward
    return forward, backward


def measure(passes: dict[str, tuple[Callable, Callable]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each library's timed pass (its ``prepare`` untimed before it),
    the libraries taking turns as ``winattn bench`` times them, after two warm-up rounds."""
    times = time_interleaved(
        {name: timed for name, (_, timed) in passes.items()},
        warmup=2,
        repeats=repeats,
        setup={name: prepare for name, (prepare, _) in passes.items()},
    )
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--peers", nargs="+", default=["timm"], choices=["timm", "torchvision"])
    parser.add_argument("--phase", choices=["inference", "forward", "backward"],
                        default="backward")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed passes (median)")
    parser.add_argument("--replays", type=positive_int, default=3,
                        help="runs of each op alone (best)")
    parser.add_argument("--by-shape", action="store_true", help="one row per op and input")
    parser.add_argument("--top", type=positive_int, default=25, help="rows shown")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    peers, notes = build_peers(args.model, args.peers)
    side = image_size(args.model)
    x = torch.randn(args.batch, 3, side, side)
    y = torch.randint(0, 1000, (args.batch,))
    passes = {name: _pass(peer, x, y, args.phase, args.dtype) for name, peer in peers.items()}
    measured = measure(passes, args.repeats)
    results = {}
    for name, (prepare, timed) in passes.items():
        prepare()
        calls = record(timed)
        by_kind = group(replay(calls, args.replays), args.by_shape)
        results[name] = (measured[name], len(calls), by_kind)

    names = list(results)
    machine = machine_info()
    print(f"\n{args.model}, {args.phase}, {args.dtype}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, ISA "
          f"{', '.join(machine['isa'])}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v))
    print(f"commit: {git_commit()}")
    for peer, note in notes.items():
        print(f"note: {peer}: {note}")
    in_pass = {n: sum(v[0] for v in results[n][2].values()) for n in names}
    alone = {n: sum(v[1] for v in results[n][2].values()) for n in names}

    def row(label: str, values: dict[str, float], fmt: str = "{:.1f}") -> None:
        print(f"| {label} | " + " | ".join(fmt.format(values[n]) for n in names) + " |")

    print("\n| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    row("measured pass, ms (median)", {n: results[n][0] for n in names})
    row("ops in the recorded pass, ms", in_pass)
    row("ops alone, ms (sum of best)", alone)
    row("around the ops, ms (measured - alone)", {n: results[n][0] - alone[n] for n in names})
    row("aten calls (views included)", {n: results[n][1] for n in names}, "{}")
    keys = sorted({k for n in names for k in results[n][2]},
                  key=lambda k: -max(results[n][2].get(k, (0.0, 0.0, 0))[0] for n in names))
    print("\nms in the pass / ms alone (calls)\n")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys[: args.top]:
        cells = []
        for n in names:
            ms_pass, ms_alone, count = results[n][2].get(key, (0.0, 0.0, 0))
            cells.append(f"{ms_pass:.1f} / {ms_alone:.1f} ({count})" if count else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
