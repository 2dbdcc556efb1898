"""Swin V2 parity: each peer's own model, random weights, converted through our loader.

As test_parity_v1.py, for Swin V2: timm ``swinv2_*``, the official layout of timm's weights,
torchvision ``swin_v2_t/s/b`` and transformers ``Swinv2ForImageClassification``. Skipped until
winattn registers Swin V2 models.

transformers' Swinv2 adds the shift mask twice (-200 instead of -100). With the logit scales
used here (about 10, so attention logits within about +-26) both masks suppress completely in
float32 and the same 1e-4 bound applies; with trained scales near the clamp (100) the -100 mask
no longer fully suppresses and Hugging Face really differs from the others.
"""

from __future__ import annotations

import pytest
import torch
from swin_peers import create_named, hf_config, hf_model, logits, randomize_

import winattn
from winattn.checkpoints import from_native, load_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not winattn.list_models("swinv2_*"), reason="winattn has no Swin V2 yet"),
]

ATOL = 1e-4
ODD_SIZE = (200, 296)
_T = (96, (2, 2, 6, 2), (3, 6, 12, 24))
_S = (96, (2, 2, 18, 2), (3, 6, 12, 24))
_B = (128, (2, 2, 18, 2), (4, 8, 16, 32))
_L = (192, (2, 2, 18, 2), (6, 12, 24, 48))
_FT = (12, 12, 12, 6)  # pretrained window sizes of the window-12 fine-tunes

# name: (embed dim, depths, heads, window, image size, pretrained windows, torchvision builder)
V2_SIZES = {
    "swinv2_tiny_window8_256": (*_T, 8, 256, None, "swin_v2_t"),
    "swinv2_tiny_window16_256": (*_T, 16, 256, None, None),
    "swinv2_small_window8_256": (*_S, 8, 256, None, "swin_v2_s"),
    "swinv2_small_window16_256": (*_S, 16, 256, None, None),
    "swinv2_base_window8_256": (*_B, 8, 256, None, "swin_v2_b"),
    "swinv2_base_window16_256": (*_B, 16, 256, None, None),
    "swinv2_base_window12_192": (*_B, 12, 192, None, None),
    "swinv2_base_window12to16_192to256": (*_B, 16, 256, _FT, None),
    "swinv2_base_window12to24_192to384": (*_B, 24, 384, _FT, None),
    "swinv2_large_window12_192": (*_L, 12, 192, None, None),
    "swinv2_large_window12to16_192to256": (*_L, 16, 256, _FT, None),
    "swinv2_large_window12to24_192to384": (*_L, 24, 384, _FT, None),
}
# The default suite keeps the tiny models (every peer) and one fine-tune with pretrained windows.
DEFAULT = {
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_base_window12to16_192to256",
}


def _params(names):
    return [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _images(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    img = V2_SIZES[name][4]
    batch = 2 if ("tiny" in name and size is None) else 1
    h, w = size or (img, img)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(7))


def _check(name: str, peer_state: dict, peer, fmt: str, sizes, **model_kw) -> None:
    model = create_named(name, **model_kw)
    report = load_checkpoint(model, peer_state)
    assert report.format == fmt
    for size in sizes:
        x = _images(name, size)
        diff = (logits(model, x) - logits(peer, x)).abs().max().item()
        assert diff <= ATOL, f"{name} vs {fmt} at {tuple(x.shape[2:])}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name", _params(V2_SIZES))
def test_timm_and_official(name):
    timm = pytest.importorskip("timm")
    peer = randomize_(timm.create_model(name, pretrained=False))
    _check(name, peer.state_dict(), peer, "timm", [None])
    official = from_native(peer.state_dict(), "official")
    for key, buffer in peer.named_buffers():
        if key.endswith(("relative_position_index", "relative_coords_table", "attn_mask")):
            official[key] = buffer
    _check(name, {"model": official}, peer, "official", [None])


@pytest.mark.parametrize("name", _params(n for n, s in V2_SIZES.items() if s[6]))
def test_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    peer = randomize_(getattr(torchvision.models, V2_SIZES[name][6])(weights=None))
    _check(name, peer.state_dict(), peer, "torchvision", [None, ODD_SIZE],
           window_rule="torchvision")


@pytest.mark.parametrize("name", _params(V2_SIZES))
def test_huggingface(name):
    embed_dim, depths, heads, window, img, pretrained_windows, _ = V2_SIZES[name]
    config = hf_config(2, img_size=img, embed_dim=embed_dim, depths=depths, num_heads=heads,
                       window_size=window, num_classes=1000)
    config.pretrained_window_sizes = list(pretrained_windows or (0, 0, 0, 0))
    peer = randomize_(hf_model(config))
    _check(name, peer.state_dict(), peer, "huggingface", [None, ODD_SIZE], window_rule="official")
