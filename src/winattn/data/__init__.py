"""Datasets and transforms: the built-in digits demo set, ImageFolder trees and CSV lists."""

from importlib import resources

from winattn.data.digits import DIGITS_CLASS_NAMES, DigitsDataset
from winattn.data.folder import DataError, ImageListDataset, read_csv_dataset, scan_image_folder
from winattn.data.images import BadImageError, load_rgb, to_rgb
from winattn.data.sources import DataSplits, build_datasets
from winattn.data.transforms import SeededTransformDataset, build_transform


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in label order (the names torchvision uses)."""
    text = resources.files("winattn.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


__all__ = [
    "DIGITS_CLASS_NAMES", "BadImageError", "DataError", "DataSplits", "DigitsDataset",
    "ImageListDataset", "SeededTransformDataset", "build_datasets", "build_transform",
    "imagenet_class_names", "load_rgb", "read_csv_dataset", "scan_image_folder", "to_rgb",
]
