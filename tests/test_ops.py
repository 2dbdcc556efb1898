"""The windowed-attention operator against its dense float64 oracle, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

import winattn
from winattn.ops import NoBackendError, plan_windows, window_attention
from winattn.ops.backends import reference as reference_module

# (grid, window, shift): non-divisible grids, window = grid, window 1, shift 0 and w//2,
# rectangles, odd sizes, 1-D and 3-D.
CASES = [
    ((14, 14), (7, 7), (3, 3)),
    ((14, 14), (7, 7), (0, 0)),
    ((13, 10), (7, 4), (3, 2)),
    ((7, 7), (7, 7), (0, 0)),
    ((5, 9), (5, 3), (2, 1)),
    ((6, 6), (1, 1), (0, 0)),
    ((11,), (4,), (2,)),
    ((16,), (16,), (0,)),
    ((4, 6, 5), (2, 3, 2), (1, 1, 1)),
    ((3, 5, 7), (3, 2, 4), (0, 1, 2)),
]


def _inputs(grid, window, batch=2, heads=3, head_dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *grid, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    n = math.prod(window)
    bias = torch.randn(heads, n, n, generator=gen, dtype=dtype)
    return q, k, v, bias


@pytest.mark.parametrize("grid,window,shift", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_path_matches_reference_forward(grid, window, shift, with_bias):
    q, k, v, bias = _inputs(grid, window)
    bias = bias if with_bias else None
    expected = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="reference")
    actual = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="sdpa")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,window,shift", CASES[:6] + CASES[8:9])
def test_fast_path_matches_reference_backward(grid, window, shift):
    q, k, v, bias = _inputs(grid, window)
    grads = {}
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = window_attention(*leaves[:3], window, shift_size=shift, bias=leaves[3], backend=backend)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        grads[backend] = [t.grad for t in leaves]
    for name, expected, actual in zip("qkvb", grads["reference"], grads["sdpa"]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=f"grad of {name}")


def _fused_inputs(grid, window, dtype=torch.float64):
    """q, k, v as the three slices of one ``(B, *grid, 3, heads, d)`` projection."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, *grid, 3, 3, 8, generator=gen, dtype=dtype)
    n = math.prod(window)
    return qkv, torch.randn(3, n, n, generator=gen, dtype=dtype)


@pytest.mark.parametrize("grid,window,shift", CASES)
def test_slices_of_one_qkv_take_one_gather_and_match_reference(grid, window, shift):
    from winattn.ops.backends.sdpa import stacked_views

    qkv, bias = _fused_inputs(grid, window)
    q, k, v = qkv.unbind(-3)
    stacked = stacked_views(q, k, v)
    assert stacked is not None and torch.equal(stacked, qkv)
    expected = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="reference")
    actual = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="sdpa")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_stacked_views_refuses_what_is_not_three_slices_of_one_tensor():
    from winattn.ops.backends.sdpa import stacked_views

    qkv, _ = _fused_inputs((4, 6), (2, 3))
    q, k, v = qkv.unbind(-3)
    assert stacked_views(k, q, v) is None  # out of order
    assert stacked_views(q, k, k) is None  # uneven steps
    assert stacked_views(q, k.clone(), v) is None  # another storage
    assert stacked_views(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2)) is None
    other = qkv.transpose(-1, -2).contiguous()  # (.., 3, d, heads)
    assert stacked_views(*other.unbind(-3)) is not None  # any common strides will do
    torch.testing.assert_close(stacked_views(*other.unbind(-3)), other, rtol=0, atol=0)


