"""Every registered model, tested for free: finite output, gradients everywhere, checkpointing,
state-dict round trip, the timm-style interface and clear errors on bad input."""

from __future__ import annotations

import io

import pytest
import torch

import winattn
from winattn.models.registry import model_entry
from winattn.models.swin import resolve_window

ALL_MODELS = winattn.list_models()
SMALL_INPUT = 64  # small enough for every variant on 2 cores; windows shrink at the late stages


def _build(name: str, **overrides):
    torch.manual_seed(0)
    overrides.setdefault("drop_path_rate", 0.0)
    return winattn.create_model(name, **overrides)


def _image(model, size=SMALL_INPUT, batch=1):
    channels = model.data_config["input_size"][0]
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _two_blocks_per_stage(name: str) -> dict:
    """Each variant's own widths, heads and windows, with one plain and one shifted block per
    stage: the same code paths as full depth at a fraction of the cost."""
    return {"depths": (2,) * len(model_entry(name).config.depths)}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract(name):
    check_contract(name, **_two_blocks_per_stage(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract_full_depth(name):
    check_contract(name)


def check_contract(name: str, **overrides) -> None:
    model = _build(name, num_classes=7, **overrides)
    x = _image(model)

    # Eval: finite logits of the right shape, features NHWC, pre-logits pooled.
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pooled = model.forward_head(features, pre_logits=True)
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()
    assert features.dim() == 4 and features.shape[-1] == model.num_features
    assert pooled.shape == (1, model.num_features)

    # The state dict round-trips through bytes into a fresh model with identical output.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = _build(name, num_classes=7, **overrides).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), logits, rtol=0, atol=0)

    # Train: every parameter gets a gradient; checkpointing gives the same output and grads.
    model.train()
    out = model(x)
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)

    # no_weight_decay names real parameters; reset_classifier swaps the head.
    params = dict(model.named_parameters())
    assert model.no_weight_decay() and model.no_weight_decay() <= set(params)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.eval()(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model.eval()(x).shape == (1, model.num_features)


@pytest.mark.parametrize("size", [(3, 36, 52), (3, 97, 61), (1, 224, 160)])
def test_any_resolution_and_batch(size):
    channels, height, width = size
    model = _build("swin_tiny_patch4_window7_224", in_chans=channels).eval()
    x = torch.randn(2 if channels == 3 else 1, channels, height, width)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (x.shape[0], 1000) and torch.isfinite(out).all()


def test_model_built_at_another_size_gives_the_same_output():
    small = _build("swin_tiny_patch4_window7_224").eval()
    large = _build("swin_tiny_patch4_window7_224", img_size=320).eval()
    large.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 256, 160)
    with torch.no_grad():
        torch.testing.assert_close(small(x), large(x), rtol=0, atol=0)


def test_block_matches_timm_block():
    """One shifted block, weights shared, against timm's own SwinTransformerBlock."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    from winattn.models.swin import SwinBlock

    torch.manual_seed(0)
    peer = timm_swin.SwinTransformerBlock(
        dim=64, input_resolution=(14, 14), num_heads=4, window_size=7, shift_size=3
    ).eval()
    ours = SwinBlock(64, 4, (7, 7), True, 4.0, True, 0.0, 0.0, "official").eval()
    state = {k: v for k, v in peer.state_dict().items() if "index" not in k and "mask" not in k}
    ours.load_state_dict(state)
    x = torch.randn(2, 14, 14, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "rule,feature,expected",
    [
        ("official", (7, 10), ((7, 7), (0, 0))),
        ("official", (5, 20), ((5, 5), (0, 0))),
        ("official", (14, 14), ((7, 7), (3, 3))),
        ("timm", (5, 20), ((5, 7), (0, 3))),
        ("torchvision", (5, 20), ((7, 7), (0, 3))),
        ("torchvision", (7, 10), ((7, 7), (0, 3))),
    ],
)
def test_window_rules_follow_the_named_peer(rule, feature, expected):
    assert resolve_window(feature, (7, 7), (3, 3), rule) == expected


def test_create_model_errors():
    with pytest.raises(ValueError, match=r"unknown model 'swin_tiniest'"):
        winattn.create_model("swin_tiniest")
    with pytest.raises(TypeError, match=r"unknown config fields \['depth'\]"):
        winattn.create_model("swin_tiny_patch4_window7_224", depth=3)
    with pytest.raises(ValueError, match=r"window_rule must be one of"):
        winattn.create_model("swin_tiny_patch4_window7_224", window_rule="keras")
    with pytest.raises(ValueError, match=r"depths .* and num_heads .* one entry per stage"):
        winattn.create_model("swin_tiny_patch4_window7_224", depths=(2, 2))


def test_bad_images_raise_clear_errors():
    model = _build("swin_tiny_patch4_window7_224").eval()
    with pytest.raises(ValueError, match=r"images have 1 channels, the model expects in_chans=3"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"rank 3"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"3x40 pixels is smaller than one 4x4 patch"):
        model(torch.randn(1, 3, 3, 40))


def test_list_models_filters():
    assert "swin_tiny_patch4_window7_224" in winattn.list_models("swin_tiny*")
    assert all(n.startswith("swin_base") for n in winattn.list_models("swin_base*"))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval-fp32", "eval-bf16"])
def test_an_empty_batch_gives_empty_outputs(name, features_only, mode):
    """Batch 0 (a filtered last batch, no detections to crop) as torchvision's Swin takes it:
    empty logits / maps of the right shapes, and training through them runs."""
    kwargs = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), features_only=features_only)
    model = winattn.create_model(name, **kwargs).train(mode == "train")
    x = torch.randn(0, 3, 32, 32)
    with torch.autocast("cpu", torch.bfloat16, enabled=mode == "eval-bf16"):
        out = model(x)
    if features_only:
        assert [tuple(t.shape) for t in out] == [(0, 16, 8, 8), (0, 32, 4, 4)]
    else:
        assert out.shape == (0, 1000)
        if mode == "train":
            out.sum().backward()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(window_size=7.5), TypeError, r"window_size must be an int or a pair of ints"),
        (dict(depths=(1, -1)), ValueError, r"depths must be a non-empty tuple of ints >= 1"),
        (dict(depths=()), ValueError, r"depths must be a non-empty tuple"),
        (dict(num_heads=(0, 2)), ValueError, r"num_heads must be a non-empty tuple of ints >= 1"),
        (dict(num_heads=(3, 4)), ValueError, r"num_heads\[0\]=3 does not divide stage 0"),
        (dict(mlp_ratio=0), ValueError, r"mlp_ratio=0 leaves the first stage's MLP no hidden"),
        (dict(mlp_ratio=-1), ValueError, r"mlp_ratio must be >= 0.0, got -1"),
        (dict(num_classes=2.5), TypeError, r"num_classes must be an int, got 2.5"),
        (dict(num_classes="10"), TypeError, r"num_classes must be an int, got '10'"),
        (dict(img_size=(0, 0)), ValueError, r"img_size must be >= 1, got \(0, 0\)"),
        (dict(mean=(0.5, 0.5)), ValueError, r"mean \(0.5, 0.5\) and std .* one entry per channel"),
        (dict(drop_path_rate=float("nan")), ValueError, r"drop_path_rate must be in \[0.0, 1.0\)"),
    ],
)
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_bad_config_values_are_named(name, kwargs, error, match):
    base = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    with pytest.raises(error, match=match):
        winattn.create_model(name, **{**base, **kwargs})


def test_config_takes_numpy_ints_and_lists():
    import numpy as np

    model = winattn.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=[2, 2], num_heads=[2, 4],
        window_size=np.int64(4),
    )
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_timm_head_interface():
    model = winattn.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2),
                                 num_heads=(2, 4))
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(10, "avg")
    assert model.get_classifier().out_features == 10 and model.num_classes == 10
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"num_classes must be >= 0, got -1"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match=r"global_pool must be None or 'avg' .* got 'max'"):
        model.reset_classifier(10, "max")
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    assert winattn.create_model("swin_tiny_patch4_window7_224", global_pool="avg").num_classes
    with pytest.raises(ValueError, match=r"global_pool must be None or 'avg' .* got 'max'"):
        winattn.create_model("swin_tiny_patch4_window7_224", global_pool="max")


def test_integer_images_are_refused_with_the_conversion():
    model = winattn.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2),
                                 num_heads=(2, 4))
    with pytest.raises(TypeError, match=r"images must be a floating tensor.* got torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
