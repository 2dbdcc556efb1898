"""The fused Triton backend against the dense float64 oracle, forward and backward.

Without a GPU the kernels run in Triton's CPU interpreter (numpy, one program after another).
That checks the index arithmetic (padding, shift, partition, region ids), the masks, the online
softmax, the tiling of N and head_dim, the gradient formulas and the d(bias) reduction. It does
not check speed, nor what only compiled code does: tensor-core bfloat16 dots (the interpreter
widens bfloat16 tiles to float32 before tl.dot), register/shared-memory limits, races between
programs. The `gpu` tests run the compiled kernels; `test_kernels_compile_for_sm80` at least
lowers them through ptxas without a GPU.

The interpreter is switched on by a module fixture before the kernels are first imported, and
off again after this module, so the rest of the suite keeps its CPU backends.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from winattn.ops import NoBackendError, make_call, window_attention
from winattn.ops.backends.triton_window import (
    TritonBackend,
    triton_window_attention,
    triton_window_attention_op,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
KERNELS = "winattn.ops.backends.triton_kernels"
AOT_SCRIPT = Path(__file__).with_name("triton_aot.py")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@pytest.fixture(scope="module")
def interpreter():
    """Run the kernels in Triton's interpreter for this module's tests."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if HAS_CUDA:
        pytest.skip("CUDA is present: the gpu tests check the compiled kernels instead")
    loaded = sys.modules.get(KERNELS)
    if loaded is not None and not loaded.INTERPRETED:
        pytest.skip("the kernels were already compiled (not interpreted) in this process")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module(KERNELS)  # jit decorators read the variable at import
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


