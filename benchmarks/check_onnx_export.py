"""Export a full-size model once with dynamic batch/height/width and compare onnxruntime with
eager PyTorch at several sizes; prints the export time and the largest difference per size.

    PYTHONPATH=src python benchmarks/check_onnx_export.py swin_tiny_patch4_window7_224 \\
        1x224x224 2x160x160 1x512x384 1x100x300

Weights are random but non-trivial (tests/swin_peers.randomize_: biases, norms and V2 logit
scales away from their inits), so a wrong bias or scale in the graph would show. Sizes are
``BxHxW``; the column ``exact-by-rule`` is :func:`winattn.export.dynamic_graph_is_exact`.
Needs onnx, onnxscript and onnxruntime (the test extras).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import winattn
from winattn.export import dynamic_graph_is_exact

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import swin_peers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("sizes", nargs="+", help="BxHxW, e.g. 2x160x160")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = swin_peers.randomize_(winattn.create_model(args.model), straddle_clamp=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = winattn.export_onnx(model, Path(tmp) / "model.onnx", opset=args.opset)
        seconds = time.perf_counter() - start
        print(f"{args.model}: export {seconds:.0f} s (torch {torch.__version__}, "
              f"onnxruntime {ort.__version__}, {torch.get_num_threads()} threads)")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for spec in args.sizes:
            batch, height, width = map(int, spec.split("x"))
            x = torch.randn(batch, 3, height, width)
            with torch.no_grad():
                expected = model(x).numpy()
            got = session.run(None, {"images": x.numpy()})[0]
            print(f"  {batch}x3x{height}x{width}: "
                  f"exact-by-rule={dynamic_graph_is_exact(model, height, width)} "
                  f"max|onnxruntime - eager| = {np.abs(got - expected).max():.1e}")


if __name__ == "__main__":
    main()
