"""Datasets, image decoding and bad input: winattn.data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from winattn.data import (
    DataError,
    DigitsDataset,
    build_datasets,
    build_transform,
    imagenet_class_names,
    load_rgb,
    read_csv_dataset,
    scan_image_folder,
)
from winattn.data.transforms import SeededTransformDataset

CONFIG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "interpolation": "bilinear", "crop_pct": 1.0}


def _png(path, color=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _folder(root, classes=("cat", "dog"), per_class=3):
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i}.png", color=(10 * i, 100, 200))
    return root


# ---- digits -------------------------------------------------------------------------------------
def test_digits_split_is_fixed_disjoint_and_complete():
    train, val = DigitsDataset("train", seed=0), DigitsDataset("val", seed=0)
    assert len(train) + len(val) == 1797
    assert len(val) == round(1797 * 0.2)
    # Same seed, same split; the split holds every image exactly once.
    again = DigitsDataset("val", seed=0)
    assert np.array_equal(again.images, val.images)
    all_imgs = np.concatenate([train.images, val.images]).reshape(1797, -1)
    from sklearn.datasets import load_digits

    ref = np.round(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    as_set = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert as_set(all_imgs) == as_set(ref)
    other = DigitsDataset("val", seed=1)
    assert not np.array_equal(other.images, val.images)
    img, label = val[0]
    assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label <= 9


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataset("val", val_fraction=1.5)


# ---- image modes --------------------------------------------------------------------------------
def test_grayscale_rgba_palette_and_16bit_become_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("RGB", (4, 4), (0, 51, 102)).convert("P").save(tmp_path / "pal.png")
    arr16 = np.full((4, 4), 65535, dtype=np.uint16)
    arr16[0, 0] = 257 * 128
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")

    for name, expect in [("gray.png", (77, 77, 77)), ("rgba.png", (10, 20, 30)),
                         ("pal.png", (0, 51, 102)), ("cmyk.jpg", None)]:
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB", name
        if expect is not None:
            assert img.getpixel((1, 1)) == expect, name
    deep = load_rgb(tmp_path / "deep.png")
    assert deep.mode == "RGB"
    # 16-bit is rescaled, not clipped: 65535 -> 255 and 32896 -> 128.
    assert deep.getpixel((1, 1)) == (255, 255, 255)
    assert deep.getpixel((0, 0)) == (128, 128, 128)


# ---- folders: layout errors ---------------------------------------------------------------------
def test_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_empty_folder_and_missing_train_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="no 'train' sub-folder"):
        build_datasets(tmp_path / "empty")


def test_class_folder_without_images_is_an_error(tmp_path):
    _folder(tmp_path / "train")
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "train" / "empty_class" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match="empty_class.*no readable images"):
        scan_image_folder(tmp_path / "train")


def test_val_class_unknown_to_training_is_an_error(tmp_path):
    _folder(tmp_path / "train", classes=("a", "b"))
    _folder(tmp_path / "val", classes=("a", "c"))
    with pytest.raises(DataError, match=r"\['c'\]"):
        build_datasets(tmp_path)


# ---- bad files ----------------------------------------------------------------------------------
def test_corrupt_and_non_image_files_are_skipped_counted_and_warned(tmp_path):
    root = _folder(tmp_path / "train")
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "readme.md").write_text("hello")
    with pytest.warns(UserWarning, match="skipped 2 unreadable or non-image"):
        ds = scan_image_folder(root)
    assert len(ds) == 6
    assert len(ds.report.skipped) == 2
    assert {p.rsplit("/", 1)[-1] for p, _ in ds.report.skipped} == {"broken.jpg", "readme.md"}
    assert ds.class_names == ["cat", "dog"]
    assert sorted(set(ds.targets)) == [0, 1]


def test_truncated_image_is_replaced_deterministically_at_load(tmp_path):
    root = _folder(tmp_path / "train", per_class=2)
    good = root / "cat" / "0.png"
    data = good.read_bytes()
    big = root / "cat" / "1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(big)
    big.write_bytes(big.read_bytes()[:200])  # valid header, truncated pixel data
    ds = scan_image_folder(root)  # the header passes the scan
    assert len(ds) == 4 and len(data) > 0
    bad_index = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("cat/1.png")][0]
    with pytest.warns(UserWarning, match="using the next readable sample"):
        img, label = ds[bad_index]
    nxt_img, nxt_label = ds[bad_index + 1]
    assert label == nxt_label and np.array_equal(np.asarray(img), np.asarray(nxt_img))
    assert ds.bad_at_load == {bad_index}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not on every visit
        ds[bad_index]


# ---- CSV ----------------------------------------------------------------------------------------
def test_csv_dataset(tmp_path):
    _png(tmp_path / "imgs" / "x.png")
    _png(tmp_path / "imgs" / "y.png")
    (tmp_path / "list.csv").write_text("path,label\nimgs/x.png,zebra\nimgs/y.png,ant\n")
    ds = read_csv_dataset(tmp_path / "list.csv")
    assert ds.class_names == ["ant", "zebra"]
    assert ds.targets == [1, 0]
    (tmp_path / "bad.csv").write_text("imgs/x.png,zebra,extra\n")
    with pytest.raises(DataError, match="line 1: expected 2 columns"):
        read_csv_dataset(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("imgs/x.png,zebra\nimgs/gone.png,ant\n")
    with pytest.warns(UserWarning, match="missing file"):
        ds = read_csv_dataset(tmp_path / "missing.csv")
    assert len(ds) == 1
    splits = build_datasets(tmp_path / "list.csv", val_fraction=0.5)
    assert len(splits.train) == 1 and len(splits.val) == 1


def test_csv_must_be_utf8_and_the_error_names_the_file_and_option(tmp_path):
    _png(tmp_path / "imgs" / "x.png")
    _png(tmp_path / "imgs" / "y.png")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("imgs/x.png,caf\xe9\nimgs/y.png,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"data: CSV file .*latin1.csv' is not UTF-8 text "
                                        r"\(byte 0xe9 at offset 14\)"):
        build_datasets(bad)
    good = tmp_path / "list.csv"
    good.write_text("imgs/x.png,a\nimgs/y.png,b\n")
    with pytest.raises(DataError, match=r"val_data: CSV file .*latin1.csv' is not UTF-8"):
        build_datasets(good, val_data=bad)
    # UTF-8 with a byte-order mark (what spreadsheet programs write) reads as UTF-8.
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,label\nimgs/x.png,café\nimgs/y.png,b\n".encode("utf-8"))
    assert read_csv_dataset(bom).class_names == ["b", "café"]


# ---- transforms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("input_size, crop_pct, interpolation", [
    ((3, 16, 16), 0.9, "bicubic"),    # Swin's published eval settings, at a small size
    ((3, 16, 24), 0.875, "bicubic"),  # a non-square model input
    ((3, 20, 20), 1.0, "bilinear"),   # crop_pct 1 still keeps the aspect ratio
])
def test_eval_transform_is_timms_and_keeps_the_aspect_ratio(input_size, crop_pct, interpolation):
    # build_transform used to squash every image to (H/crop_pct, W/crop_pct); timm (and
    # torchvision's references) scale the image, aspect ratio kept, and cut the centre.
    timm_data = pytest.importorskip("timm.data")
    cfg = {"input_size": input_size, "interpolation": interpolation, "crop_pct": crop_pct,
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    rng = np.random.default_rng(0)
    for shape in ((37, 61, 3), (61, 37, 3)):  # wide and tall
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        theirs = timm_data.create_transform(**cfg, is_training=False, crop_mode="center")
        ours = build_transform(cfg, train=False)
        torch.testing.assert_close(ours(img), theirs(img), rtol=0, atol=1e-6)
        # The pixels before normalisation are the same bytes: PIL's resampling in both.
        theirs_u8 = timm_data.create_transform(**cfg, is_training=False, crop_mode="center",
                                               normalize=False)(img)
        from torchvision.transforms import InterpolationMode

        from winattn.data.transforms import eval_geometry

        _, height, width = input_size
        ours_img = img
        for step in eval_geometry(height, width, crop_pct, InterpolationMode(interpolation)):
            ours_img = step(ours_img)
        assert torch.equal(torch.from_numpy(np.array(ours_img)).permute(2, 0, 1), theirs_u8)


def test_eval_transform_of_a_swin_model_matches_timms_data_config():
    timm = pytest.importorskip("timm")
    import winattn

    name = "swin_tiny_patch4_window7_224"
    theirs = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    ours = winattn.create_model(name).data_config
    for key in ("input_size", "mean", "std"):
        assert tuple(ours[key]) == tuple(theirs[key]), key
    assert (ours["interpolation"], ours["crop_pct"]) == (theirs["interpolation"],
                                                         theirs["crop_pct"]) == ("bicubic", 0.9)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3),
                                                            dtype=np.uint8))
    expected = timm.data.create_transform(**theirs, is_training=False)(img)
    torch.testing.assert_close(build_transform(ours, train=False)(img), expected, rtol=0,
                               atol=1e-6)


def test_seeded_augmentation_depends_only_on_seed_epoch_index():
    base = DigitsDataset("train")
    tf = build_transform(CONFIG, train=True, augment="light")
    a, b = SeededTransformDataset(base, tf, seed=3), SeededTransformDataset(base, tf, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    xa, _ = a[5]
    torch.manual_seed(999)
    xb, _ = b[5]
    assert xa.shape == (3, 16, 16)
    assert torch.equal(xa, xb)
    b.set_epoch(1)
    assert not torch.equal(xa, b[5][0])


def test_eval_transform_center_crop_and_bad_policy():
    cfg = dict(CONFIG, crop_pct=0.875)
    x = build_transform(cfg, train=False)(Image.new("RGB", (40, 30)))
    assert x.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="augment"):
        build_transform(CONFIG, train=True, augment="heavy")


def test_imagenet_names_shipped():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish"
    assert all(names)
