"""The ``winattn`` command on bad input: every refusal names the argument (or file), the value
received and what was expected, and none of them is a traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _winattn_train_stub as stub
import pytest
import torch
from PIL import Image

import winattn
from winattn.cli.main import build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"
DEMO = "swin_demo_patch2_window4_16"
FAST = ["--img-size", "16", "--batch-size", "8", "--no-progress", "--max-steps-per-epoch", "2",
        "--epochs", "1"]


def _create_model(name, **kwargs):
    """The stub for ``tiny_test``, the real registry for every other name."""
    if name == "tiny_test":
        return stub.create_model(name, **kwargs)
    return winattn.create_model(name, **kwargs)


@pytest.fixture(autouse=True)
def _stub_model(monkeypatch):
    from winattn.train import build

    monkeypatch.setattr(build, "create_model", _create_model)


def _folder(root: Path, classes=("a", "b", "c"), count=8) -> Path:
    for k, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (40 * k + 3 * i, 200 - 50 * k, 30)).save(
                root / "train" / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny_test run on a 3-class folder: ``run/last.pt``, ``run/data``."""
    from winattn.train import build

    root = tmp_path_factory.mktemp("run")
    data = _folder(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "create_model", _create_model)
        assert main(["train", "--model", "tiny_test", "--data", str(data), "--out",
                     str(root / "out"), "--val-fraction", "0.25", *FAST]) == 0
    return root


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (24, 18), (120, 60, 200)).save(path)
    return path


def _parse_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- 1: unreadable checkpoints -------------------------------------------------------------------
def _bad_checkpoints(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    bad = {"junk": b"junk\n", "truncated-5000": data[:5000], "truncated-half": data[: len(data)
                                                                                  // 2]}
    paths = {}
    for name, content in bad.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    # A training checkpoint cut down to its format tag (edited or mixed up by hand).
    paths["no-fields"] = folder / "no-fields.pt"
    torch.save({"format": "winattn-train", "version": 1}, paths["no-fields"])
    return paths


@pytest.mark.parametrize("command", ["eval", "predict", "export", "resume"])
def test_unreadable_checkpoints_are_errors_naming_the_file(command, run, tmp_path, capsys):
    # eval/predict/export/--resume used to torch.load on their own: a traceback, or a bare
    # KeyError printed as 'error: 174812789'.
    img = _image(tmp_path)
    for kind, path in _bad_checkpoints(run / "out" / "last.pt", tmp_path).items():
        if command == "eval":
            args = ["eval", str(path)]
        elif command == "predict":
            args = ["predict", str(img), "--checkpoint", str(path)]
        elif command == "export":
            args = ["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.onnx")]
        else:
            args = ["train", "--model", "tiny_test", "--data", str(run / "data"), "--out",
                    str(tmp_path / "r"), "--val-fraction", "0.25", *FAST, "--resume", str(path)]
        assert main(args) == 2, kind
        err = capsys.readouterr().err
        assert f"winattn {args[0]}: error: checkpoint" in err, (kind, err)
        assert str(path) in err, (kind, err)
    assert not (tmp_path / "m.onnx").exists()


# ---- 2, 9: which weights -------------------------------------------------------------------------
def test_predict_refuses_to_run_on_random_weights(tmp_path, capsys):
    assert main(["predict", str(_image(tmp_path)), "--model", "tiny_test"]) == 2
    err = capsys.readouterr().err
    assert "pass --checkpoint PATH or --pretrained" in err


def test_pretrained_and_checkpoint_together_are_refused(run, tmp_path, capsys):
    assert main(["predict", str(_image(tmp_path)), "--model", "tiny_test", "--pretrained",
                 "--checkpoint", str(run / "out" / "last.pt")]) == 2
    assert "--pretrained and --checkpoint" in capsys.readouterr().err


def test_pretrained_offline_says_what_to_pass_in_cli_terms(tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode, not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert main(["predict", str(_image(tmp_path)), "--model", "swin_tiny_patch4_window7_224",
                 "--pretrained"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained: the published weights of swin_tiny_patch4_window7_224" in err
    assert "--checkpoint PATH" in err and "checkpoint=PATH" not in err
    assert "LocalEntryNotFoundError" in err


# ---- 4: non-finite numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("option, value, expected", [
    ("--lr", "inf", "a finite number > 0"),
    ("--lr", "nan", "a finite number > 0"),
    ("--min-lr", "inf", "a finite number >= 0"),
    ("--weight-decay", "nan", "a finite number >= 0"),
    ("--warmup-epochs", "inf", "a finite number >= 0"),
    ("--clip-grad", "nan", "a finite number >= 0"),
    ("--label-smoothing", "nan", "a number in [0, 1)"),
    ("--mixup", "inf", "a finite number >= 0"),
    ("--ema-decay", "1", "a number in [0, 1)"),
    ("--val-fraction", "0", "a number in (0, 1)"),
])
def test_non_finite_and_out_of_range_numbers_are_refused_by_the_parser(option, value, expected,
                                                                        capsys):
    err = _parse_error(["train", "--model", "tiny_test", option, value], capsys)
    assert f"argument {option}: expected {expected}, got {value!r}" in err


def test_eval_val_fraction_zero_is_refused_not_replaced(run, capsys):
    err = _parse_error(["eval", str(run / "out" / "last.pt"), "--val-fraction", "0"], capsys)
    assert "--val-fraction: expected a number in (0, 1), got '0'" in err
    # The Python entry point: 0 used to be replaced by the checkpoint's own fraction.
    from winattn.cli.commands import run_eval
    from winattn.data.folder import DataError

    with pytest.raises(DataError, match=r"val_fraction: expected a number in \(0, 1\), got 0"):
        run_eval(str(run / "out" / "last.pt"), val_fraction=0.0, out=str(run / "ev"))


def test_min_lr_above_lr_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "tiny_test", "--out", str(tmp_path / "r"), "--lr", "1e-4",
                 "--min-lr", "1e-3"]) == 2
    assert "min_lr: expected a number <= lr (0.0001)" in capsys.readouterr().err


# ---- 6: devices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["train", "--model", "tiny_test"], ["eval", "x.pt"],
                                     ["predict", "x.png", "--checkpoint", "x.pt"]])
