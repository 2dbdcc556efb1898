"""The benchmark's own pieces compute what they claim (no timing here)."""

from __future__ import annotations

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
    # every round each function once, the order rotating: each follows each other one
    assert calls == list("wpq" "pqw" "qwp" "wpq")
    summary = summarise({"winattn": [1.0, 2.0, 3.0], "peer": [4.0, 4.0, 6.0]})
    assert summary["peer"]["speedup_of_winattn"] == 2.0
    assert summary["winattn"]["median_ms"] == 2000.0
    assert [len(times[name]) for name in "wpq"] == [3, 3, 3]


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
    for dtype in ("fp32", "bf16"):
        errors = module._check(14, 12, dtype, module._calls(14, 12, dtype))
        assert set(errors) == {"winattn window-order", "roll/partition/matmul"}
        if dtype == "fp32":
            assert max(errors.values()) < 1e-5
        else:
            assert 0 < errors["winattn window-order"] < 0.05


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
    assert calls == ["setup w", "w", "p", "p", "setup w", "w", "setup w", "w", "p"]
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
