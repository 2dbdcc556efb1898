"""Checkpoint formats: detection, conversion both ways, loading, resizing, errors, hub cache."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from swin_peers import (
    TINY,
    TINY_CLASSES,
    create_named,
    hf_config,
    hf_model,
    hf_tiny,
    logits,
    native_tiny,
    randomize_,
    timm_tiny,
    torchvision_tiny,
)

from winattn.checkpoints import (
    PRETRAINED_TAGS,
    CheckpointMismatchError,
    CheckpointReadError,
    detect_format,
    from_native,
    load_checkpoint,
    resize_bias_table,
    resolve_pretrained,
    save_state_dict,
    to_native,
    unwrap,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

X = torch.randn(2, 3, TINY["img_size"], TINY["img_size"],
                generator=torch.Generator().manual_seed(1))


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- detection and conversion
PEERS = {
    "timm": timm_tiny,
    "torchvision": torchvision_tiny,
    "huggingface": hf_tiny,
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", sorted(PEERS))
def test_peer_state_dict_is_detected_and_loads_with_same_logits(fmt, version):
    peer = randomize_(PEERS[fmt](version))
    assert detect_format(peer.state_dict()) == fmt
    model = native_tiny(version)
    report = load_checkpoint(model, peer.state_dict())
    assert report.format == fmt and not report.resized and not report.head_dropped
    torch.testing.assert_close(logits(model, X), logits(peer, X), rtol=1e-5, atol=1e-5)


def test_torchvision_v2_key_bias_third_is_ignored():
    # torchvision zeroes the key third of qkv.bias at run time; whatever is stored there must not
    # reach the converted model.
    peer = randomize_(torchvision_tiny(2))
    sd = peer.state_dict()
    native, _ = to_native(sd)
    bias = sd["features.1.0.attn.qkv.bias"]
    c = bias.numel() // 3
    assert bias[c: 2 * c].abs().sum() > 0  # randomize_ filled it
    torch.testing.assert_close(native["layers.0.blocks.0.attn.q_bias"], bias[:c])
    torch.testing.assert_close(native["layers.0.blocks.0.attn.v_bias"], bias[2 * c:])
    assert not any("k_bias" in k or "qkv.bias" in k for k in native)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", ["official", "timm", "torchvision", "huggingface"])
def test_round_trip_native_to_format_and_back(fmt, version):
    native = randomize_(native_tiny(version)).state_dict()
    converted = from_native(native, fmt)
    assert detect_format(converted) == fmt
    back, detected = to_native(converted)
    assert detected == fmt
    assert_same_state(back, native)


@pytest.mark.parametrize("version", [1, 2])
def test_official_layout_matches_timm_own_converter(version):
    # timm's checkpoint_filter_fn turns the official layout into timm's: an independent check of
    # what we write as "official" (downsample at the end of stage i, head without .fc).
    timm = pytest.importorskip("timm")
    mod = timm.models.swin_transformer if version == 1 else timm.models.swin_transformer_v2
    model = randomize_(timm_tiny(version))
    official = from_native(model.state_dict(), "official")
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert_same_state(mod.checkpoint_filter_fn(official, model), model.state_dict())


@pytest.mark.parametrize("version", [1, 2])
def test_native_to_torchvision_loads_into_torchvision(version):
    model = randomize_(native_tiny(version))
    peer = torchvision_tiny(version)
    result = peer.load_state_dict(from_native(model.state_dict(), "torchvision"), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith(("relative_position_index", "relative_coords_table"))
               for k in result.missing_keys)
    torch.testing.assert_close(logits(peer, X), logits(model, X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_native_to_huggingface_loads_with_transformers_from_pretrained(version, tmp_path):
    # We write the published (transformers 4) names; transformers' own loader must accept them.
    peer_config = hf_tiny(version).config
    model = randomize_(native_tiny(version))
    save_state_dict(tmp_path / "model.safetensors", from_native(model.state_dict(), "huggingface"))
    (tmp_path / "config.json").write_text(peer_config.to_json_string())
    cls = type(hf_tiny(version))
    peer = cls.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(peer, X), logits(model, X), rtol=1e-5, atol=1e-5)


def test_huggingface_published_and_transformers5_names_convert_alike():
    peer = randomize_(hf_tiny(1))
    current = peer.state_dict()  # transformers 5 names (attention.q_proj, mlp.fc1, ...)
    published = from_native(to_native(current)[0], "huggingface")
    assert any("attention.self.query" in k for k in published)
    assert any("attention.q_proj" in k for k in current)
    assert_same_state(to_native(published)[0], to_native(current)[0])


def test_detect_format_rejects_non_swin():
    with pytest.raises(ValueError, match="not a Swin checkpoint"):
        detect_format({"conv1.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------- unwrapping
def test_unwrap_wrappers_ema_and_ddp_prefix():
    plain = {"a.weight": torch.zeros(1)}
    ema = {"a.weight": torch.ones(1)}
    assert unwrap({"model": plain, "epoch": 3}) == plain
    assert unwrap({"state_dict": plain, "state_dict_ema": ema, "optimizer": {}}) == plain
    assert unwrap({"state_dict": plain, "state_dict_ema": ema}, prefer_ema=True) == ema
    assert unwrap({"module.a.weight": plain["a.weight"]}) == plain
    simmim = {"encoder.patch_embed.proj.weight": torch.zeros(1), "decoder.0.weight": torch.zeros(1)}
    assert list(unwrap({"model": simmim})) == ["patch_embed.proj.weight"]
    with pytest.raises(ValueError, match="holds no tensors"):
        unwrap({"epoch": 3})


def test_wrapped_official_file_loads(tmp_path):
    model = randomize_(native_tiny(1))
    path = tmp_path / "swin.pth"
    torch.save({"model": from_native(model.state_dict(), "official"), "epoch": 300}, path)
    target = native_tiny(1)
    report = load_checkpoint(target, path)
    assert report.format == "official" and report.source == str(path)
    assert_same_state(target.state_dict(), model.state_dict())


# -------------------------------------------------------------------------------- sources
@pytest.mark.parametrize(
    "layout", ["pth", "bin", "safetensors", "hub_repo", "hub_cache", "sharded"]
)
def test_sources(layout, tmp_path):
    model = randomize_(native_tiny(1))
    sd = model.state_dict()
    if layout in ("pth", "bin"):
        source = tmp_path / f"w.{layout}"
        torch.save(sd, source)
    elif layout == "safetensors":
        source = save_state_dict(tmp_path / "w.safetensors", sd)
    elif layout == "hub_repo":
        source = tmp_path
        torch.save(from_native(sd, "huggingface"), tmp_path / "pytorch_model.bin")
    elif layout == "hub_cache":
        source = tmp_path / "models--org--swin"
        (source / "refs").mkdir(parents=True)
        (source / "refs" / "main").write_text("abc123")
        save_state_dict(source / "snapshots" / "abc123" / "model.safetensors", sd)
        save_state_dict(source / "snapshots" / "old" / "model.safetensors", {})  # not main: ignored
    else:
        source = tmp_path
        keys = sorted(sd)
        half = {k: sd[k] for k in keys[: len(keys) // 2]}
        rest = {k: sd[k] for k in keys[len(keys) // 2:]}
        save_state_dict(tmp_path / "model-1.safetensors", half)
        save_state_dict(tmp_path / "model-2.safetensors", rest)
        weight_map = {k: "model-1.safetensors" for k in half}
        weight_map |= {k: "model-2.safetensors" for k in rest}
        index = json.dumps({"weight_map": weight_map})
        (tmp_path / "model.safetensors.index.json").write_text(index)
    target = native_tiny(1)
    load_checkpoint(target, source)
    assert_same_state(target.state_dict(), sd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_names_the_path(suffix, tmp_path):
    path = tmp_path / f"broken{suffix}"
    if suffix == ".pth":
        torch.save(native_tiny(1).state_dict(), path)
    else:
        save_state_dict(path, native_tiny(1).state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="broken"):
        load_checkpoint(native_tiny(1), path)


def test_pickle_with_objects_explains_weights_only(tmp_path):
    # The official trainer saves its yacs config beside the weights; any plain object stands in.
    path = tmp_path / "with_config.pth"
    torch.save({"model": native_tiny(1).state_dict(), "config": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointReadError, match="weights_only=False"):
        load_checkpoint(native_tiny(1), path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointReadError, match="does not exist"):
        load_checkpoint(native_tiny(1), tmp_path / "nope.pth")
    with pytest.raises(CheckpointReadError, match="holds none of"):
        load_checkpoint(native_tiny(1), tmp_path)


# ------------------------------------------------------------------------- resize and head
@pytest.mark.parametrize("window", [(8, 8), (4, 6)])
def test_bias_tables_resized_bicubic_like_the_official_loader(window):
    timm = pytest.importorskip("timm")
    source = randomize_(native_tiny(1, window_size=4))
    target = native_tiny(1, window_size=window, img_size=64)
    report = load_checkpoint(target, source.state_dict())
    tables = [k for k in source.state_dict() if k.endswith("relative_position_bias_table")]
    assert sorted(report.resized) == sorted(tables)
    for key in tables:
        # timm's resize_rel_pos_bias_table_simple is an independent implementation of the same
        # official interpolation (bicubic, align_corners=False, per head).
        expected = timm.layers.resize_rel_pos_bias_table_simple(
            source.state_dict()[key], window, target.state_dict()[key].shape)
        torch.testing.assert_close(target.state_dict()[key], expected)
    assert torch.isfinite(logits(target, torch.randn(1, 3, 64, 64))).all()


def test_resize_keeps_a_constant_table_constant():
    table = torch.full((49, 3), 0.7)
    resized = resize_bias_table(table, (12, 12))
    assert resized.shape == (23 * 23, 3)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.7))


def test_class_count_mismatch_asks_for_drop_head():
    source = randomize_(native_tiny(1)).state_dict()
    model = native_tiny(1, num_classes=3)
    match = rf"{TINY_CLASSES}-class head.*drop_head=True"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(model, source)


def test_drop_head_keeps_the_fresh_head_and_loads_the_rest():
    source = randomize_(native_tiny(1)).state_dict()
    model = native_tiny(1, num_classes=3)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = load_checkpoint(model, source, drop_head=True)
    assert report.head_dropped
    state = model.state_dict()
    for key, value in fresh_head.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    for key, value in source.items():
        if not key.startswith("head."):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_headless_checkpoint_needs_drop_head():
    source = {k: v for k, v in randomize_(native_tiny(1)).state_dict().items()
              if not k.startswith("head.")}
    match = "(?s)missing keys: head.fc.bias, head.fc.weight.*drop_head=True"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(native_tiny(1), source)
    assert load_checkpoint(native_tiny(1), source, drop_head=True).head_dropped


def test_model_without_classifier_needs_drop_head():
    source = randomize_(native_tiny(1)).state_dict()
    match = "(?s)unexpected keys: head.fc.bias.*drop_head"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(native_tiny(1, num_classes=0), source)
    model = native_tiny(1, num_classes=0)
    assert load_checkpoint(model, source, drop_head=True).head_dropped
    torch.testing.assert_close(model.state_dict()["norm.weight"], source["norm.weight"])


def test_unexpected_key_and_shape_mismatch_are_listed():
    source = randomize_(native_tiny(1)).state_dict()
    source["layers.0.blocks.0.extra.weight"] = torch.zeros(2)
    source["norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(native_tiny(1), source)
    message = str(info.value)
    assert "unexpected keys: layers.0.blocks.0.extra.weight" in message
    assert "norm.weight: checkpoint (5,), model (32,)" in message
    del source["norm.weight"]
    report = load_checkpoint(native_tiny(1), source, strict=False)
    assert report.unexpected_keys == ["layers.0.blocks.0.extra.weight"]
    assert report.missing_keys == ["norm.weight"]


def test_other_architecture_is_named_not_listed():
    timm = pytest.importorskip("timm")
    # The checkpoints only need shapes: timm's models (same layout) on the meta device.
    with torch.device("meta"):
        base = timm.create_model("swin_base_patch4_window7_224")
        v2 = timm.create_model("swinv2_tiny_window8_256")
    tiny = create_named("swin_tiny_patch4_window7_224")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(tiny, base.state_dict())
    message = str(info.value)
    assert "embed dim 128, depths (2,2,18,2), heads (4,8,16,32)" in message
    assert "swin_base" in message
    assert "embed dim 96, depths (2,2,6,2)" in message and "swin_tiny" in message
    assert len(message.splitlines()) == 3
    with pytest.raises(CheckpointMismatchError, match="Swin V2.*swinv2_tiny"):
        load_checkpoint(tiny, v2.state_dict())


# ------------------------------------------------------------------------------ pretrained
def test_pretrained_tags_and_errors():
    assert PRETRAINED_TAGS["swin_tiny_patch4_window7_224"][0] == "ms_in1k"
    with pytest.raises(ValueError, match="no published weights"):
        resolve_pretrained("resnet50")
    with pytest.raises(ValueError, match="published tags: ms_in1k"):
        resolve_pretrained("swinv2_tiny_window8_256", tag="ms_in22k")


def test_pretrained_tags_match_installed_timm():
    pytest.importorskip("timm")
    from timm.models._registry import _model_default_cfgs

    for name, tags in PRETRAINED_TAGS.items():
        assert tuple(_model_default_cfgs[name].tags) == tags, name


def test_resolve_pretrained_from_offline_hub_cache(tmp_path, monkeypatch):
    # The hub cache laid out by hand as huggingface_hub writes it; offline, so nothing is fetched.
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # the default cache_dir
    name, revision = "swin_tiny_patch4_window7_224", "0123456789abcdef"
    published = randomize_(timm.create_model(name)).state_dict()
    repo = tmp_path / f"models--timm--{name}.{PRETRAINED_TAGS[name][0]}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    save_state_dict(repo / "snapshots" / revision / "model.safetensors", published)

    path = resolve_pretrained(name)
    assert path == repo / "snapshots" / revision / "model.safetensors"
    assert resolve_pretrained(name, cache_dir=tmp_path) == path
    model = create_named(name)
    assert load_checkpoint(model, path).format == "timm"
    assert_same_state(model.state_dict(), published)
    # create_model(pretrained=True) goes through the same path.
    assert_same_state(create_named(name, pretrained=True).state_dict(), published)
    with pytest.raises(RuntimeError, match="could not be fetched"):
        resolve_pretrained(name, tag="ms_in22k")


# ------------------------------------------------------- audit: windows, EMA, configs, errors
def official_with_buffers(peer) -> dict:
    """A timm model's weights in the official layout, with the buffers official checkpoints
    persist (V2: the coordinate tables that say which window the position bias was trained at)."""
    state = from_native(peer.state_dict(), "official")
    for key, buffer in peer.named_buffers():
        if key.endswith(("relative_coords_table", "relative_position_index")):
            state[key] = buffer.clone()  # block keys are the same in both layouts
    return state


def test_convert_with_model_checks_the_v2_coordinate_tables_before_dropping_them(
    tmp_path, capsys
):
    # A V2 fine-tune trained at pretrained windows (8, 8, 8, 4): converted and then loaded into
    # a model without them, its logits were silently 0.58 off. --model must refuse it, as
    # load_checkpoint does; without --model the conversion says what it cannot keep.
    timm = pytest.importorskip("timm")
    from winattn.cli.main import main

    name, windows = "swinv2_tiny_window16_256", (8, 8, 8, 4)
    peer = randomize_(timm.create_model(name, pretrained=False, pretrained_window_sizes=windows))
    source, out = tmp_path / "ft.pth", tmp_path / "ft.safetensors"
    torch.save({"model": official_with_buffers(peer)}, source)
    assert main(["convert", str(source), str(out), "--model", name]) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "pretrained_window_sizes[0]=8" in err
    assert not out.exists()
    assert main(["convert", str(source), str(out)]) == 0
    assert "--model" in capsys.readouterr().err
    model = create_named(name, pretrained_window_sizes=windows, checkpoint=str(out))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, x), logits(peer, x), rtol=0, atol=1e-4)


def test_bias_table_of_a_window_shrunk_to_the_map_goes_where_the_model_reads_it():
    # timm (like official and Hugging Face) builds a stage whose map is not larger than the
    # window with the map's window: stage 1 (4x4 map) of a window-8 model stores a 7x7 table.
    # Our window-8 stage shrinks to 4 at run time and reads the centre of its 15x15 table.
    peer = randomize_(timm_tiny(1, window_size=8))
    assert peer.state_dict()["layers.1.blocks.0.attn.relative_position_bias_table"].shape[0] == 49
    model = native_tiny(1, window_size=8)
    report = load_checkpoint(model, peer.state_dict())
    assert sorted(report.resized) == [f"layers.1.blocks.{j}.attn.relative_position_bias_table"
                                      for j in range(2)]
    torch.testing.assert_close(logits(model, X), logits(peer, X), rtol=1e-5, atol=1e-5)


def test_bias_table_of_another_window_is_resized_to_the_shrunk_window_in_use():
    # A square table of another window (3) goes to the window the stage uses at img_size by the
    # official bicubic rule: 8 in stage 0 (8x8 map, as before), 4 in the shrunk stage 1, where it
    # then sits in the centre of the model's window-8 table.
    timm = pytest.importorskip("timm")
    source = randomize_(native_tiny(1, window_size=3)).state_dict()
    model = native_tiny(1, window_size=8)
    load_checkpoint(model, source)
    for stage, used in ((0, 8), (1, 4)):
        key = f"layers.{stage}.blocks.0.attn.relative_position_bias_table"
        expected = timm.layers.resize_rel_pos_bias_table_simple(
            source[key], (used, used), ((2 * used - 1) ** 2, source[key].shape[1]))
        table = model.state_dict()[key].reshape(15, 15, -1)
        start = 8 - used
        centre = table[start: start + 2 * used - 1, start: start + 2 * used - 1]
        torch.testing.assert_close(centre.reshape(expected.shape), expected)


def test_non_square_shrunk_window_table_loads_or_names_the_rule(tmp_path):
    # timm at 32x64 with window 8: stage 1 (a 4x8 map) has a 4x8 window, a (7*15, heads) table.
    peer = randomize_(timm_tiny(1, window_size=8, img_size=(32, 64)))
    path = tmp_path / "timm_32x64.pth"
    torch.save(peer.state_dict(), path)
    model = native_tiny(1, window_size=8, img_size=(32, 64), window_rule="timm")
    load_checkpoint(model, path)
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(model, x), logits(peer, x), rtol=1e-5, atol=1e-5)
    # The official rule shrinks that window to 4x4 (a 49-row table): the 105 rows fit nothing.
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    match = rf"(?s){key} in checkpoint {path}.*\(105, 2\).*window_rule='timm'"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(native_tiny(1, window_size=8, img_size=(32, 64)), path)


def test_torchvision_reference_ema_checkpoint_loads_with_prefer_ema(tmp_path):
    # torchvision's reference script saves {"model": ..., "model_ema": AveragedModel(...)}: the
    # EMA state dict has an "n_averaged" counter beside its "module."-prefixed weights.
    from torch.optim.swa_utils import AveragedModel

    peer = randomize_(torchvision_tiny(1))
    ema = AveragedModel(peer)
    randomize_(ema.module, seed=1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": peer.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}, path)
    plain, averaged = native_tiny(1), native_tiny(1)
    load_checkpoint(plain, path)
    assert load_checkpoint(averaged, path, prefer_ema=True).format == "torchvision"
    torch.testing.assert_close(logits(plain, X), logits(peer, X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(averaged, X), logits(ema.module, X), rtol=1e-5, atol=1e-5)


def test_huggingface_v2_folder_config_pretrained_windows_are_checked(tmp_path):
    # The pretrained windows of a Hugging Face Swinv2 live only in its config.json.
    config = hf_config(2, img_size=TINY["img_size"], embed_dim=TINY["embed_dim"],
                       depths=TINY["depths"], num_heads=TINY["num_heads"],
                       window_size=TINY["window_size"], num_classes=TINY_CLASSES)
    config.pretrained_window_sizes = [2, 2]
    peer = randomize_(hf_model(config))
    peer.save_pretrained(tmp_path)
    match = rf"(?s)checkpoint {tmp_path}.*config\.json.*pretrained_window_sizes=\(2, 2\)"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(native_tiny(2), tmp_path)
    model = native_tiny(2, pretrained_window_sizes=(2, 2))
    assert load_checkpoint(model, tmp_path).format == "huggingface"
    torch.testing.assert_close(logits(model, X), logits(peer, X), rtol=1e-5, atol=1e-5)


def test_file_format_is_read_from_its_contents_not_its_suffix(tmp_path):
    # A safetensors file saved as .pth was refused with advice to unpickle it.
    state = randomize_(native_tiny(1)).state_dict()
    save_state_dict(tmp_path / "weights.pth", state)
    torch.save(state, tmp_path / "weights.safetensors")
    for name in ("weights.pth", "weights.safetensors"):
        target = native_tiny(1)
        load_checkpoint(target, tmp_path / name)
        assert_same_state(target.state_dict(), state)


def test_content_errors_name_the_file_and_use_the_documented_classes(tmp_path):
    cases = {
        "empty.pth": ({}, "holds no tensors"),
        "list.pth": ([torch.zeros(1)], "holds a list"),
        "other.pth": ({"conv1.weight": torch.zeros(1)}, "not a Swin checkpoint"),
        "no_embed.pth": ({"layers.0.blocks.0.norm1.weight": torch.zeros(1)},
                         "no patch_embed.proj.weight"),
    }
    for name, (content, reason) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointMismatchError, match=rf"{tmp_path / name}: {reason}"):
            load_checkpoint(native_tiny(1), tmp_path / name)
    # A V2 checkpoint trained at other pretrained windows (its coordinate tables say so).
    peer = timm_tiny(2, pretrained_window_sizes=(2, 2))
    torch.save({"model": official_with_buffers(peer)}, tmp_path / "v2.pth")
    match = rf"checkpoint {tmp_path / 'v2.pth'}: .*pretrained_window_sizes\[0\]=2"
    with pytest.raises(CheckpointMismatchError, match=match):
        load_checkpoint(native_tiny(2), tmp_path / "v2.pth")


def test_convert_names_the_source_file(tmp_path, capsys):
    from winattn.cli.main import main

    source = tmp_path / "demo.pth"
    torch.save(create_named("swin_demo_patch2_window4_16").state_dict(), source)
    assert main(["convert", str(source), str(tmp_path / "o.pth"),
                 "--model", "swin_tiny_patch4_window7_224"]) == 2
    assert f"checkpoint {source} does not fit" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["o.pth", "o.safetensors"])
def test_convert_creates_the_output_folder(name, tmp_path):
    from winattn.cli.main import main

    source = tmp_path / "demo.pth"
    state = randomize_(create_named("swin_demo_patch2_window4_16")).state_dict()
    torch.save(state, source)
    out = tmp_path / "new" / "folder" / name
    assert main(["convert", str(source), str(out)]) == 0
    target = create_named("swin_demo_patch2_window4_16")
    load_checkpoint(target, out)
    assert_same_state(target.state_dict(), state)


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.pth"])
def test_a_truncated_safetensors_file_is_named_as_one(name, tmp_path):
    # Its header length's first byte can be 0x80, a pickle's first byte: it was then read by
    # torch.load, whose error advised unpickling it with weights_only=False.
    from winattn.checkpoints import CheckpointReadError

    save_state_dict(tmp_path / "whole.safetensors", randomize_(native_tiny(1)).state_dict())
    whole = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 3])
    with pytest.raises(CheckpointReadError, match=r"cannot read safetensors file .*cut"):
        load_checkpoint(native_tiny(1), tmp_path / name)


def test_convert_with_model_takes_the_checkpoints_class_count(tmp_path):
    # A fine-tune's 3-class head checked against the variant's default 1000 classes failed.
    from winattn.cli.main import main

    source = tmp_path / "finetuned.pth"
    model = randomize_(create_named("swin_demo_patch2_window4_16", num_classes=3))
    torch.save(model.state_dict(), source)
    assert main(["convert", str(source), str(tmp_path / "o.safetensors"),
                 "--model", "swin_demo_patch2_window4_16"]) == 0