def _inputs(batch, grid, heads, head_dim, window, *, bias=True, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *grid, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    n = math.prod(window)
    b = torch.randn(heads, n, n, generator=gen, dtype=torch.float64) if bias else None
    return [t if t is None else t.to(device) for t in (q, k, v, b)]


def _run(backend, q, k, v, bias, window, shift, grad_out, dtype, bias_dtype=None):
    """Output and gradients (q, k, v, bias) of one backend in ``dtype``, as float64."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = None
    if bias is not None:
        b = bias.detach().to(bias_dtype or dtype).requires_grad_()
        leaves.append(b)
    out = window_attention(*leaves[:3], window, shift_size=shift, bias=b, backend=backend)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    return [out.double()] + [g.double() for g in grads]


def _normalise(window, grid):
    return (window,) * len(grid) if isinstance(window, int) else window


# (batch, grid, heads, head_dim, window, shift, with_bias). Small: the interpreter runs one
# program at a time.
INTERPRETER_CASES = [
    (1, (8, 8), 2, 16, 4, 0, True),
    (2, (8, 8), 2, 16, 4, 2, True),
    (2, (6, 10), 2, 24, 4, 2, True),  # padding on both axes, with shift
    (1, (6, 10), 2, 24, 4, 0, False),  # padding, no shift, no bias
    (1, (10, 11), 1, 16, 9, 4, True),  # N = 81: two key/query blocks, padded keys in one
    (1, (7, 7), 1, 16, 7, 3, True),  # window = grid
    (1, (3, 4), 1, 16, 1, 0, True),  # window 1
    (1, (20,), 2, 16, 6, 3, True),  # 1-D
    (1, (5, 6, 7), 1, 16, (2, 3, 4), (1, 1, 2), True),  # 3-D
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: f"{c[1]}-w{c[4]}-s{c[5]}-d{c[3]}")
def test_float32_matches_oracle(interpreter, case):
    batch, grid, heads, head_dim, window, shift, with_bias = case
    window = _normalise(window, grid)
    q, k, v, bias = _inputs(batch, grid, heads, head_dim, window, bias=with_bias)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _run("reference", q, k, v, bias, window, shift, grad_out, torch.float64)
    actual = _run("triton", q, k, v, bias, window, shift, grad_out, torch.float32)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dbias"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_region_penalty_is_minus_100_not_minus_inf(interpreter):
    """With logits of order 100 (a large scale, as in SwinV2's cosine attention with a high
    logit scale) the -100 between shift regions does not fully suppress: the output depends on
    its exact value."""
    q, k, v, bias = _inputs(1, (8, 8), 2, 16, (4, 4))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
        out = window_attention(*leaves[:3], 4, shift_size=2, bias=leaves[3], scale=10.0,
                               backend=backend)  # fmt: skip
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        results[backend] = [out.double()] + [g.double() for g in grads]
    for a, e in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dtype,case",
    [
        (torch.float16, INTERPRETER_CASES[2]),
        (torch.bfloat16, INTERPRETER_CASES[2]),
        (torch.float16, INTERPRETER_CASES[4]),  # several tiles: one dtype is enough here
    ],
    ids=["float16-pad", "bfloat16-pad", "float16-N81"],
)
def test_low_precision_within_tolerance_rule(interpreter, dtype, case):
    """Error vs the float64 oracle <= 2x (output) / 3x (gradients) the oracle's own error in
    the same dtype, plus a floor (flash-attention's rule). In the interpreter bfloat16 tiles
    enter tl.dot widened to float32, so this checks the rest of the bfloat16 path only."""
    batch, grid, heads, head_dim, window, shift, with_bias = case
    window = _normalise(window, grid)
    q, k, v, bias = _inputs(batch, grid, heads, head_dim, window, bias=with_bias)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = _run("reference", q, k, v, bias, window, shift, grad_out, torch.float64)
    ref_low = _run("reference", q, k, v, bias, window, shift, grad_out, dtype)
    fast_low = _run("triton", q, k, v, bias, window, shift, grad_out, dtype)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dbias")):
        ref_err = (ref_low[i] - exact[i]).abs().max().item()
        fast_err = (fast_low[i] - exact[i]).abs().max().item()
        factor = 2 if name == "out" else 3
        assert fast_err <= factor * ref_err + 1e-3, (name, fast_err, ref_err)


def test_strided_qkv_views_and_float32_bias_with_half_inputs(interpreter):
    """q, k, v as views of one qkv projection (token stride 3C) are read in place; a float32
    bias with float16 inputs (Swin's bias table) gets a float32 gradient."""
    batch, grid, heads, head_dim = 2, (8, 8), 2, 24
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(batch, *grid, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(heads, 16, 16, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(batch, *grid, heads, head_dim, generator=gen, dtype=torch.float64)

    def run(backend, dtype, bias_dtype):
        x = qkv.to(dtype).requires_grad_()
        b = bias.to(bias_dtype).requires_grad_()
        q, k, v = x.unbind(3)  # each (B, H, W, heads, d), non-contiguous
        out = window_attention(q, k, v, 4, shift_size=2, bias=b, backend=backend)
        gx, gb = torch.autograd.grad(out, [x, b], grad_out.to(dtype))
        return out.double(), gx.double(), gb

    out, gx, gb = run("triton", torch.float32, torch.float32)
    e_out, e_gx, e_gb = run("reference", torch.float64, torch.float64)
    torch.testing.assert_close(out, e_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gx, e_gx, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gb.double(), e_gb, rtol=1e-5, atol=2e-5)

    out, gx, gb = run("triton", torch.float16, torch.float32)
    assert gb.dtype == torch.float32
    r_out, r_gx, _ = run("reference", torch.float16, torch.float32)
    assert (out - e_out).abs().max() <= 2 * (r_out - e_out).abs().max() + 1e-3
    assert (gx - e_gx).abs().max() <= 3 * (r_gx - e_gx).abs().max() + 1e-3


def test_backward_saves_no_attention_matrix(interpreter):
    """What autograd keeps between forward and backward is q, k, v, bias, out and the
    log-sum-exp: nothing that grows with windows x heads x N x N."""
    q, k, v, bias = (t.float().requires_grad_() for t in _inputs(2, (8, 8), 2, 16, (4, 4)))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="triton")
    lse_numel = q.numel() // q.shape[-1]
    assert sorted(saved) == sorted([q.numel()] * 4 + [bias.numel(), lse_numel])
    out.sum().backward()
    assert bias.grad is not None and q.grad is not None


def test_bias_without_grad_and_no_bias(interpreter):
    q, k, v, bias = (t.float() for t in _inputs(1, (8, 8), 2, 16, (4, 4)))
    q.requires_grad_()
    out = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="triton")
    (dq,) = torch.autograd.grad(out.sum(), [q])
    expected = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="reference")
    (e_dq,) = torch.autograd.grad(expected.sum(), [q])
    torch.testing.assert_close(dq, e_dq, rtol=1e-5, atol=2e-5)
    # The op without the dispatcher, and without a bias.
    direct = triton_window_attention(q, k, v, (4, 4), (2, 2), bias=bias)
    torch.testing.assert_close(direct, out, rtol=0, atol=0)
    no_bias = triton_window_attention(q, k, v, (4, 4), (2, 2))
    expected = window_attention(q, k, v, 4, shift_size=2, backend="reference")
    torch.testing.assert_close(no_bias, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_swin_model_on_the_kernel_matches_its_sdpa_path(interpreter, monkeypatch, version):
    """A whole Swin model with every block's attention on the kernel (V1 through the grid
    path, as CUDA takes it; V2 always) against the same model on SDPA: logits and every
    parameter's gradient, on a map that needs padding and shifted windows."""
    from winattn import SwinConfig, SwinTransformer, SwinTransformerV2, SwinV2Config

    torch.manual_seed(0)
    shape = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2,
                 drop_path_rate=0.0, num_classes=5)
    model = (SwinTransformer(SwinConfig(**shape)) if version == "v1"
             else SwinTransformerV2(SwinV2Config(**shape)))
    x = torch.randn(2, 3, 18, 26)
    results = {}
    for backend in ("triton", "sdpa"):
        monkeypatch.setenv("WINATTN_BACKEND", backend)
        model.set_attention_path("grid" if backend == "triton" else "window-order")
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["sdpa"][0], rtol=1e-4, atol=1e-4)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-4,
                                   msg=name)


