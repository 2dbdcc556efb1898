"""The ``winattn`` command: train/eval/predict end to end, argument errors, signals and kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _winattn_train_stub as stub
import pytest
import torch
from PIL import Image

from winattn.cli.main import main
from winattn.data import imagenet_class_names
from winattn.train.report import read_metrics
from winattn.train.state import load_train_checkpoint

STUB = Path(stub.__file__)
SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--model", "tiny_test", "--img-size", "16", "--batch-size", "16", "--no-progress",
        "--max-steps-per-epoch", "3"]


@pytest.fixture(autouse=True)
def _stub_model(monkeypatch):
    from winattn.train import build

    monkeypatch.setattr(build, "create_model", stub.create_model)


def _fruit_folder(root: Path) -> Path:
    """Two visually obvious classes in train/ and val/."""
    colors = {"apple": (220, 20, 20), "banana": (240, 230, 30)}
    for split, count in (("train", 24), ("val", 6)):
        for name, rgb in colors.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                jitter = tuple(max(0, c - 3 * i) for c in rgb)
                Image.new("RGB", (20, 20), jitter).save(root / split / name / f"{i}.png")
    return root


def test_train_eval_predict_on_an_image_folder(tmp_path, capsys):
    data = _fruit_folder(tmp_path / "fruit")
    out = tmp_path / "run"
    rc = main(["train", *FAST, "--data", str(data), "--out", str(out), "--epochs", "4",
               "--lr", "0.05", "--augment", "none", "--max-steps-per-epoch", "100"])
    assert rc == 0
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]

    # eval on the checkpoint's own validation split reproduces the training log's figure
    capsys.readouterr()
    assert main(["eval", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert summary["images"] == 12
    assert summary["top1"] == pytest.approx(rows[-1]["val_top1"])
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 0
    assert "top-1" in capsys.readouterr().out
    # ... and so does pointing it at the plain <class>/<images> folder of the same images
    assert main(["eval", str(out / "last.pt"), "--data", str(data / "val"),
                 "--out", str(tmp_path / "ev2")]) == 0
    again = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert again["images"] == 12 and again["top1"] == pytest.approx(summary["top1"])
    capsys.readouterr()

    # predict prints the class names stored in the checkpoint
    banana = data / "val" / "banana" / "0.png"
    assert main(["predict", str(banana), "--checkpoint", str(out / "last.pt"),
                 "--json", "--topk", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert {t["class"] for t in result["top"]} == {"apple", "banana"}
    assert sum(t["prob"] for t in result["top"]) == pytest.approx(1.0, abs=1e-5)

    # a bad file among the images: reported, the others still predicted, exit status 1
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 10)
    assert main(["predict", str(junk), str(banana), "--checkpoint", str(out / "last.pt")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{junk}: error: cannot read image")
    assert lines[1].startswith(f"{banana}: ")


def test_predict_foreign_imagenet_checkpoint_uses_imagenet_names(tmp_path, capsys):
    torch.manual_seed(0)
    model = stub.TinyNet(num_classes=1000, img_size=16)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    img = tmp_path / "x.png"
    Image.new("L", (30, 30), 128).save(img)
    assert main(["predict", str(img), "--model", "tiny_test", "--checkpoint",
                 str(tmp_path / "plain.pth"), "--json", "--topk", "3"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    names = imagenet_class_names()
    assert [t["class"] for t in top] == [names[t["index"]] for t in top]
    # ... and the ranking is the model's own
    x = torch.full((1, 3, 16, 16), (128 / 255 - 0.5) / 0.5)
    expect = model.eval()(x).topk(3).indices[0].tolist()
    assert [t["index"] for t in top] == expect


def test_foreign_checkpoint_without_model_name_is_refused(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    assert main(["predict", str(tmp_path / "plain.pth"), "--checkpoint",
                 str(tmp_path / "plain.pth")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), "--epochs", "1", "--val-fraction",
                 "0.05"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "last.pt"), "--model", "swin_tiny_patch4_window7_224"]) == 2
    err = capsys.readouterr().err
    assert "'swin_tiny_patch4_window7_224' given" in err and "'tiny_test'" in err
    # resuming a run with a different model name
    ckpt = load_train_checkpoint(out / "last.pt")
    ckpt["config"]["model"] = ckpt["model_name"] = "other_model"
    torch.save(ckpt, out / "last.pt")
    assert main(["train", *FAST, "--out", str(out), "--epochs", "1", "--val-fraction", "0.05",
                 "--resume"]) == 2
    assert "--model: checkpoint 'other_model', given 'tiny_test'" in capsys.readouterr().err


def test_bad_arguments_name_the_argument_and_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "tiny_test", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs: expected a positive integer, got '0'" in capsys.readouterr().err
    assert main(["train", *FAST, "--data", str(tmp_path / "nowhere")]) == 2
    assert f"data: {str(tmp_path / 'nowhere')!r} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", *FAST, "--data", str(tmp_path / "empty")]) == 2
    assert "no 'train' sub-folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", *FAST, "--out", str(tmp_path / "r"), "--lr", "-1"])
    assert exc.value.code == 2
    assert "--lr: expected a finite number > 0, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["bench", "--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    (["bench", "--threads", "-1"], "--threads: expected a positive integer, got '-1'"),
    (["bench", "--repeats", "many"], "--repeats: expected a positive integer, got 'many'"),
    (["train", "--model", "tiny_test", "--workers", "-1"],
     "--workers: expected an integer >= 0, got '-1'"),
])
def test_counts_out_of_range_are_refused_before_anything_runs(args, message, capsys):
    # bench used to start a run with --repeats 0 (no timed call, medians of nothing) or
    # --threads 0; the parser now stops with the argument, the value and what it expects.
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench"], ["demo"], ["eval", "x.pt"],
                                     ["train", "--model", "tiny_test"]])
def test_an_output_folder_that_is_a_file_is_refused_before_the_run(command, tmp_path, capsys):
    # bench used to run its whole set (minutes) and only then fail to make the folder.
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out, expected in ((taken, f"got {str(taken)!r}, which is a file"),
                          (taken / "sub", f"inside the file {str(taken)!r}")):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--out: expected a folder (it may not exist yet)" in err and expected in err


def test_train_config_refuses_an_output_folder_that_is_a_file(tmp_path):
    from winattn.train.config import TrainConfig

    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="out: expected a folder .*which is a file"):
        TrainConfig(model="tiny_test", out=str(tmp_path / "taken")).validate()
    TrainConfig(model="tiny_test", out=str(tmp_path / "new" / "run")).validate()


def test_benchmark_scripts_refuse_counts_out_of_range():
    script = SRC.parent / "benchmarks" / "replay_ops.py"
    done = subprocess.run([sys.executable, str(script), "--replays", "0"],
                          env=dict(os.environ, PYTHONPATH=str(SRC)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--replays: expected a positive integer, got '0'" in done.stderr


# ---- signals and kills (subprocesses) -----------------------------------------------------------
def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC), **extra)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.1)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(STUB), "train", *FAST, "--out", str(out), "--epochs", "1000",
         "--max-steps-per-epoch", "5", "--val-fraction", "0.05"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "checkpoint saved to" in stderr and "--resume" in stderr
    ckpt = load_train_checkpoint(out / "last.pt")
    assert ckpt["epoch"] >= 1 and ckpt["global_step"] == 5 * ckpt["epoch"] + ckpt[
        "step_in_epoch"]
    assert ckpt["global_step"] > 0


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_and_resume_works(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "writing"
    args = [sys.executable, str(STUB), "train", *FAST, "--out", str(out), "--epochs", "3",
            "--val-fraction", "0.05"]
    proc = subprocess.Popen(args, env=_env(WINATTN_STUB_HANG_ON="last.pt:2",
                                           WINATTN_STUB_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob(".last.pt.tmp-*")), "the kill should have hit a half-written temp file"
    ckpt = load_train_checkpoint(out / "last.pt")  # the epoch-1 checkpoint, intact
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0

    done = subprocess.run([*args, "--resume"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    final = load_train_checkpoint(out / "last.pt")
    assert final["epoch"] == 3 and final["global_step"] == 9
    assert not list(out.glob(".last.pt.tmp-*"))
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
