"""The built-in demo set: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

The images ship with scikit-learn, so the demo needs no download. They are served as 8x8 RGB
PIL images (gray replicated, 0..16 rescaled to 0..255); the transforms upsample them to the
model's input size, so a digit saved as a PNG and passed to ``winattn predict`` goes through
exactly the pixels the model was validated on.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

DIGITS_CLASS_NAMES = [str(i) for i in range(10)]


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' demo set needs scikit-learn: pip install 'winattn[train]'"
                          ) from err
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return images, bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """One split of the digits set, returning ``(RGB PIL image 8x8, label)``.

    Args:
        split: ``"train"`` or ``"val"``.
        val_fraction: the share held out for validation.
        seed: the split's seed; the same seed gives the same split on every machine.
    """

    def __init__(self, split: str = "train", *, val_fraction: float = 0.2, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
        images, targets = _load_digits()
        order = np.random.default_rng(seed).permutation(len(images))
        num_val = int(round(len(images) * val_fraction))
        keep = order[:num_val] if split == "val" else order[num_val:]
        self.images = images[np.sort(keep)]
        self.targets = targets[np.sort(keep)].tolist()
        self.class_names = list(DIGITS_CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return img, self.targets[index]