def test_device_names_are_checked_by_the_parser(command, capsys):
    err = _parse_error([*command, "--device", "gpu"], capsys)
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_cuda_without_a_gpu_is_an_error_in_every_command(command, run, tmp_path, capsys):
    ckpt = str(run / "out" / "last.pt")
    args = {"train": ["train", "--model", "tiny_test", "--out", str(tmp_path / "r")],
            "eval": ["eval", ckpt],
            "predict": ["predict", str(_image(tmp_path)), "--checkpoint", ckpt]}[command]
    assert main([*args, "--device", "cuda"]) == 2
    assert "device: got 'cuda' but no CUDA device is available" in capsys.readouterr().err


def test_resolve_device_names_what_this_machine_has():
    from winattn.train.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="device: "):
        resolve_device(f"cuda:{count}")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


# ---- 7: class count from the checkpoint ----------------------------------------------------------
def test_a_converted_checkpoint_with_its_own_class_count_predicts_and_evaluates(tmp_path,
                                                                                 capsys):
    # A 3-class demo Swin: convert its training checkpoint, then predict/eval with --model.
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["train", "--model", DEMO, "--data", str(data), "--out", str(out),
                 "--val-fraction", "0.25", *FAST]) == 0
    converted = tmp_path / "x.safetensors"
    assert main(["convert", str(out / "last.pt"), str(converted)]) == 0
    img = data / "train" / "b" / "3.png"
    capsys.readouterr()
    assert main(["predict", str(img), "--model", DEMO, "--checkpoint", str(converted),
                 "--json", "--topk", "3"]) == 0
    foreign = json.loads(capsys.readouterr().out)
    assert [t["class"] for t in foreign["top"]] == [f"class_{t['index']}" for t in foreign["top"]]
    assert main(["predict", str(img), "--checkpoint", str(out / "last.pt"), "--json",
                 "--topk", "3"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in foreign["top"]] == [t["index"] for t in ours["top"]]
    for a, b in zip(foreign["top"], ours["top"]):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6)
    assert main(["eval", str(converted), "--model", DEMO, "--data", str(data / "train"),
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["images"] == 24


# ---- 8: export --out -----------------------------------------------------------------------------
def test_export_out_is_checked_before_exporting(run, tmp_path, monkeypatch, capsys):
    (tmp_path / "folder").mkdir()
    err = _parse_error(["export", "--model", "tiny_test", "--out", str(tmp_path / "folder")],
                       capsys)
    assert f"--out: expected a file name, got {str(tmp_path / 'folder')!r}, which is a folder" \
        in err
    (tmp_path / "file").write_text("")
    err = _parse_error(["export", "--model", "tiny_test", "--out",
                        str(tmp_path / "file" / "m.onnx")], capsys)
    assert "--out: expected a file in a folder" in err and "which is a file" in err

    written = []

    def fake_export(model, path, **kwargs):
        assert Path(path).parent.is_dir()  # created before the (long) export starts
        Path(path).write_bytes(b"onnx")
        written.append(Path(path))
        return str(path)

    monkeypatch.setattr(winattn, "export_onnx", fake_export)
    target = tmp_path / "nodir" / "sub" / "m.onnx"
    assert main(["export", "--checkpoint", str(run / "out" / "last.pt"), "--out",
                 str(target)]) == 0
    assert written == [target]
    assert "the checkpoint's weights" in capsys.readouterr().out


# ---- 10: messages that name the argument ---------------------------------------------------------
def test_non_utf8_csv_names_the_file_and_the_option(tmp_path, capsys):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"\xff\xfebad,0\n")
    assert main(["train", "--model", "tiny_test", "--data", str(bad), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"data: CSV file {str(bad)!r} is not UTF-8 text (byte 0xff at offset 0)" in err


@pytest.mark.parametrize("command", ["info", "train"])
def test_img_size_below_one_patch_names_the_option_and_the_smallest_size(command, tmp_path,
                                                                         capsys):
    args = (["info", DEMO, "--img-size", "1"] if command == "info" else
            ["train", "--model", DEMO, "--img-size", "1", "--out", str(tmp_path / "r")])
    assert main(args) == 2
    assert "--img-size: expected at least 2 (one 2x2 patch of swin_demo_patch2_window4_16), " \
           "got 1" in capsys.readouterr().err


# ---- 11: one class -------------------------------------------------------------------------------
def test_one_class_is_refused(tmp_path, capsys):
    data = _folder(tmp_path / "one", classes=("only",))
    assert main(["train", "--model", "tiny_test", "--data", str(data), "--out",
                 str(tmp_path / "r"), *FAST]) == 2
    assert "has 1 class (only); a classifier needs at least 2 classes" in capsys.readouterr().err


# ---- 12: the skipped-files warning ---------------------------------------------------------------
def test_skipped_files_are_reported_once(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "train" / "a" / "junk.png").write_bytes(b"not an image")
    code = (f"from winattn.data import scan_image_folder; "
            f"scan_image_folder({str(data / 'train')!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1"),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped 1 unreadable or non-image file(s)") == 1, done.stderr


# ---- 13: --help ----------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["train", "demo", "eval", "predict", "export"])
def test_help_describes_every_option_and_its_default(command):
    parser = _subparsers(build_parser())[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        takes_value = action.nargs != 0 and not isinstance(
            action, argparse.BooleanOptionalAction)
        if takes_value and action.default is not None and not action.required:
            assert "default" in action.help or "%(default)" in action.help or isinstance(
                parser.formatter_class, type) and issubclass(
                parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), \
                f"{command} {action.option_strings[0]}: no default in its help"
    if command == "export":
        assert "EMA" in text and "docs/export.md" in text
