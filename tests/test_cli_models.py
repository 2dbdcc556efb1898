"""The command line with the real registered models: demo, info, FLOPs, fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import winattn
from winattn.cli.commands import count_flops
from winattn.cli.demo import DEMO_MODEL
from winattn.cli.main import main
from winattn.train import TrainConfig, Trainer
from winattn.train.distributed import DistEnv
from winattn.train.report import read_metrics


def test_demo_model_is_registered():
    assert DEMO_MODEL in winattn.list_models()


def test_demo_smoke(tmp_path, capsys):
    """The demo's whole path (train, eval, save PNGs, predict) on two steps; not its accuracy."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--max-steps-per-epoch", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 1
    # The printed accuracy is the evaluation of the saved checkpoint on the held-out split.
    assert f"{100 * rows[0]['val_top1']:.2f}%" in text
    assert "359 held-out images" in text
    assert len(list((out / "samples").glob("*.png"))) == 6
    for name in ("last.pt", "curves.png", "confusion.png", "eval.json"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_demo_reaches_97_percent(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert read_metrics(out / "metrics.jsonl")[-1]["val_top1"] >= 0.97


def test_count_flops_matches_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    conv = 2 * (3 * 4 * 4) * 8 * (4 * 4)  # 2 * (in * k * k) * out * output positions
    linear = 2 * 128 * 10
    assert count_flops(model, (3, 16, 16)) == conv + linear


def test_info_lists_models_with_peer_parameter_counts(capsys):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    assert main(["info", "swin_demo*", "--flops"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(DEMO_MODEL)
    peer = timm_swin.SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                     depths=(2, 2, 2), num_heads=(2, 4, 8), num_classes=10)
    cfg = winattn.create_model(DEMO_MODEL).config
    assert (cfg.embed_dim, tuple(cfg.depths), tuple(cfg.num_heads)) == (32, (2, 2, 2), (2, 4, 8))
    params = sum(p.numel() for p in peer.parameters())
    assert f"{params / 1e6:9.2f}M" in lines[1]
    gflops = float(lines[1].split()[3])
    assert gflops > 0


def test_info_unknown_pattern_is_an_error(capsys):
    assert main(["info", "no_such_model*"]) == 2
    assert "pattern: no registered model matches 'no_such_model*'" in capsys.readouterr().err


def test_finetune_loads_everything_but_the_head(tmp_path):
    if not hasattr(winattn, "load_checkpoint"):
        pytest.skip("winattn.load_checkpoint has not landed yet")
    torch.manual_seed(1)
    source = winattn.create_model(DEMO_MODEL, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "src.pth")
    cfg = TrainConfig(model=DEMO_MODEL, data="digits", out=str(tmp_path / "ft"),
                      finetune=str(tmp_path / "src.pth"), progress=False)
    trainer = Trainer(cfg, DistEnv())
    got, want = trainer.model.state_dict(), source.state_dict()
    assert trainer.model.num_classes == 10
    for k, v in got.items():
        if k.startswith("head."):
            assert v.shape[0] == 10
        else:
            assert torch.equal(v, want[k]), k


def test_finetune_from_a_checkpoint_of_another_model_is_an_error(tmp_path, capsys):
    if not hasattr(winattn, "load_checkpoint"):
        pytest.skip("winattn.load_checkpoint has not landed yet")
    other = winattn.create_model(DEMO_MODEL, embed_dim=48, num_heads=(3, 6, 12))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    rc = main(["train", "--model", DEMO_MODEL, "--finetune", str(tmp_path / "other.pth"),
               "--out", str(tmp_path / "ft"), "--epochs", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("winattn train: error: ") and "other.pth" in err
    assert not (tmp_path / "ft" / "last.pt").exists()
