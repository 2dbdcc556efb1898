"""argparse ``type=`` converters shared by the ``winattn`` commands and ``benchmarks/``: a bad
value stops the parser with the argument's name, the value given and what is expected."""

from __future__ import annotations

import argparse

from winattn.train.config import folder_problem


def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of repeats, epochs, threads, images)."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up calls, worker processes)."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def output_folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but neither it nor what exists of its
    parents may be a file (found now, not after the run)."""
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"expected a folder (it may not exist yet), got {problem}")
    return text
