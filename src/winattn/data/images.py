"""Reading image files as 8-bit RGB, whatever their mode, and telling bad files apart early."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


class BadImageError(ValueError):
    """A file that cannot be decoded as an image."""


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow ships with the train extra
        raise ImportError("winattn's data loading needs Pillow: pip install 'winattn[train]'"
                          ) from err
    return Image


def to_rgb(img):
    """Convert a PIL image of any mode to 8-bit RGB.

    Grayscale is replicated, alpha is dropped (as torchvision's loader does), palettes are
    expanded, and 16/32-bit integer and float images are rescaled to 0..255 rather than clipped
    (``Image.convert`` would clip a 16-bit image to white).
    """
    Image = _pil()
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF open as "I;16*" or "I" (int32 holding 0..65535).
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if arr.size == 0 or arr.max() <= 1.0 else 255.0
        img = Image.fromarray(np.round(np.clip(arr / hi, 0, 1) * 255).astype(np.uint8), mode="L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | os.PathLike):
    """Open ``path`` fully and return an RGB PIL image; raise :class:`BadImageError` if it cannot.

    Args:
        path: an image file.

    Returns:
        A loaded ``PIL.Image.Image`` in mode RGB.
    """
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {str(path)!r}: {err}") from err


def probe_image(path: str | os.PathLike) -> str | None:
    """Cheap scan-time check of the header only: None if it looks like an image, else the reason.

    A file whose header is valid but whose pixel data is truncated passes here and is caught at
    load time instead (see :class:`winattn.data.folder.ImageListDataset`).
    """
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - reading the header is the point
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
