"""Multi-scale features: create_model(features_only=True), feature_info, forward_intermediates."""

from __future__ import annotations

import functools

import pytest
import swin_peers
import torch

import winattn
from winattn.checkpoints import CheckpointMismatchError, load_checkpoint

NAMES = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"]


randomize_ = functools.partial(swin_peers.randomize_, straddle_clamp=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("output_fmt", ["NCHW", "NHWC"])
def test_features_only_strides_and_feature_info(name, output_fmt):
    backbone = winattn.create_model(name, features_only=True, output_fmt=output_fmt).eval()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    height, width = 128, 96
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, height, width))
    for fmap, channels, stride in zip(
        maps, backbone.feature_info.channels(), backbone.feature_info.reduction()
    ):
        spatial = (height // stride, width // stride)
        expected = (1, channels, *spatial) if output_fmt == "NCHW" else (1, *spatial, channels)
        assert tuple(fmap.shape) == expected


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_matches_timm(name):
    timm = pytest.importorskip("timm")
    ours = winattn.create_model(name, features_only=True, out_indices=(1, 3))
    theirs = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 3))
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    assert ours.out_indices == (1, 3) and len(ours.layers) == 4


def test_out_indices_validated():
    with pytest.raises(ValueError, match="out of range"):
        winattn.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(4,))
    with pytest.raises(ValueError, match="output_fmt"):
        winattn.create_model("swin_tiny_patch4_window7_224", features_only=True, output_fmt="NLC")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"indices": 2, "norm": True},
        {"indices": [0, -1], "intermediates_only": True},
        {"indices": [1], "stop_early": True, "intermediates_only": True},
    ],
)
def test_forward_intermediates_matches_timm(name, kwargs):
    timm = pytest.importorskip("timm")
    # timm's V1 sizes its bias tables for the window it shrinks to: use the native size.
    size = 224 if name.startswith("swin_") else 128
    peer = randomize_(timm.create_model(name, pretrained=False, img_size=size))
    ours = winattn.create_model(name, window_rule="timm")
    ours.load_state_dict(peer.state_dict())
    ours.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = peer.forward_intermediates(x, **kwargs)
        got = ours.forward_intermediates(x, **kwargs)
    if kwargs.get("intermediates_only"):
        expected, got = (None, expected), (None, got)
    else:
        torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=0)
        with torch.no_grad():
            features = ours.forward_features(x)
        torch.testing.assert_close(features, got[0], atol=1e-5, rtol=0)
    assert len(got[1]) == len(expected[1])
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_nhwc_intermediates_are_the_nchw_ones_permuted():
    model = randomize_(winattn.create_model("swinv2_tiny_window8_256"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        nchw = model.forward_intermediates(x, intermediates_only=True)
        nhwc = model.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    for a, b in zip(nchw, nhwc):
        torch.testing.assert_close(a, b.permute(0, 3, 1, 2), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_feature_pyramid_trains_on_a_toy_target(family):
    """Backbone -> torchvision FeaturePyramidNetwork -> 1x1 conv predicting, at stride 8, the
    local mean brightness of the image; a few Adam steps lower the loss."""
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    backbone = winattn.create_model(
        family, features_only=True, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
        window_size=4, drop_path_rate=0.0,
    )
    fpn = ops.FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=16)
    head = torch.nn.Conv2d(16, 1, kernel_size=1)
    params = [*backbone.parameters(), *fpn.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    images = torch.rand(4, 3, 64, 64)
    target = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)  # (4, 1, 8, 8)
    losses = []
    for _ in range(12):
        pyramid = fpn(backbone.forward_dict(images))
        prediction = head(pyramid["1"])  # stride 8
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


SMALL = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)


def test_unsorted_out_indices_give_maps_in_their_order():
    # The maps, feature_info and forward_dict agree, in the order out_indices lists the stages
    # (timm's FeatureListNet returns stage order under a feature_info in the given order).
    model = randomize_(winattn.create_model("swin_tiny_patch4_window7_224", **SMALL))
    forward = winattn.SwinFeatures(model, out_indices=(0, 3))
    backward = winattn.SwinFeatures(model, out_indices=(-1, 0))
    assert backward.out_indices == (3, 0)
    assert backward.feature_info.channels() == [128, 16]
    assert backward.feature_info.reduction() == [32, 4]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = forward(x)
        maps = backward(x)
        named = backward.forward_dict(x)
    assert [m.shape[1] for m in maps] == backward.feature_info.channels()
    for got, want in zip(maps, reversed(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert list(named) == ["3", "0"]
    assert named["0"].shape[-1] == 64 // 4 and named["3"].shape[-1] == 64 // 32


def test_repeated_out_indices_are_refused():
    model = winattn.create_model("swin_tiny_patch4_window7_224", **SMALL)
    for out_indices in [(1, 1), (3, -1)]:
        with pytest.raises(ValueError, match=r"out_indices=.*more than once"):
            winattn.SwinFeatures(model, out_indices=out_indices)


def test_backbone_with_the_first_stages_loads_a_full_checkpoint_non_strict():
    # features.py's promise: backbone weights load with strict=False, however few stages it
    # keeps; the checkpoint's later stages, final norm and head are reported as unexpected.
    timm = pytest.importorskip("timm")
    name = "swin_tiny_patch4_window7_224"
    peer = randomize_(timm.create_model(name, pretrained=False, img_size=64, **SMALL))
    backbone = winattn.create_model(name, features_only=True, out_indices=(0, 1), img_size=64,
                                    **SMALL).eval()
    with pytest.raises(CheckpointMismatchError, match="first 2 of the checkpoint's 4 stages"):
        load_checkpoint(backbone, peer.state_dict())
    report = load_checkpoint(backbone, peer.state_dict(), strict=False)
    assert not report.missing_keys
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.unexpected_keys} == {
        "layers.2", "layers.3", "norm.weight", "norm.bias", "head.fc"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = peer.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        maps = backbone(x)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_backbone_checks_the_v2_pretrained_windows_of_a_checkpoint(tmp_path):
    # A V2 fine-tune trained at pretrained windows (2, 2): a backbone built without them must
    # refuse it (with strict=False too), and one built with them gives timm's maps.
    timm = pytest.importorskip("timm")
    from winattn.checkpoints import from_native

    config = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                  window_size=4)
    peer = randomize_(timm.models.swin_transformer_v2.SwinTransformerV2(
        **config, pretrained_window_sizes=(2, 2)))
    state = from_native(peer.state_dict(), "official")
    for key, buffer in peer.named_buffers():
        if key.endswith(("relative_coords_table", "relative_position_index")):
            state[key] = buffer.clone()
    path = tmp_path / "v2_ft.pth"
    torch.save({"model": state}, path)
    name = "swinv2_tiny_window8_256"
    wrong = winattn.create_model(name, features_only=True, **config)
    with pytest.raises(CheckpointMismatchError, match=rf"{path}.*pretrained_window_sizes\[0\]=2"):
        load_checkpoint(wrong, path, strict=False)
    right = winattn.create_model(name, features_only=True, pretrained_window_sizes=(2, 2),
                                 **config).eval()
    load_checkpoint(right, path, strict=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = peer.forward_intermediates(x, intermediates_only=True)
        maps = right(x)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_an_int_out_indices_takes_the_last_stages():
    # As timm's feature_take_indices (and forward_intermediates here): an int n is the last n.
    model = winattn.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=2,
                                 embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8))
    assert model.out_indices == (1, 2)
    assert [t.shape[1] for t in model(torch.randn(1, 3, 64, 64))] == [32, 64]
    with pytest.raises(ValueError, match=r"indices=-1 asks for the last -1 stages"):
        winattn.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=-1)
