"""argparse ``type=`` converters shared by the ``winattn`` commands and ``benchmarks/``: a bad
value stops the parser with the argument's name, the value given and what is expected."""

from __future__ import annotations

import argparse

from winattn.train.config import folder_problem


def _at_least(text: str, lowest: int, expected: str) -> int:
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
    return _at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up calls, worker processes)."""
    return _at_least(text, 0, "an integer >= 0")


def output_folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but neither it nor what exists of its
    parents may be a file (found now, not after the run)."""
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"expected a folder (it may not exist yet), got {problem}")
    return text
