"""A tiny stand-in classifier for the training/CLI tests, and a runner that registers it.

It has the model contract the training code relies on (``data_config``, ``num_classes``,
``no_weight_decay()``, ``set_grad_checkpointing()``) and dropout, so RNG handling is exercised,
at a size that trains in milliseconds. ``python tests/_winattn_train_stub.py ARGS`` runs the
``winattn`` command with the stand-in available as model ``tiny_test``; with the environment
variable ``WINATTN_STUB_HANG_ON=last.pt:N`` the N-th write of ``last.pt`` hangs half way through.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src"


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 1000, img_size: int = 16, in_chans: int = 3,
                 drop_path_rate: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.patch = nn.Conv2d(in_chans, 8, kernel_size=4, stride=4)
        self.pos_table = nn.Parameter(torch.zeros(1, 8, img_size // 4, img_size // 4))
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(drop_path_rate)  # stands in for drop path
        self.head = nn.Linear(8, num_classes)
        self.grad_checkpointing = False
        self.data_config = {"input_size": (in_chans, img_size, img_size), "mean": (0.5,) * 3,
                            "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}

    def no_weight_decay(self) -> set[str]:
        return {"pos_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x) + self.pos_table  # (B, 8, h, w)
        x = self.norm(x.flatten(2).transpose(1, 2)).mean(1)  # (B, 8)
        return self.head(self.drop(x))


def create_model(name: str, checkpoint=None, pretrained=False, **kwargs) -> nn.Module:
    if name != "tiny_test":
        raise ValueError(f"model_name: unknown model {name!r} (stub registry: tiny_test)")
    model = TinyNet(**kwargs)
    if checkpoint is not None:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(obj.get("model", obj))
    return model


def install() -> None:
    """Make ``tiny_test`` available to winattn's training and CLI code in this process."""
    from winattn.train import build

    build.create_model = create_model


def _hang_on_checkpoint_write(target: str, n: int) -> None:
    """The n-th write of checkpoint ``target`` stops half way and hangs (until killed)."""
    real_save = torch.save
    calls = {"n": 0}

    def slow_save(obj, fh, *args, **kwargs):
        name = Path(getattr(fh, "name", "")).name
        if name.startswith(f".{target}.tmp"):
            calls["n"] += 1
            if calls["n"] == n:
                import io

                buf = io.BytesIO()
                real_save(obj, buf)
                data = buf.getvalue()
                fh.write(data[: len(data) // 2])
                fh.flush()
                Path(os.environ["WINATTN_STUB_MARKER"]).write_text("writing")
                time.sleep(600)
        return real_save(obj, fh, *args, **kwargs)

    torch.save = slow_save


if __name__ == "__main__":
    sys.path.insert(0, str(SRC))
    install()
    if os.environ.get("WINATTN_STUB_HANG_ON"):
        target, n = os.environ["WINATTN_STUB_HANG_ON"].split(":")
        _hang_on_checkpoint_write(target, int(n))
    from winattn.cli.main import main

    sys.exit(main(sys.argv[1:]))
