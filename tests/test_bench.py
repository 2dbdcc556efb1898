"""The benchmark's own pieces compute what they claim (no timing here)."""

from __future__ import annotations

import json

import pytest
import torch

from winattn import window_attention
from winattn.cli.bench import _dense_mask, _peer_window_path
from winattn.cli.bench_cases import matmul_peak, summarise, time_interleaved


def test_peer_path_and_dense_mask_compute_the_operator():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 14, 21, 3, 2, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, 49, 49, generator=gen, dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    want = window_attention(q, k, v, 7, shift_size=3, bias=bias, backend="reference")
    torch.testing.assert_close(_peer_window_path(qkv, bias, 7, 3), want)
    qd, kd, vd = (t.reshape(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(
        qd, kd, vd, attn_mask=_dense_mask(14, 21, 7, 3, bias).unsqueeze(0)
    )
    torch.testing.assert_close(dense.transpose(1, 2).reshape(want.shape), want)


def test_summary_ratios_are_peer_over_winattn():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "wpq"}
    times = time_interleaved(fns, 1, 3)
    # every round each function once; three functions: the balanced design's six rows, the
    # warm-up round on its first
    assert calls == list("wpq" "wpq" "pqw" "qwp" "qpw" "wqp" "pwq")
    summary = summarise({"winattn": [1.0, 2.0, 3.0], "peer": [4.0, 4.0, 6.0]})
    assert summary["peer"]["speedup_of_winattn"] == 2.0
    assert summary["winattn"]["median_ms"] == 2000.0
    assert [len(times[name]) for name in "wpq"] == [6, 6, 6]


def test_round_ratios_pair_each_round():
    """The per-round ratios pair the libraries' times round by round, so a round in which the
    host ran slow for both leaves them where they were; the report shows their quartiles."""
    from winattn.cli.bench_report import format_ratio

    # the host halves its speed in rounds 3 and 4; within every round the peer takes 2x
    # (2.5x in the last)
    summary = summarise({"winattn": [1.0, 1.0, 2.0, 2.0], "peer": [2.0, 2.0, 4.0, 5.0]})
    assert summary["peer"]["round_ratios"] == pytest.approx([2.0, 2.0, 2.125])
    assert summary["peer"]["speedup_of_winattn"] == pytest.approx(3.0 / 1.5)
    assert format_ratio(summary["peer"]) == "2.00x (rounds 2.00, 2.00-2.12)"
    assert format_ratio(summary["winattn"]) == "1.00x"
    # results recorded before the quartiles were kept
    assert format_ratio({"speedup_of_winattn": 1.5}) == "1.50x"
    with pytest.raises(ValueError):
        summarise({"winattn": [1.0, 2.0], "peer": [1.0]})


def test_report_says_when_the_host_speed_moved():
    from winattn.cli.bench_report import peak_drift

    steady = {"peak_gflops_start": {"fp32": 400.0, "bf16": 2500.0},
              "peak_gflops_end": {"fp32": 380.0, "bf16": 2600.0}}
    assert peak_drift(steady) is None
    moved = {"peak_gflops_start": {"fp32": 400.0, "bf16": 2500.0},
             "peak_gflops_end": {"fp32": 260.0, "bf16": 2450.0}}
    line = peak_drift(moved)
    assert "fp32 400 -> 260 GFLOP/s (-35%)" in line and "bf16 2500 -> 2450" in line
    assert peak_drift({"peak_gflops": {"fp32": 1.0, "bf16": 1.0}}) is None  # older runs


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_interleaved_order_is_balanced_for_carry_over(count):
    """Within the rounds, every function follows every other one equally often and each
    stands first equally often (a rotation of a fixed order gave winattn the same neighbour
    7 of 9 times); repeats not a whole number of cycles are rounded up to one."""
    from collections import Counter

    from winattn.cli.bench_cases import balanced_order

    design = len(balanced_order(count))
    assert design == (count if count % 2 == 0 else 2 * count)
    names = [f"f{i}" for i in range(count)]
    for repeats in (design, 2 * design, design - 1):
        calls = []
        fns = {name: (lambda n=name: calls.append(n)) for name in names}
        times = time_interleaved(fns, 2, repeats)
        cycles = -(-repeats // design)
        assert all(len(times[name]) == cycles * design for name in names)
        rounds = [calls[i:i + count] for i in range(0, len(calls), count)]
        first_row = [names[i] for i in balanced_order(count)[0]]
        assert rounds[0] == rounds[1] == rounds[2] == first_row  # warm-up, then the design
        timed = rounds[2:]
        assert all(sorted(r) == names for r in timed)
        pairs = Counter((a, b) for r in timed for a, b in zip(r, r[1:]))
        assert len(pairs) == count * (count - 1) and len(set(pairs.values())) == 1
        first = Counter(r[0] for r in timed)
        assert set(first) == set(names) and len(set(first.values())) == 1


def test_matmul_peak_is_the_faster_of_the_measured_paths():
    peaks = matmul_peak(size=64, repeats=1)
    for dtype in ("fp32", "bf16"):
        paths = [value for key, value in peaks.items() if key.startswith(f"{dtype}_")]
        assert f"{dtype}_blas" in peaks and paths
        assert peaks[dtype] == max(paths) > 0


def test_gpu_swin_benchmark_runs_its_cpu_dry_run(tmp_path):
    """bench_gpu_swin.py can only be timed on a GPU; its dry run keeps the script working."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("timm")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "swin.json"
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_gpu_swin.py"), "--device", "cpu",
         "--smoke", "--models", "swin_tiny_patch4_window7_224", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["entry"] for r in rows] == ["winattn-fused", "winattn-window-order", "timm"]
    assert all(r["infer_img_s"] > 0 and r["train_img_s"] > 0 for r in rows)
    assert "| winattn-fused |" in done.stdout


def test_v2_peers_have_live_post_norms_and_pass_the_parity_check():
    """``winattn bench --models swinv2_...``: timm's and torchvision's zero-initialised post-norms
    are randomised (else every block is the identity and the parity check could not see a
    wrong attention), winattn holds timm's weights, and the check agrees in both dtypes."""
    import pytest

    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    from winattn.cli.bench_cases import build_peers, check_parity, image_size

    variant = "swinv2_tiny_window8_256"
    peers, notes = build_peers(variant, ["timm", "torchvision", "transformers"])
    assert set(peers) == {"winattn", "timm", "torchvision"} and "transformers" in notes
    for name in ("timm", "torchvision"):
        norms = [p for n, p in peers[name].model.named_parameters() if "norm1.weight" in n]
        assert norms and all(p.abs().min() > 0.5 for p in norms), name
    assert image_size(variant) == 256
    x = torch.randn(1, 3, 256, 256)
    for dtype in ("fp32", "bf16"):
        report = check_parity(variant, peers, x, dtype)
        assert all(r["checked"] and r["ok"] for r in report.values())


def test_operator_backward_benchmark_checks_both_paths_against_float64():
    """benchmarks/bench_op_backward.py's gradient check, at its stage-3 shape: winattn's
    window-order call and the peers' roll/partition path give the float64 gradients of q, k, v
    and the bias (float32 within 1e-4 of the largest; bf16 autocast by STYLE's rule, which
    the check raises on)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "bench_op_backward", root / "benchmarks" / "bench_op_backward.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ours = "winattn window-order + block gather"
    for dtype in ("fp32", "bf16"):
        errors = module._check(14, 12, dtype, module._calls(14, 12, dtype))
        assert set(errors) == {ours, "roll/partition/matmul"}
        if dtype == "fp32":
            assert max(errors.values()) < 1e-5
        else:
            assert 0 < errors[ours] < 0.05
    # The timed call includes the block's token gather (B*L, C) and its backward's inverse
    # gather: what the model pays per block in place of the peers' roll/partition/reverse.
    qkv, bias, grad = module._inputs(14, 12, torch.float32)
    _, run, _ = module._calls(14, 12, "fp32")[ours](qkv, bias, grad)
    shapes = _index_select_inputs(run)
    assert shapes.count((module.BATCH * 14 * 14, 12 * module.HEAD_DIM)) == 2


def _index_select_inputs(fn) -> list[tuple[int, ...]]:
    """The input shapes of every ``aten.index_select`` that ``fn()`` runs (backward too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index_select.default:
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_rows_are_checked_against_the_peers_path(dtype):
    """``winattn bench``'s operator section: every row, the window-order ones included (after
    reversing to grid order), must match the peers' roll/partition path before timing, and
    the window-order rows charge the block's token gather."""
    from winattn.cli.bench import WINDOW_ORDER, WINDOW_ORDER_MATMULS, check_operator, operator_calls

    calls = operator_calls(1, 14, 2, 8, 7, 3, dtype)
    errors = check_operator(calls, dtype, "test")
    window_rows = {WINDOW_ORDER} | ({WINDOW_ORDER_MATMULS} if dtype == torch.bfloat16 else set())
    assert set(errors) == {"winattn", "SDPA dense mask"} | window_rows
    for name in window_rows:
        assert _index_select_inputs(calls[name][0]) == [(14 * 14, 2 * 8)]  # (B*L, C), once
    fn, to_grid = calls[WINDOW_ORDER]
    calls[WINDOW_ORDER] = (lambda: fn().flip(1), to_grid)  # tokens of each window reversed
    with pytest.raises(AssertionError, match="window-order"):
        check_operator(calls, dtype, "test")


def test_training_check_compares_gradients_with_grad_on():
    """The training section's check runs the step's own code (winattn's autograd Functions
    run only with gradients on) and compares the loss and gradients: a backward that is off
    while the forward is right must stop it, in float32 and in bf16."""
    pytest.importorskip("timm")
    from winattn.cli.bench_cases import build_peers, check_training_parity

    torch.manual_seed(0)
    peers, _ = build_peers("swin_tiny_patch4_window7_224", ["timm"])
    x, target = torch.randn(1, 3, 224, 224), torch.tensor([3])
    for dtype in ("fp32", "bf16"):
        with torch.no_grad():  # the check turns gradients on itself
            report = check_training_parity(peers, x, target, dtype)
        assert report["ok"] and len(report["checked"]) == 5
        assert "layers.0.blocks.1.attn.relative_position_bias_table" in report["checked"]
    assert all(p.grad is None for p in peers["winattn"].model.parameters())
    qkv = dict(peers["winattn"].model.named_parameters())["layers.2.blocks.1.attn.qkv.weight"]
    hook = qkv.register_hook(lambda g: g * 1.1)  # same forward, wrong gradient
    try:
        for dtype in ("fp32", "bf16"):
            with pytest.raises(AssertionError, match="layers.2.blocks.1.attn.qkv.weight"):
                check_training_parity(peers, x, target, dtype)
    finally:
        hook.remove()


def test_memory_peak_is_the_runs_not_the_building(monkeypatch):
    """A memory worker builds two models and drops one: the peak it reports is reset after
    that, so it is the run's own; where the reset is unavailable and the run stays under the
    building peak, nothing is reported. The worker runs on the thread count it is given."""
    import mmap
    import os

    from winattn.cli import bench_cases, bench_memory

    big, small = 256, 48  # MiB

    def touch(mib: int) -> None:
        """Map ``mib`` fresh pages, write each (so they count in the RSS), unmap them."""
        with mmap.mmap(-1, mib * 2**20) as pages:
            for offset in range(0, mib * 2**20, mmap.PAGESIZE):
                pages[offset] = 1

    def fake_build(variant, peers, img_size=None, drop_path=0.0):
        touch(big)  # the two models' building peak
        model = torch.nn.Linear(2, 2)
        feats = lambda x: touch(small)  # noqa: E731
        return {name: bench_cases.Peer(name, model, model, feats)
                for name in ("winattn", "timm")}, {}

    threads = []
    monkeypatch.setattr(bench_cases, "build_peers", fake_build)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    spec = dict(variant="swin_tiny_patch4_window7_224", peer="winattn", mode="features",
                batch=1, dtype="fp32", resolution=8, threads=1)
    result = bench_memory.run_worker(spec)
    assert threads == [1]
    if os.access("/proc/self/clear_refs", os.W_OK):  # Linux
        assert result["peak_reset"]
    if result["peak_reset"]:
        assert small * 0.9 < result["peak_over_baseline_mib"] < big * 0.9
    monkeypatch.setattr(bench_memory, "reset_peak_rss", lambda: False)
    result = bench_memory.run_worker(spec)
    assert result["peak_rss_mib"] is None and "not_measured" in result

    seen = {}

    class Done:
        returncode, stdout = 0, "{}"

    def fake_run(cmd, **kwargs):
        seen.update(json.loads(cmd[-1]))
        return Done()

    monkeypatch.setattr(bench_memory.subprocess, "run", fake_run)
    bench_memory.measure_memory({k: v for k, v in spec.items() if k != "threads"})
    assert seen["threads"] == torch.get_num_threads()


def test_malloc_ablation_alternates_libraries_and_reports_per_round_ratios(monkeypatch, capsys):
    """benchmarks/ablate_malloc.py: each round runs every (library, variant) process, the
    libraries alternating and the order reversed every other round (ABBA), and the ratios
    are also given as the median of the ratios within each round."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "ablate_malloc", root / "benchmarks" / "ablate_malloc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    order = [("winattn", "default"), ("timm", "default"), ("winattn", "tuned"), ("timm", "tuned")]
    assert module.schedule(["winattn", "timm"], 3) == [order, order[::-1], order]

    ran = []
    step_ms = {"winattn": [100.0, 50.0, 100.0], "timm": [110.0, 200.0, 300.0]}

    def fake_run(spec):
        rounds_done = sum(1 for lib, var in ran if (lib, var) == (spec["library"], spec["variant"]))
        ran.append((spec["library"], spec["variant"]))
        return {"malloc": spec["variant"], "step_ms": step_ms[spec["library"]][rounds_done],
                "peak_over_baseline_mib": None}

    monkeypatch.setattr(module, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["ablate_malloc.py", "--dtype", "fp32", "--rounds", "3"])
    module.main()
    assert ran == order + order[::-1] + order
    out = capsys.readouterr().out
    # timm / winattn per round 1.1, 4.0, 3.0: median of the ratios 3.00x; of the medians 2.00x
    assert "| default: timm / winattn | 2.00x | 3.00x | 1.10, 4.00, 3.00 |" in out


def test_op_replay_records_each_kernel_and_rebuilds_its_inputs():
    """benchmarks/replay_ops.py: the dispatch recorder sees every aten call of a pass (the
    autograd engine's backward included), views are counted but not timed, and each replayed
    call gets fresh tensors laid out as the recorded ones (strides and offset included)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "replay_ops", root / "benchmarks" / "replay_ops.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    a = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(5, 8)
    strided = torch.randn(4, 10)[:, 2:7]  # offset 2, non-contiguous
    calls = module.record(lambda: (a @ b.t()).relu().sum().backward())
    names = [module.op_name(func) for func, _, _, _ in calls]
    assert "aten.mm" in names and "aten.threshold_backward" in names  # forward and backward
    spec_ = module.TensorSpec(strided)
    rebuilt = spec_.make()
    assert (rebuilt.shape, rebuilt.stride(), rebuilt.storage_offset()) == ((4, 5), (10, 1), 2)
    assert module.TensorSpec(torch.zeros(3, dtype=torch.long)).make().dtype == torch.long

    timed = module.replay(calls, replays=1)
    assert len(timed) == sum(name not in module.VIEW_OPS for name in names)
    assert all(in_pass > 0 and alone > 0 for _, _, in_pass, alone in timed)
    by_kind = module.group(timed, by_shape=False)
    assert by_kind["matmul"][2] == names.count("aten.mm")
    by_shape = module.group(timed, by_shape=True)
    assert any(key.startswith("aten.mm float32[6, 8]") for key in by_shape)


def test_report_shows_unmeasured_memory_as_a_dash(tmp_path):
    """``winattn bench --no-memory`` leaves the RSS cells empty: "-", never "nan"."""
    from winattn.cli.bench_report import write_markdown

    def peer(ms, memory):
        return {"median_ms": ms, "speedup_of_winattn": 1.0, "activation_mib": 10.0,
                "memory": memory}

    results = {
        "machine": {"cpu_model": "cpu", "logical_cpus": 2, "torch_threads": 2, "isa": [],
                    "load_average": (0.0, 0.0, 0.0)},
        "versions": {"torch": torch.__version__}, "commit": "abc", "command": "bench",
        "preset": "default", "peak_gflops": {"fp32": 1.0, "bf16": 1.0}, "copy_gbps": 1.0,
        "training": [
            {"model": "swin_tiny_patch4_window7_224", "dtype": "fp32",
             "peers": {"winattn": peer(10.0, {}),
                       "timm": peer(20.0, {"peak_rss_mib": 1500.4,
                                           "peak_over_baseline_mib": 700.6})}},
        ],
    }
    text = write_markdown(results, tmp_path / "results.md")
    rows = [line for line in text.splitlines() if line.startswith("| Swin-T | fp32")]
    assert rows[0].endswith("| 10 | - | - |") and rows[1].endswith("| 10 | 1500 | 701 |")
    assert "nan" not in text


def test_interleaved_setup_runs_untimed_before_each_call():
    """``time_interleaved(..., setup=)``: each function's setup runs right before each of its
    calls (warm-up included) and outside the timed span (replay_ops times a backward so)."""
    import time as clock

    calls = []
    fns = {"w": lambda: calls.append("w"), "p": lambda: calls.append("p")}
    setup = {"w": lambda: (calls.append("setup w"), clock.sleep(0.05))}
    times = time_interleaved(fns, 1, 2, setup=setup)
    assert calls == ["setup w", "w", "p", "setup w", "w", "p", "p", "setup w", "w"]
    assert max(times["w"]) < 0.05


def test_bench_without_timm_says_what_to_install_before_measuring(monkeypatch, tmp_path, capsys):
    import importlib.util

    from winattn.cli import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "timm" else real(name, *a))
    # would take minutes if it went on to measure anything
    monkeypatch.setattr(bench.cases, "matmul_peak", lambda: pytest.fail("measured"))
    assert bench.main(["--sections", "inference", "operator", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "inference section(s) compare against timm, which is not installed" in err
    assert "pip install 'winattn[bench]'" in err
    assert not any(tmp_path.iterdir())
