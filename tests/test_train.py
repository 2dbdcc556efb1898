"""The training loop: optimiser groups, schedule, checkpoints, exact resume, DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import _winattn_train_stub as stub
import pytest
import torch
from torch import nn

from winattn.train import Interrupted, TrainConfig, Trainer, atomic_save, train
from winattn.train.optim import ModelEma, build_optimizer, build_scheduler, param_groups
from winattn.train.report import read_metrics
from winattn.train.state import load_train_checkpoint

STUB = Path(stub.__file__)
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _stub_model(monkeypatch):
    from winattn.train import build

    monkeypatch.setattr(build, "create_model", stub.create_model)


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(model="tiny_test", data="digits", out=str(tmp_path / name), img_size=16,
                epochs=3, batch_size=32, lr=3e-3, warmup_epochs=1.0, max_steps_per_epoch=4,
                val_fraction=0.05, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ---- optimiser pieces ---------------------------------------------------------------------------
def test_weight_decay_skips_norms_biases_and_named_tables():
    model = stub.TinyNet()
    decay, skip = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "patch.weight"]
    assert sorted(names[id(p)] for p in skip["params"]) == [
        "head.bias", "norm.bias", "norm.weight", "patch.bias", "pos_table"]
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    # cosine from 1.0 at step 2 down to 0.1 at step 10
    for step in range(2, 10):
        expect = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))
        assert lrs[step] == pytest.approx(expect)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_fused_optimizer_steps_as_the_foreach_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, lr=0.1, weight_decay=0.05)
    assert fused.defaults["fused"] is True
    foreach = torch.optim.AdamW(param_groups(twin, 0.05), lr=0.1, foreach=True)
    for _ in range(3):
        x = torch.randn(4, 6)
        for net, optimizer in ((model, fused), (twin, foreach)):
            optimizer.zero_grad(set_to_none=True)
            net(x).square().sum().backward()
            optimizer.step()
    for ours, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, reference)
    # the groups survive: decay on the matrices, none on norms and biases
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]


def test_ema_moves_towards_the_weights():
    model = nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.75)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, start + 1.0)


# ---- checkpoint files ---------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"v": 1}, path)

    def broken(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temp file left behind


def test_checkpoint_holds_what_resume_and_predict_need(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, ema_decay=0.9)
    metrics = train(cfg)
    ckpt = load_train_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "rng", "class_names",
                "model_name", "model_kwargs", "data_config", "config"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 4
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert 0.0 <= metrics["val_top1"] <= 1.0 and "val_top1_ema" in metrics
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


# ---- exact resume -------------------------------------------------------------------------------
def _weights(path):
    ckpt = load_train_checkpoint(path)
    return ckpt["model"], ckpt["ema"]


def _assert_same_run(a: Path, b: Path):
    (ma, ea), (mb, eb) = _weights(a / "last.pt"), _weights(b / "last.pt")
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
        assert torch.equal(ea[k], eb[k]), k

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]

    assert strip(read_metrics(a / "metrics.jsonl")) == strip(read_metrics(b / "metrics.jsonl"))


@pytest.mark.parametrize("stop_at_step", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, stop_at_step):
    # Augmentation, mixup, dropout and EMA all on: every random draw must replay.
    extra = dict(augment="light", mixup=0.4, ema_decay=0.8)
    train(_cfg(tmp_path, "straight", **extra))

    monkeypatch.setattr(Trainer, "_should_stop", lambda self, stop, loss: self.global_step ==
                        stop_at_step)
    with pytest.raises(Interrupted):
        train(_cfg(tmp_path, "broken", **extra))
    ckpt = load_train_checkpoint(tmp_path / "broken" / "last.pt")
    assert ckpt["global_step"] == stop_at_step
    monkeypatch.undo()
    from winattn.train import build

    monkeypatch.setattr(build, "create_model", stub.create_model)
    # Scramble the global RNG: resume must restore everything it needs.
    torch.manual_seed(12345)
    train(_cfg(tmp_path, "broken", resume="auto", **extra))
    _assert_same_run(tmp_path / "straight", tmp_path / "broken")


def test_dataloader_workers_do_not_change_the_result(tmp_path):
    extra = dict(epochs=1, augment="light", max_steps_per_epoch=2)
    train(_cfg(tmp_path, "w0", workers=0, **extra))
    train(_cfg(tmp_path, "w2", workers=2, **extra))
    a, _ = _weights(tmp_path / "w0" / "last.pt")
    b, _ = _weights(tmp_path / "w2" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_configuration(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="resume: .*best.pt.* holds weights only"):
        train(_cfg(tmp_path, epochs=1, resume=str(tmp_path / "run" / "best.pt")))
    with pytest.raises(ValueError, match="--batch-size: checkpoint 32, given 16"):
        train(_cfg(tmp_path, epochs=1, batch_size=16, resume="auto"))


def test_amp_ema_and_grad_checkpointing_run(tmp_path):
    metrics = train(_cfg(tmp_path, epochs=1, amp=True, ema_decay=0.5, grad_checkpointing=True,
                         cutmix=1.0, mixup=0.2))
    assert math.isfinite(metrics["train_loss"]) and metrics["train_top1"] is None


def test_global_batch_must_divide_over_processes(tmp_path):
    from winattn.train.distributed import DistEnv

    with pytest.raises(ValueError, match="batch_size: the global batch 30 .* 4"):
        Trainer(_cfg(tmp_path, batch_size=30), DistEnv(world_size=4))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="epochs: expected an integer >= 1, got 0"):
        TrainConfig(model="m", epochs=0).validate()
    with pytest.raises(ValueError, match="augment: expected one of"):
        TrainConfig(model="m", augment="lots").validate()


# ---- DDP ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    args = ["train", "--model", "tiny_test", "--img-size", "16", "--epochs", "2",
            "--batch-size", "32", "--max-steps-per-epoch", "3", "--augment", "none",
            "--drop-path", "0", "--lr", "3e-3", "--no-progress", "--val-fraction", "0.05"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    one = subprocess.run([sys.executable, str(STUB), *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          str(STUB), *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = _weights(tmp_path / "one" / "last.pt")
    b, _ = _weights(tmp_path / "two" / "last.pt")
    assert load_train_checkpoint(tmp_path / "two" / "last.pt")["global_step"] == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # The runs did move the weights: equality is not two untouched initialisations.
    torch.manual_seed(0)  # the runs seed this before building the model
    init = stub.TinyNet(num_classes=10, img_size=16).state_dict()
    assert not torch.allclose(a["head.weight"], init["head.weight"])
    rows_one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    rows_two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert rows_one[-1]["val_top1"] == pytest.approx(rows_two[-1]["val_top1"], abs=1e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("outcome", ["finished", "interrupted", "failed"])
def test_a_cuda_group_is_left_alone_when_one_rank_fails(tmp_path, monkeypatch, outcome, device):
    # A rank-local error must surface: destroying the group is collective under NCCL and
    # would wait there for peers stuck in a collective. A finished or interrupted run (every
    # rank at the same barrier) destroys it, and so does any CPU (gloo) run.
    from winattn.train import loop

    torn_down = []
    monkeypatch.setattr(loop, "teardown", lambda env: torn_down.append(env))
    monkeypatch.setattr(loop, "setup", lambda name: loop.DistEnv(device=torch.device(device)))

    class FakeTrainer:
        def __init__(self, cfg, env):
            pass

        def fit(self):
            if outcome == "interrupted":
                raise Interrupted(tmp_path / "last.pt")
            if outcome == "failed":
                raise RuntimeError("this rank's own failure")
            return {"val_top1": 1.0}

    monkeypatch.setattr(loop, "Trainer", FakeTrainer)
    if outcome == "finished":
        assert train(_cfg(tmp_path, "run")) == {"val_top1": 1.0}
    else:
        with pytest.raises(Interrupted if outcome == "interrupted" else RuntimeError):
            train(_cfg(tmp_path, "run"))
    assert len(torn_down) == (0 if outcome == "failed" and device == "cuda" else 1)


# ---- resume: settings, finished runs ------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(img_size=8), "--img-size: checkpoint 16, given 8"),
    (dict(lr=1e-2), "--lr: checkpoint 0.003, given 0.01"),
    (dict(max_steps_per_epoch=3), "--max-steps-per-epoch: checkpoint 4, given 3"),
    (dict(min_lr=1e-4), "--min-lr: checkpoint 1e-06, given 0.0001"),
    (dict(warmup_epochs=0.5), "--warmup-epochs: checkpoint 1.0, given 0.5"),
    (dict(augment="none", label_smoothing=0.0),
     "--label-smoothing: checkpoint 0.1, given 0.0; --augment: checkpoint 'auto', given 'none'"),
])
def test_resume_refuses_every_setting_that_changes_the_run(tmp_path, change, message):
    # A new --img-size used to continue at the new size, a new --lr was overridden by the
    # restored schedule: both silently.
    with pytest.raises(Interrupted):
        trainer = Trainer(_cfg(tmp_path), stub_env())
        trainer._should_stop = lambda stop, loss: trainer.global_step == 2
        trainer.fit()
    with pytest.raises(ValueError) as err:
        train(_cfg(tmp_path, resume="auto", **change))
    text = str(err.value)
    assert "was trained with other settings" in text and message in text, text


def stub_env():
    from winattn.train.distributed import DistEnv

    return DistEnv()


def test_resume_accepts_settings_that_cannot_change_the_result(tmp_path):
    with pytest.raises(Interrupted):
        trainer = Trainer(_cfg(tmp_path), stub_env())
        trainer._should_stop = lambda stop, loss: trainer.global_step == 2
        trainer.fit()
    train(_cfg(tmp_path, resume="auto", workers=1, progress=True, device="cpu",
               grad_checkpointing=True))
    assert load_train_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3


def test_every_setting_is_either_checked_or_free_on_resume():
    from dataclasses import fields

    from winattn.train.state import RESUME_MAY_DIFFER, RESUME_MUST_MATCH

    names = {f.name for f in fields(TrainConfig)}
    assert not set(RESUME_MUST_MATCH) & set(RESUME_MAY_DIFFER)
    assert set(RESUME_MUST_MATCH) | set(RESUME_MAY_DIFFER) == names


def test_resume_refuses_a_training_set_of_another_size(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for k, name in enumerate(("a", "b")):
        (data / "train" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (90 * k, 8 * i, 40)).save(data / "train" / name / f"{i}.png")
    cfg = dict(data=str(data), batch_size=4, epochs=2, max_steps_per_epoch=2, val_fraction=0.2)
    train(_cfg(tmp_path, **{**cfg, "epochs": 1}))
    Image.new("RGB", (16, 16)).save(data / "train" / "a" / "extra.png")
    with pytest.raises(ValueError, match="--epochs: checkpoint 1, given 2; --data train "
                                         "samples: checkpoint 16, given 17"):
        train(_cfg(tmp_path, resume="auto", **cfg))


def test_resume_of_a_finished_run_says_it_is_complete_and_writes_nothing(tmp_path, capsys):
    from winattn.cli.main import main

    train(_cfg(tmp_path, epochs=1))
    finished = tmp_path / "run" / "last.pt"
    before = finished.read_bytes()
    capsys.readouterr()
    args = ["train", "--model", "tiny_test", "--img-size", "16", "--epochs", "1",
            "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "1",
            "--max-steps-per-epoch", "4", "--val-fraction", "0.05", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "new"), "--resume", str(finished)]) == 0
    out = capsys.readouterr().out
    assert f"the run is already complete: {finished} holds all 1 epochs" in out
    assert f"nothing was written to {tmp_path / 'new'}" in out
    assert not (tmp_path / "new" / "last.pt").exists()
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert finished.read_bytes() == before


# ---- non-finite values --------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad",
                                   "mixup", "label_smoothing"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected a finite number, got {value}"):
        TrainConfig(model="m", **{field: value}).validate()


def test_config_refuses_min_lr_above_lr():
    with pytest.raises(ValueError, match=r"min_lr: expected a number <= lr \(0.001\)"):
        TrainConfig(model="m", lr=1e-3, min_lr=2e-3).validate()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from winattn.train.loop import TrainingDiverged

    trainer = Trainer(_cfg(tmp_path), stub_env())
    criterion = trainer.criterion

    def diverging(logits, targets):
        loss = criterion(logits, targets)
        return loss * math.nan if trainer.global_step == 5 else loss  # 2nd step of epoch 2

    trainer.criterion = diverging
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan at step 2 of epoch 2 "
                                               r"\(step 6 overall\)"):
        trainer.fit()
    out = tmp_path / "run"
    ckpt = load_train_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_a_diverged_run_exits_with_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    from winattn.cli.main import main
    from winattn.train import loop

    class NanLoss(nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * math.nan

    monkeypatch.setattr(loop.nn, "CrossEntropyLoss", NanLoss)
    assert main(["train", "--model", "tiny_test", "--img-size", "16", "--batch-size", "32",
                 "--max-steps-per-epoch", "2", "--epochs", "1", "--no-progress",
                 "--val-fraction", "0.05", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "training diverged: the training loss is nan at step 1 of epoch 1" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "r" / "last.pt").exists()