def test_custom_op_passes_opcheck(interpreter):
    """Schema, fake (meta) function, autograd registration, AOT dispatch with dynamic shapes."""
    q, k, v, bias = (t.float().requires_grad_() for t in _inputs(1, (4, 4), 1, 16, (2, 2)))
    torch.library.opcheck(triton_window_attention_op, (q, k, v, bias, [2, 2], [1, 1], 0.25))


def test_compile_fullgraph_traces_the_op(interpreter):
    """torch.compile(fullgraph=True) traces window_attention (dispatcher included) and the
    forward and backward custom ops (the aot_eager backend: inductor's CPU code generation
    would only add minutes here)."""
    q, k, v, bias = (t.float().requires_grad_() for t in _inputs(1, (8, 8), 2, 16, (4, 4)))

    def loss(q, k, v, bias):
        out = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="triton")
        return out.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(q, k, v, bias), [q, k, v, bias])
    expected_out = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="reference")
    expected = torch.autograd.grad(expected_out.square().sum(), [q, k, v, bias])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=5e-5)


def test_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = (t for t in _inputs(1, (8, 8), 2, 16, (4, 4)))
    reasons = TritonBackend().supports(make_call(q.float(), k.float(), v.float(), 4))
    if HAS_TRITON:
        assert any("not a CUDA tensor" in r for r in reasons), reasons
    else:
        assert reasons == ["triton is not installed"]
    with pytest.raises(NoBackendError, match=r"triton: "):
        window_attention(q.float(), k.float(), v.float(), 4, backend="triton")
    # The dispatcher passes it over for the CPU backends.
    out = window_attention(q.float(), k.float(), v.float(), 4)
    assert out.shape == q.shape


@needs_triton
def test_refusal_reasons_name_dtype_and_head_dim(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 4, 4, 1, 136)
    reasons = TritonBackend().supports(make_call(q, q, q, 2))
    assert reasons == ["head_dim 136 is above 128"]
    q = torch.zeros(1, 4, 4, 1, 16, dtype=torch.float64)
    reasons = TritonBackend().supports(make_call(q, q, q, 2))
    assert reasons == ["dtype torch.float64 is not one of float32, float16, bfloat16"]


