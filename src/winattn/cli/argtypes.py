"""argparse ``type=`` converters shared by the ``winattn`` commands and ``benchmarks/``: a bad
value stops the parser with the argument's name, the value given and what is expected."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from winattn.train.config import folder_problem
from winattn.train.distributed import device_problem


def int_at_least(text: str, lowest: int, expected: str) -> int:
    """``text`` as an int >= ``lowest``, else the parser's error naming ``expected``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lowest:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of repeats, epochs, threads, images)."""
    return int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up calls, worker processes)."""
    return int_at_least(text, 0, "an integer >= 0")


def _finite(text: str, ok, expected: str) -> float:
    """``text`` as a finite float for which ``ok(value)`` holds, else the parser's error.
    ``inf`` and ``nan`` parse as floats but are never a sensible rate, decay or fraction."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    return _finite(text, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a minimum learning rate, weight decay, an alpha, epochs)."""
    return _finite(text, lambda v: v >= 0, "a finite number >= 0")


def unit_interval(text: str) -> float:
    """A number in [0, 1) (label smoothing, drop-path rate, an EMA decay)."""
    return _finite(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def open_fraction(text: str) -> float:
    """A number in (0, 1) (the share of a dataset held out for validation)."""
    return _finite(text, lambda v: 0 < v < 1, "a number in (0, 1)")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether that device exists is checked when the
    command starts (``winattn.train.distributed.resolve_device``)."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but neither it nor what exists of its
    parents may be a file (found now, not after the run)."""
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"expected a folder (it may not exist yet), got {problem}")
    return text


def output_file(text: str) -> str:
    """A file to write: not an existing folder, and its parent must be a folder or creatable
    (found now, not after minutes of work)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file name, got {text!r}, which is a folder")
    problem = folder_problem(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(f"expected a file in a folder, got {text!r}: its parent "
                                         f"is {problem}")
    return text
