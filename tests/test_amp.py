"""Mixed precision: bf16 and fp16 autocast keep every Swin V1/V2 model finite, at initialisation
and with large logit scales (V2's cosine logits then reach 100 + 16 before the -100 mask)."""

from __future__ import annotations

import math

import pytest
import torch

import winattn

DTYPES = [torch.bfloat16, torch.float16]
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def stress_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large but legal weights: logit scales far above the clamp, unit-gain post-norms, wide
    projections (V2 residual streams grow with depth)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("logit_scale"):
                param.fill_(10.0)  # exp(10) without the clamp at log(100)
            elif param.ndim >= 2:
                param.copy_(2.0 * noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.5 * noise)
            else:
                param.copy_(0.5 * noise)
    return model.eval()


def finite_under_autocast(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert torch.isfinite(out).all(), f"{dtype}: non-finite outputs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
@pytest.mark.parametrize("stressed", [False, True])
def test_small_models_finite(name, dtype, stressed):
    torch.manual_seed(0)
    model = winattn.create_model(name, **SMALL).eval()
    if stressed:
        stress_(model)
    # 72x88: padded windows in the first stages, shrunk windows in the last ones.
    finite_under_autocast(model, torch.randn(2, 3, 72, 88), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_v2_low_precision_error_within_twice_timms(dtype):
    """Tolerance rule (flash-attention's): our autocast error against float32 is at most twice
    timm's own autocast error on the same weights and input, plus a small floor, with every head
    at the logit-scale clamp."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    peer = timm.models.swin_transformer_v2.SwinTransformerV2(img_size=64, **SMALL)
    stress_(peer)
    model = winattn.create_model("swinv2_tiny_window8_256", window_rule="timm", **SMALL)
    model.load_state_dict(peer.state_dict())
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = peer(x)
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=0)
        with torch.autocast("cpu", dtype=dtype):
            ours = model(x).float()
            theirs = peer(x).float()
    our_error = (ours - reference).abs().max()
    their_error = (theirs - reference).abs().max()
    assert our_error <= 2 * their_error + 1e-3, (float(our_error), float(their_error))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", winattn.list_models())
def test_every_registered_model_finite(name, dtype):
    torch.manual_seed(0)
    model = stress_(winattn.create_model(name))
    finite_under_autocast(model, torch.randn(1, 3, 64, 64), dtype)
