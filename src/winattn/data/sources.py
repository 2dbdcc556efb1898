"""Turn the ``--data`` argument into train and validation datasets.

``--data`` is one of:

* ``digits``: scikit-learn's 8x8 digits, split train/val with a fixed seed;
* a folder with ``train/`` and (optionally) ``val/``, each laid out as ``<class>/<images>``;
* a CSV file of ``path,label`` rows (with ``--val-data`` for a second CSV).

Without an explicit validation set, a fixed-seed share ``val_fraction`` of the training samples is
held out (stratified by nothing, the same on every machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from winattn.data.digits import DIGITS_CLASS_NAMES, DigitsDataset
from winattn.data.folder import DataError, read_csv_dataset, scan_image_folder


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]
    kind: str  # "digits", "folder" or "csv"


def _split(dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    num_val = max(1, int(round(len(dataset) * val_fraction)))
    if num_val >= len(dataset):
        raise DataError(f"cannot hold out {val_fraction:.0%} of {len(dataset)} samples and "
                        f"keep some for training")
    return (Subset(dataset, np.sort(order[num_val:]).tolist()),
            Subset(dataset, np.sort(order[:num_val]).tolist()))


def _read_any(path: Path, class_names: list[str] | None, argument: str):
    if path.is_dir():
        return scan_image_folder(path, class_names)
    if path.suffix.lower() == ".csv":
        return read_csv_dataset(path, class_names, argument=argument)
    raise DataError(f"{argument}: expected 'digits', a folder, or a .csv file, got {str(path)!r}")


def build_datasets(data: str | os.PathLike, *, val_data: str | os.PathLike | None = None,
                   val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """Build the raw (untransformed) train and val datasets named by ``data``.

    Raises:
        DataError: the path is missing, has the wrong layout, or holds no readable images.
    """
    if str(data) == "digits":
        return DataSplits(DigitsDataset("train", val_fraction=val_fraction, seed=seed),
                          DigitsDataset("val", val_fraction=val_fraction, seed=seed),
                          list(DIGITS_CLASS_NAMES), "digits")
    path = Path(data)
    if not path.exists():
        raise DataError(f"data: {str(path)!r} does not exist; expected 'digits', a folder with "
                        f"train/ and val/ sub-folders, or a CSV of path,label")
    if path.is_dir():
        train_dir = path / "train"
        if not train_dir.is_dir():
            raise DataError(f"data: folder {str(path)!r} has no 'train' sub-folder; expected "
                            f"{str(path)}/train/<class>/<images> and {str(path)}/val/<class>/...")
        train = scan_image_folder(train_dir)
        kind = "folder"
        val_path = Path(val_data) if val_data is not None else path / "val"
        if val_data is None and not val_path.is_dir():
            val_path = None
    else:
        train = _read_any(path, None, "data")
        kind = "csv"
        val_path = Path(val_data) if val_data is not None else None
    if val_path is None:
        train_set, val_set = _split(train, val_fraction, seed)
    else:
        if not val_path.exists():
            raise DataError(f"val_data: {str(val_path)!r} does not exist")
        train_set, val_set = train, _read_any(val_path, train.class_names, "val_data")
    return DataSplits(train_set, val_set, train.class_names, kind)
