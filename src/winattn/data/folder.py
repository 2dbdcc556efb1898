"""Image datasets from a folder tree (``root/class_name/*.jpg``) or a CSV of ``path,label``.

Bad files never crash an epoch. At scan time, files with a non-image extension and files whose
header cannot be read are skipped, counted and reported in one warning. A file that passes the
scan but fails to decode later (truncated pixel data) is replaced, deterministically, by the next
readable sample in the list, and counted and warned about once.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from winattn.data.images import BadImageError, is_image_name, load_rgb, probe_image


class DataError(ValueError):
    """Bad dataset layout or content; the message names the path and what was expected."""


@dataclass
class ScanReport:
    """What a scan kept and what it skipped (path, reason)."""

    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def warn(self, what: str) -> None:
        if not self.skipped:
            return
        shown = "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
        more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        msg = f"{what}: skipped {len(self.skipped)} unreadable or non-image file(s): {shown}{more}"
        # One channel only: a logging call as well printed the line twice, once through
        # logging's fallback handler when the application configures no logging.
        warnings.warn(msg, stacklevel=3)


class ImageListDataset(Dataset):
    """A list of ``(path, label)`` samples returning ``(RGB PIL image, label)``.

    Args:
        samples: ``(path, class_index)`` pairs.
        class_names: the names of the classes, index = label.
        report: the scan report (skipped files), kept for the caller's summary.
    """

    def __init__(self, samples: list[tuple[str, int]], class_names: list[str],
                 report: ScanReport | None = None):
        if not samples:
            raise DataError("dataset has no readable images")
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.class_names = list(class_names)
        self.report = report or ScanReport(kept=len(samples))
        self.bad_at_load: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self.bad_at_load:
                continue
            path, label = self.samples[i]
            try:
                return load_rgb(path), label
            except BadImageError as err:
                # Runs in a DataLoader worker: the set is per worker, the warning reaches stderr.
                self.bad_at_load.add(i)
                warnings.warn(f"{err}; using the next readable sample instead", stacklevel=2)
        raise DataError("no sample in the dataset could be read")


def _scan_files(files: list[Path], report: ScanReport) -> list[Path]:
    kept = []
    for f in files:
        if not is_image_name(f):
            report.skipped.append((str(f), "not an image extension"))
            continue
        why = probe_image(f)
        if why is not None:
            report.skipped.append((str(f), why))
            continue
        kept.append(f)
    return kept


def scan_image_folder(root: str | os.PathLike, class_names: list[str] | None = None
                      ) -> ImageListDataset:
    """Scan ``root/<class>/...`` (recursively inside each class folder).

    Args:
        root: the folder holding one sub-folder per class.
        class_names: force this class list and order (e.g. the train split's for the val split);
            a class folder that is missing is then an error.

    Raises:
        DataError: missing or empty root, a class folder without readable images, or an unknown
            class in ``root`` when ``class_names`` is given.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders; expected "
                        f"{str(root)!r}/<class_name>/<image files>")
    if class_names is None:
        class_names = found
    else:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise DataError(f"image folder {str(root)!r} has class folder(s) {extra} that are not "
                            f"among the training classes {class_names}")
    report = ScanReport()
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        kept = _scan_files(files, report)
        if not kept:
            raise DataError(f"class folder {str(class_dir)!r} has no readable images "
                            f"(expected image files with one of the usual extensions)")
        samples += [(str(p), label) for p in kept]
    report.kept = len(samples)
    report.warn(f"image folder {str(root)!r}")
    if not samples:
        raise DataError(f"image folder {str(root)!r} has no readable images")
    return ImageListDataset(samples, class_names, report)


def read_csv_dataset(path: str | os.PathLike, class_names: list[str] | None = None, *,
                     argument: str = "data") -> ImageListDataset:
    """Read a UTF-8 CSV of ``path,label`` rows (an optional header row ``path,label`` is skipped;
    a byte-order mark is allowed).

    Relative paths are relative to the CSV's folder. Labels are class names (any strings);
    classes are sorted by name unless ``class_names`` is given. ``argument`` names the option
    the file came from in error messages (``data``, ``val_data``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{argument}: CSV file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{argument}: CSV file {str(path)!r} is not UTF-8 text (byte "
                        f"0x{err.object[err.start]:02x} at offset {err.start}); expected UTF-8 "
                        f"lines 'path,label'") from err
    rows: list[tuple[str, str]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(f"{argument}: CSV file {str(path)!r} line {lineno}: expected 2 "
                            f"columns 'path,label', got {len(row)}: {row!r}")
        p, label = row[0].strip(), row[1].strip()
        if lineno == 1 and (p.lower(), label.lower()) == ("path", "label"):
            continue
        rows.append((p, label))
    if not rows:
        raise DataError(f"{argument}: CSV file {str(path)!r} has no rows; expected lines "
                        f"'path,label'")
    if class_names is None:
        class_names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label in rows} - set(index))
    if unknown:
        raise DataError(f"{argument}: CSV file {str(path)!r} has label(s) {unknown[:10]} that "
                        f"are not among the training classes")
    report = ScanReport()
    samples = []
    for p, label in rows:
        f = Path(p) if os.path.isabs(p) else path.parent / p
        if not f.is_file():
            report.skipped.append((str(f), "missing file"))
            continue
        if _scan_files([f], report):
            samples.append((str(f), index[label]))
    report.kept = len(samples)
    report.warn(f"CSV file {str(path)!r}")
    if not samples:
        raise DataError(f"{argument}: CSV file {str(path)!r} lists no readable images")
    return ImageListDataset(samples, class_names, report)
