"""The fast path against the dense oracle: the grid-layout operator (forward and backward,
the recompute-in-backward Function included) and the window-order Swin stages."""

from __future__ import annotations

import pytest
import torch

from winattn import window_attention
from winattn.ops.backends.sdpa import attend_qkv, expand_to_batch
from winattn.ops.geometry import padded_token_mask, plan_windows, transition_index

CASES = [
    # (grid, window, shift, heads, head_dim)
    ((14, 14), (7, 7), (3, 3), 3, 32),
    ((14, 14), (7, 7), (0, 0), 2, 24),
    ((9, 11), (4, 3), (2, 1), 2, 40),
    ((5, 6), (5, 6), (0, 0), 1, 64),
    ((6, 5), (1, 1), (0, 0), 2, 16),
    ((12,), (5,), (2,), 2, 32),
    ((4, 6, 5), (2, 3, 5), (1, 1, 0), 2, 24),
]


def _inputs(grid, heads, head_dim, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *grid, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    return q, k, v, gen


@pytest.mark.parametrize("grid, window, shift, heads, head_dim", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_match_reference(grid, window, shift, heads, head_dim, batch):
    q, k, v, gen = _inputs(grid, heads, head_dim, batch)
    tokens = 1
    for w in window:
        tokens *= w
    bias = torch.randn(heads, tokens, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = window_attention(
            *leaves[:3], window, shift_size=shift, bias=leaves[3], backend=backend
        )
        out.backward(grad)
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for name, ref, fast in zip(("out", "dq", "dk", "dv", "dbias"), *results.values()):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9, msg=name)


def test_float32_forward_matches_reference_without_grad():
    q, k, v, _ = _inputs((14, 21), 3, 32, batch=2, dtype=torch.float32)
    ref = window_attention(q.double(), k.double(), v.double(), 7, shift_size=3, backend="reference")
    with torch.no_grad():
        fast = window_attention(q, k, v, 7, shift_size=3, backend="sdpa")
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)


def test_transition_index_moves_tokens_between_orders():
    plain = plan_windows((14, 21), (7, 7), (0, 0))
    shifted = plan_windows((14, 21), (7, 7), (3, 3))
    grid = torch.arange(14 * 21).view(1, 14, 21, 1)
    in_plain = plain.partition(grid).reshape(1, -1, 1)
    moved = in_plain.index_select(1, transition_index(plain, shifted))
    torch.testing.assert_close(moved, shifted.partition(grid).reshape(1, -1, 1))
    with pytest.raises(ValueError, match="different grids"):
        transition_index(plain, plan_windows((14, 14), (7, 7), (0, 0)))


def test_padded_token_mask_marks_exactly_the_padding():
    plan = plan_windows((14, 14), (7, 7), (3, 3))
    outside = padded_token_mask(plan, (12, 13))
    grid = torch.zeros(1, 14, 14, 1, dtype=torch.bool)
    grid[:, 12:] = True
    grid[:, :, 13:] = True
    torch.testing.assert_close(outside, plan.partition(grid).reshape(-1, 1))
    assert padded_token_mask(plan, (14, 14)) is None


def test_attend_qkv_per_window_mask_gradient_sums_over_batch():
    gen = torch.Generator().manual_seed(1)
    batch, windows, heads, tokens, head_dim = 3, 4, 2, 9, 8
    qkv = torch.randn(batch * windows, tokens, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    mask = torch.randn(windows, heads, tokens, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch * windows, tokens, heads, head_dim, generator=gen, dtype=torch.float64)

    def dense(qkv, mask):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d)
        logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + expand_to_batch(mask, batch * windows)
        return (logits.softmax(-1) @ v).transpose(1, 2)

    got, want = [], []
    for fn, sink in ((None, got), (dense, want)):
        leaves = [qkv.clone().requires_grad_(), mask.clone().requires_grad_()]
        if fn is None:
            q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
            out = attend_qkv(q, k, v, leaves[1], head_dim**-0.5)
        else:
            out = fn(*leaves)
        out.backward(grad)
        sink += [out.detach(), leaves[0].grad, leaves[1].grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
