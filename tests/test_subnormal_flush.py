"""The float32 softmax of the matmul attention flushes subnormal probabilities to zero, and
changes nothing else: Swin's -100 between shift regions puts logits where exp() is subnormal,
which is slow on x86 CPUs (docs/fast-path.md, item 8), so ``_probabilities`` sets them to -inf first.
"""

from __future__ import annotations

import pytest
import torch

from winattn.ops.backends import sdpa

TINY = torch.finfo(torch.float32).tiny


def _logits_inputs(rows=8, heads=3, tokens=16, head_dim=8, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(rows, heads, tokens, head_dim, generator=gen) * spread for _ in range(3)
    )
    return q, k, v, gen


def _shift_mask(windows, heads, tokens, deep_windows, gen):
    """``(windows, heads, N, N)``: a small bias everywhere, and -100 between two regions of
    the listed windows (the first half of the tokens against the second), as Swin's."""
    mask = torch.randn(windows, heads, tokens, tokens, generator=gen) * 0.5
    half = torch.arange(tokens) < tokens // 2
    across = half[:, None] != half[None, :]
    for w in deep_windows:
        mask[w] = mask[w].masked_fill(across, -100.0) + mask[w] * across
    return mask


def _unflushed(q, k, mask, scale, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(sdpa, "_deep_mask_slots", lambda mask: None)
        return sdpa._probabilities(q, k, mask, scale)


# deep windows: a minority (gathered and scattered back), most of them (the whole tensor), none
@pytest.mark.parametrize("deep_windows", [[3], [0, 1, 3], []])
@pytest.mark.parametrize("mask_heads", [3, 1])
def test_only_subnormal_probabilities_change_and_they_become_zero(
    monkeypatch, deep_windows, mask_heads
):
    q, k, _, gen = _logits_inputs(rows=8)
    mask = _shift_mask(4, mask_heads, 16, deep_windows, gen)
    plain = _unflushed(q, k, mask, 0.35, monkeypatch)
    flushed = sdpa._probabilities(q, k, mask, 0.35)
    subnormal = (plain > 0) & (plain < TINY)
    assert subnormal.any() == bool(deep_windows)  # the case exercises what it says it does
    assert torch.equal(flushed, plain.masked_fill(subnormal, 0.0))
    assert not ((flushed > 0) & (flushed < TINY)).any()


def test_probabilities_that_the_penalty_leaves_normal_are_kept(monkeypatch):
    """-100 does not always suppress (Swin V2's cosine logits reach +-100): where a key across
    regions outscores the row's own region by more than 100 - 87.3, its probability is a
    normal number, and it must survive the flush."""
    q, k, _, gen = _logits_inputs(rows=4, heads=1, tokens=8, head_dim=4)
    mask = _shift_mask(1, 1, 8, [0], gen)
    mask[0, 0, 0, -1] += 95.0  # row 0 now sees key 7 at -5 against its own region
    mask[0, 0, 1, -1] += 20.0  # row 1 sees it 80 below: exp(-80) is still normal
    flushed = sdpa._probabilities(q, k, mask, 0.5)
    plain = _unflushed(q, k, mask, 0.5, monkeypatch)
    reference = (q.double() @ k.double().transpose(-1, -2) * 0.5 + mask.double()).softmax(-1)
    assert (plain[:, 0, :2, -1] >= TINY).all()
    subnormal = (plain > 0) & (plain < TINY)
    assert torch.equal(flushed, plain.masked_fill(subnormal, 0.0))
    torch.testing.assert_close(flushed.double(), reference, rtol=1e-5, atol=1e-7)


def test_gradients_through_a_shift_mask_match_float64():
    q, k, v, gen = _logits_inputs(rows=8, spread=2.0)
    mask = _shift_mask(4, 3, 16, [1, 3], gen).requires_grad_()
    grad = torch.randn(8, 16, 3, 8, generator=gen)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sdpa.attend_qkv(*inputs, mask, 0.35)
    got = torch.autograd.grad(out, [*inputs, mask], grad)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    logits = wide[0] @ wide[1].transpose(-1, -2) * 0.35 + wide[3].repeat(2, 1, 1, 1)
    want_out = (logits.softmax(-1) @ wide[2]).transpose(1, 2)
    want = torch.autograd.grad(want_out, wide, grad.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_deep_slots_follow_in_place_changes_of_the_mask():
    gen = torch.Generator().manual_seed(0)
    mask = _shift_mask(4, 3, 16, [2], gen)
    assert sdpa._deep_mask_slots(mask).tolist() == [6, 7, 8]  # window 2's three heads
    mask.clamp_(min=-1.0)
    assert sdpa._deep_mask_slots(mask) is None
    shared = _shift_mask(4, 1, 16, [0, 3], gen)  # one mask for every head: slots are windows
    assert sdpa._deep_mask_slots(shared).tolist() == [0, 3]