def test_slices_of_one_qkv_get_correct_gradients():
    grid, window, shift = (13, 10), (7, 4), (3, 2)
    qkv, bias = _fused_inputs(grid, window)
    grads = {}
    for backend in ("reference", "sdpa"):
        leaf = qkv.clone().requires_grad_()
        out = window_attention(*leaf.unbind(-3), window, shift_size=shift, bias=bias,
                               backend=backend)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["sdpa"], grads["reference"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slices_of_one_qkv_in_low_precision_within_tolerance_rule(dtype):
    grid, window, shift = (14, 14), (7, 7), (3, 3)
    qkv, bias = _fused_inputs(grid, window)
    exact = window_attention(*qkv.unbind(-3), window, shift_size=shift, bias=bias,
                             backend="reference")
    low, low_bias = qkv.to(dtype), bias.to(dtype)
    ref_low = window_attention(*low.unbind(-3), window, shift_size=shift, bias=low_bias,
                               backend="reference")
    with torch.no_grad():
        fast_low = window_attention(*low.unbind(-3), window, shift_size=shift, bias=low_bias,
                                    backend="sdpa")
    assert fast_low.dtype == dtype
    ref_err = (ref_low.double() - exact).abs().max().item()
    fast_err = (fast_low.double() - exact).abs().max().item()
    assert fast_err <= 2 * ref_err + 1e-3, (fast_err, ref_err)


@pytest.mark.parametrize("head_dim", [24, 32, 40, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_head_dims_and_batches_float32(head_dim, batch):
    grid, window, shift = (9, 12), (4, 4), (2, 2)
    q, k, v, bias = _inputs(grid, window, batch=batch, head_dim=head_dim)
    expected = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="reference")
    q32, k32, v32, b32 = (t.float() for t in (q, k, v, bias))
    actual = window_attention(q32, k32, v32, window, shift_size=shift, bias=b32, backend="sdpa")
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_tolerance_rule(dtype):
    """Fast path error vs the float64 oracle <= 2x the oracle's own error in the same dtype."""
    grid, window, shift = (14, 14), (7, 7), (3, 3)
    q, k, v, bias = _inputs(grid, window, head_dim=32)
    exact = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend="reference")
    low = [t.to(dtype) for t in (q, k, v, bias)]
    ref_low = window_attention(*low[:3], window, shift_size=shift, bias=low[3], backend="reference")
    fast_low = window_attention(*low[:3], window, shift_size=shift, bias=low[3], backend="sdpa")
    assert fast_low.dtype == dtype
    ref_err = (ref_low.double() - exact).abs().max().item()
    fast_err = (fast_low.double() - exact).abs().max().item()
    assert fast_err <= 2 * ref_err + 1e-3, (fast_err, ref_err)


def test_matches_a_literal_transcription_of_swin():
    """Roll, partition, add the -100 region mask built from slices, attend, reverse, roll back."""
    batch, size, window, shift, heads, head_dim = 2, 8, 4, 2, 2, 8
    q, k, v, bias = _inputs((size, size), (window, window), batch, heads, head_dim)

    def partition(t):  # (B, H, W, h, d) -> (B*nW, h, N, d)
        t = torch.roll(t, (-shift, -shift), dims=(1, 2))
        t = t.view(batch, size // window, window, size // window, window, heads, head_dim)
        t = t.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, window * window, head_dim)
        return t

    img = torch.zeros(size, size)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = count
            count += 1
    ids = img.view(size // window, window, size // window, window).permute(0, 2, 1, 3)
    ids = ids.reshape(-1, window * window)
    mask = (ids[:, None, :] != ids[:, :, None]).double() * -100.0  # (nW, N, N)
    logits = (partition(q) * head_dim**-0.5) @ partition(k).transpose(-1, -2) + bias
    logits = logits.view(batch, -1, heads, window * window, window * window) + mask[:, None]
    out = logits.softmax(-1).view(-1, heads, window * window, window * window) @ partition(v)
    out = out.view(batch, size // window, size // window, heads, window, window, head_dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, size, size, heads, head_dim)
    expected = torch.roll(out, (shift, shift), dims=(1, 2))
    for backend in ("reference", "sdpa"):
        actual = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend=backend)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_padded_keys_are_excluded():
    """Changing what would sit in the padding cannot change the output (it is not an input)."""
    q, k, v, _ = _inputs((5, 5), (4, 4))
    out = window_attention(q, k, v, 4, shift_size=2)
    # The same tokens embedded in a larger grid differ in output: padding is not zero-valued keys.
    q8, k8, v8 = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 3, 0, 3)) for t in (q, k, v))
    out8 = window_attention(q8, k8, v8, 4, shift_size=2)[:, :5, :5]
    assert not torch.allclose(out, out8)
    assert torch.isfinite(out).all()


def test_plans_are_cached_per_shape():
    a = plan_windows((14, 14), (7, 7), (3, 3))
    b = plan_windows((14, 14), (7, 7), (3, 3))
    c = plan_windows((14, 14), (7, 7), (0, 0))
    assert a is b and a is not c
    assert c.mask is None and a.mask is not None
    assert set(a.mask.unique().tolist()) == {0.0, -100.0}


def test_module_wraps_functional():
    q, k, v, bias = _inputs((8, 8), (4, 4))
    op = winattn.WindowAttentionOp(window_size=4, shift_size=2)
    expected = window_attention(q, k, v, 4, shift_size=2, bias=bias)
    torch.testing.assert_close(op(q, k, v, bias), expected)
    assert "window_size=4" in repr(op)


def test_environment_variable_forces_backend(monkeypatch):
    calls = []
    original = reference_module.ReferenceBackend.forward

    def spy(self, call):
        calls.append(call)
        return original(self, call)

    monkeypatch.setattr(reference_module.ReferenceBackend, "forward", spy)
    q, k, v, _ = _inputs((8, 8), (4, 4))
    window_attention(q, k, v, 4)
    assert not calls
    monkeypatch.setenv("WINATTN_BACKEND", "reference")
    window_attention(q, k, v, 4)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_size=9), r"window_size\[0\]=9 is larger than the grid"),
        (dict(window_size=4, shift_size=4), r"shift_size\[0\]=4 does not fit window_size\[0\]=4"),
        (dict(window_size=4, shift_size=-1), r"shift_size\[0\]=-1"),
        (dict(window_size=(4, 4, 4)), r"window_size must be an int or a tuple of 2 ints"),
        (dict(window_size=0), r"window_size\[0\] must be >= 1"),
        (dict(window_size=4, backend="nope"), r"backend='nope' is not one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    q, k, v, _ = _inputs((8, 8), (4, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        window_attention(q, k, v, **kwargs)


def test_bad_tensors_raise_clear_errors():
    q, k, v, bias = _inputs((8, 8), (4, 4))
    with pytest.raises(ValueError, match=r"rank 3"):
        window_attention(q[0, 0], k[0, 0], v[0, 0], 4)
    with pytest.raises(ValueError, match=r"one shape"):
        window_attention(q, k[:1], v, 4)
    with pytest.raises(TypeError, match=r"floating dtype"):
        window_attention(q, k.float(), v, 4)
    with pytest.raises(ValueError, match=r"bias must have shape \(heads, N, N\) = \(3, 16, 16\)"):
        window_attention(q, k, v, 4, bias=bias[:, :8, :8])


def test_refusal_lists_every_reason(monkeypatch):
    monkeypatch.setattr(reference_module, "MAX_DENSE_LOGITS", 10)
    q, k, v, _ = _inputs((8, 8), (4, 4))
    with pytest.raises(NoBackendError, match=r"reference: the dense oracle would hold"):
        window_attention(q, k, v, 4, backend="reference")
