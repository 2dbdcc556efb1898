"""Export and compilation: the shape-generic operator path, ONNX with dynamic sizes, torch.compile.

Kept cheap: tiny two-stage models (window 4, stride 8), the "eager" compile backend.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import swin_peers
import torch

import winattn
from winattn.export import dynamic_graph_is_exact, example_size, stage_sizes
from winattn.models.swin import SwinConfig, SwinTransformer
from winattn.models.swin_v2 import SwinTransformerV2, SwinV2Config
from winattn.ops import window_attention
from winattn.ops.traceable import shape_generic, traceable_window_attention

TINY = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


randomize_ = functools.partial(swin_peers.randomize_, straddle_clamp=True)


def tiny(version: int, window_rule: str = "official") -> torch.nn.Module:
    if version == 1:
        return randomize_(SwinTransformer(SwinConfig(**TINY, window_rule=window_rule)))
    return randomize_(SwinTransformerV2(SwinV2Config(**TINY, window_rule=window_rule)))


# Sizes that put TINY's two stages (window 4; maps of side/4 and side/8) in every regime:
# larger than the window, equal to it (shift dropped), square below it (window shrunk),
# non-square with one side below it, and both below it but unequal.
REGIME_SIZES = [(57, 43), (96, 72), (32, 32), (20, 20), (4, 4), (8, 40), (13, 17), (24, 28)]


# ---------------------------------------------------------------- the shape-generic path
@pytest.mark.parametrize(
    "grid,window,shift",
    [
        ((14, 14), (7, 7), (3, 3)),
        ((13, 10), (7, 4), (3, 2)),  # padded on both axes, shifted
        ((9,), (4,), (2,)),
        ((6, 7, 5), (2, 3, 5), (1, 1, 0)),
        ((8, 8), (8, 8), (0, 0)),  # window equal to the grid
        ((5, 9), (1, 3), (0, 1)),  # window 1
    ],
)
def test_traceable_path_matches_reference(grid, window, shift):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *grid, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    tokens = math.prod(window)
    bias = torch.randn(3, tokens, tokens, generator=gen, dtype=torch.float64)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    expected = window_attention(q, k, v, window, shift_size=shift, bias=bias, scale=0.3,
                                backend="reference")
    got = traceable_window_attention(q, k, v, window, shift, bias, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(expected, (q, k, v, bias), grad)
    have = torch.autograd.grad(got, (q, k, v, bias), grad)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window_rule", ["official", "timm", "torchvision"])
@pytest.mark.parametrize("version", [1, 2])
def test_traced_window_decisions_match_eager(version, window_rule):
    """The path an exported graph takes (window decisions as tensors of the size) computes the
    eager model at every size that dynamic_graph_is_exact promises, and only there."""
    torch.manual_seed(0)
    model = tiny(version, window_rule).eval()
    for height, width in REGIME_SIZES:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            eager = model(x)
            with shape_generic():
                traced = model(x)
        if dynamic_graph_is_exact(model, height, width):
            torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)
        else:
            # Only "official" on a non-square map below the window, where the official window
            # depends on the input; the graph shrinks per axis there instead.
            assert window_rule == "official"
            assert (traced - eager).abs().max() > 1e-3


def test_dynamic_graph_is_exact_names_the_official_non_square_shrink():
    model = tiny(1)
    assert stage_sizes(model, 24, 28) == [(6, 7), (3, 4)]
    assert not dynamic_graph_is_exact(model, 24, 28)  # (3, 4): shorter side below 4
    assert dynamic_graph_is_exact(model, 20, 20)  # square: the shrunk window is the map
    assert dynamic_graph_is_exact(model, 32, 40)  # (4, 5): shorter side equals the window
    assert dynamic_graph_is_exact(tiny(1, "timm"), 24, 28)


# ---------------------------------------------------------------- ONNX
def test_export_rejects_old_opset(tmp_path):
    with pytest.raises(ValueError, match=r"opset=16 .*>= 17"):
        winattn.export_onnx(tiny(2), tmp_path / "m.onnx", opset=16)


def test_example_size_is_the_own_size_made_non_square():
    model = tiny(1)
    assert example_size(model) == (32, 36)


def _onnx_matches(version: int, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny(version)
    path = winattn.export_onnx(model, tmp_path / "model.onnx", opset=18)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # Every regime: above the window, the model's own size (last map = window: no shift),
    # square below it (window shrunk), odd and non-square sides, three batch sizes.
    sizes = [(1, 40, 56), (3, 57, 43), (2, 96, 72), (1, 32, 32), (2, 20, 20), (1, 4, 4)]
    for batch, height, width in sizes:
        assert dynamic_graph_is_exact(model, height, width)
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_v2_one_file_three_resolutions(tmp_path):
    _onnx_matches(2, tmp_path)


def test_onnx_v1_one_file_three_resolutions(tmp_path):
    _onnx_matches(1, tmp_path)


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("version", [2, 1])
def test_compile_fullgraph_no_recompile_across_resolutions(version):
    """One graph for three resolutions with dynamic shapes (no per-shape recompiles)."""
    # One stage keeps the trace short; the merging layers are traced by the ONNX tests.
    overrides = {**TINY, "depths": (2,), "num_heads": (1,)}
    if version == 1:
        model = randomize_(SwinTransformer(SwinConfig(**overrides)))
    else:
        model = randomize_(SwinTransformerV2(SwinV2Config(**overrides)))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=True)
    # Batch 2 and height != width: a size of 1 or two equal sizes would be specialised.
    for height, width in [(48, 40), (64, 88), (57, 43)]:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert len(graphs) == 1
    # Into the regime where the map's height is the window (one window, no shift): the window
    # decision is a tensor in the graph, but PyTorch specialises a window count of 1 (a
    # contiguity guard), so this costs exactly one more graph; back to the first regime, none.
    for height, width in [(16, 20), (16, 28), (40, 48)]:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert len(graphs) == 2