def _aot_compile(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(AOT_SCRIPT.parents[1] / "src"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    done = subprocess.run(
        [sys.executable, str(AOT_SCRIPT), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_triton
def test_kernels_compile_for_sm80():
    """The compiled (not interpreted) kernels lower through Triton's compiler and ptxas for an
    Ampere target, without a GPU: catches what the interpreter accepts but the compiler does not
    (non-constexpr globals, dtype mismatches in tl.dot, ...). Forward and dq in float16."""
    _aot_compile("--dtype", "float16", "--arch", "80", "--kernels", "forward", "dq")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("head_dim,window", [(32, 7), (128, 12), (64, 24)])
def test_kernels_compile_matrix(dtype, arch, head_dim, window):
    _aot_compile(
        "--dtype", dtype, "--arch", arch, "--head-dim", str(head_dim), "--window", str(window)
    )


# ----------------------------------------------------------------------------------------------
# Compiled kernels on a GPU: the full matrix.

GPU_CASES = [
    # Swin-T stage shapes (small batch), shifted and not
    (2, (56, 56), 3, 32, 7, 0),
    (2, (56, 56), 3, 32, 7, 3),
    (2, (28, 28), 6, 32, 7, 3),
    (2, (14, 14), 12, 32, 7, 3),
    (2, (7, 7), 24, 32, 7, 0),
    # padding, odd sizes, rectangles
    (3, (30, 45), 4, 24, 7, 3),
    (1, (13, 10), 2, 40, (7, 4), (3, 2)),
    # SwinV2 windows: N = 64, 144, 256, 576
    (2, (32, 32), 4, 64, 8, 4),
    (1, (24, 24), 4, 128, 12, 6),
    (1, (32, 32), 2, 16, 16, 8),
    (1, (48, 48), 2, 64, 24, 12),
    # 1-D, 3-D
    (2, (100,), 2, 64, 16, 8),
    (1, (8, 14, 14), 2, 32, (2, 7, 7), (1, 3, 3)),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[1]}-w{c[4]}-s{c[5]}-d{c[3]}")
def test_gpu_matches_oracle(dtype, case):
    batch, grid, heads, head_dim, window, shift = case
    window = _normalise(window, grid)
    q, k, v, bias = _inputs(batch, grid, heads, head_dim, window, device="cuda")
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).cuda()
    exact = _run("reference", q, k, v, bias, window, shift, grad_out, torch.float64)
    fast = _run("triton", q, k, v, bias, window, shift, grad_out, dtype)
    names = ("out", "dq", "dk", "dv", "dbias")
    if dtype == torch.float32:
        for name, a, e in zip(names, fast, exact):
            torch.testing.assert_close(
                a, e, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )
        return
    ref_low = _run("reference", q, k, v, bias, window, shift, grad_out, dtype)
    for i, name in enumerate(names):
        ref_err = (ref_low[i] - exact[i]).abs().max().item()
        fast_err = (fast[i] - exact[i]).abs().max().item()
        factor = 2 if name == "out" else 3
        assert fast_err <= factor * ref_err + 1e-3, (name, fast_err, ref_err)


@gpu
@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor():
    q, k, v, bias = (
        t.to(torch.bfloat16).requires_grad_()
        for t in _inputs(2, (28, 28), 6, 32, (7, 7), device="cuda")
    )

    def loss(q, k, v, bias):
        out = window_attention(q, k, v, 7, shift_size=3, bias=bias, backend="triton")
        return out.float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v, bias), [q, k, v, bias])
    expected = torch.autograd.grad(loss(q, k, v, bias), [q, k, v, bias])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_training_memory_has_no_attention_matrix():
    """Peak memory of forward + backward stays well below one float32 (batch, windows, heads,
    N, N) attention tensor. With N = 256 and head_dim 16 that tensor is 8x the size of q, k, v
    and out together, so a backend that materialised it would fail."""
    batch, grid, heads, head_dim, window = 4, (64, 64), 2, 16, (16, 16)
    q, k, v, bias = (
        t.to(torch.float16).requires_grad_()
        for t in _inputs(batch, grid, heads, head_dim, window, device="cuda")
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = window_attention(q, k, v, window, shift_size=8, bias=bias, backend="triton")
    out.sum().backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - start
    attention_matrix = batch * 16 * heads * 256 * 256 * 4
    assert growth < attention_matrix / 2, (growth, attention_matrix)
