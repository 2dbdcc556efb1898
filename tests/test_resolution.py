"""Any resolution on one model object (V1 and V2), cached geometry, and the input minimum."""

from __future__ import annotations

import functools

import pytest
import swin_peers
import torch

import winattn
from winattn.checkpoints import load_checkpoint
from winattn.models.swin import SwinConfig, SwinTransformer
from winattn.models.swin_v2 import SwinTransformerV2, SwinV2Config

# Swin-T's layout at a sixth of the width: the same strides, windows and padding as Swin-T.
SMALL = dict(img_size=224, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)
SIZES = [(160, 320), (512, 512), (1000, 600)]


randomize_ = functools.partial(swin_peers.randomize_, straddle_clamp=True)


def build(version: int, **overrides) -> torch.nn.Module:
    if version == 1:
        return SwinTransformer(SwinConfig(**{**SMALL, **overrides}))
    return SwinTransformerV2(SwinV2Config(**{**SMALL, **overrides}))


@pytest.mark.parametrize("version", [1, 2])
def test_one_model_object_equals_models_built_at_each_size(version):
    model = randomize_(build(version))
    for height, width in SIZES:
        x = torch.randn(1, 3, height, width)
        at_size = build(version, img_size=(height, width))
        at_size.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), at_size.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_one_model_object_matches_torchvision_at_each_size(version):
    """torchvision pads before the shift and never shrinks a window: window_rule="torchvision".
    160x320 puts a 5x10 map under a 7x7 window in the last stage (padded, shift kept on one
    axis); 1000x600 pads every stage."""
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    extra = {} if version == 1 else dict(block=tv.SwinTransformerBlockV2,
                                         downsample_layer=tv.PatchMergingV2)
    peer = randomize_(tv.SwinTransformer(
        patch_size=[4, 4], embed_dim=SMALL["embed_dim"], depths=list(SMALL["depths"]),
        num_heads=list(SMALL["num_heads"]), window_size=[7, 7], num_classes=10, **extra,
    ))
    model = build(version, num_classes=10, window_rule="torchvision")
    load_checkpoint(model, peer.state_dict())
    model.eval()
    for height, width in SIZES:
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(model(x), peer(x), atol=1e-4, rtol=0)


def test_position_bias_cached_in_eval_and_differentiable_in_training():
    model = randomize_(build(2))
    attn = model.layers[0].blocks[0].attn
    with torch.no_grad():
        first = attn.position_bias((7, 7))
        assert attn.position_bias((7, 7)) is first  # cached per window
        assert attn.position_bias((5, 5)).shape == (1, 25, 25)
    model.train()
    fresh = attn.position_bias((7, 7))
    assert fresh.requires_grad and fresh is not first
    torch.testing.assert_close(fresh.detach(), first)
    fresh.sum().backward()
    assert attn.cpb_mlp[0].weight.grad is not None
    # A weight update invalidates the cached bias.
    with torch.no_grad():
        attn.cpb_mlp[2].weight.mul_(2.0)
        updated = attn.position_bias((7, 7))
    assert not torch.equal(updated, first)


def test_geometry_is_planned_once_per_shape():
    from winattn.ops.geometry import _plan_windows

    model = randomize_(build(1))
    x = torch.randn(1, 3, 160, 320)
    with torch.no_grad():
        model(x)
        misses = _plan_windows.cache_info().misses
        model(x)
    assert _plan_windows.cache_info().misses == misses


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("rule", ["official", "timm", "torchvision"])
def test_minimum_input_is_one_patch(version, rule):
    model = randomize_(build(version, window_rule=rule))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 4, 4)).shape == (1, 1000)  # 1x1 map in every stage
        assert torch.isfinite(model(torch.randn(1, 3, 5, 37))).all()
    with pytest.raises(ValueError, match=r"3x3 pixels is smaller than one 4x4 patch"):
        model(torch.randn(1, 3, 3, 3))


@pytest.mark.parametrize(
    "sizes", [(12, 12, 12), (12, 12, 12, 6, 6), (12, -1, 12, 6), (12.0, 12, 12, 6), [12, 12, 12, 6]]
)
def test_pretrained_window_sizes_validated(sizes):
    with pytest.raises(ValueError, match="pretrained_window_sizes"):
        winattn.create_model("swinv2_base_window16_256", pretrained_window_sizes=sizes)
