"""The windowed-attention operator alone at Swin-T's stage-1 and stage-3 shapes: winattn's
grid-layout call and its window-order call against the peers' roll / partition / matmul /
softmax / reverse / roll-back path and against one SDPA call with a dense mask.

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bench_op.py [--repeats 9] [--out bench-results/op]
"""

import sys

from winattn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--sections", "operator", *sys.argv[1:]]))
