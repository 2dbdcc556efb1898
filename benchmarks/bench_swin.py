"""Swin V1: winattn against timm, torchvision and transformers (inference, a training step,
feature extraction vs resolution, the operator alone), in one process on the same weights.

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_swin.py                  # default set, a few minutes
    PYTHONPATH=src python benchmarks/bench_swin.py --preset full    # Swin-T/S/B, more sizes
    PYTHONPATH=src python benchmarks/bench_swin.py --sections inference --threads 2

Every option of ``winattn bench`` applies (``--help``). Writes results.json, results.md and
scaling.png to ``--out`` (default ``bench-results``).
"""

import sys

from winattn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
