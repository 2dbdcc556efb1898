"""Rectangles and stripes: windows with a different extent per axis through window_attention,
and CSWin's cross-shaped windows."""

from __future__ import annotations

import math

import pytest
import torch
from _family_helpers import assert_low_precision_rule, assert_matches_oracle, random_inputs

from winattn import cross_shaped_window_attention, window_attention
from winattn.ops.family_reference import cross_shaped_reference

RECTANGLES = [
    # grid, window, shift
    ((7, 10), (2, 5), (0, 0)),
    ((7, 10), (2, 5), (1, 2)),
    ((9, 8), (1, 8), (0, 0)),  # horizontal stripes of height 1
    ((9, 8), (9, 3), (0, 1)),  # vertical stripes, grid not divisible by the width
    ((6, 7, 5), (2, 7, 1), (1, 3, 0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid, window, shift", RECTANGLES)
def test_rectangular_windows_match_the_oracle(grid, window, shift, dtype):
    heads, tokens = 2, math.prod(window)
    inputs = random_inputs([(2, *grid, heads, 8)] * 3 + [(heads, tokens, tokens)])

    def run(backend):
        return lambda q, k, v, bias: window_attention(
            q, k, v, window, shift_size=shift, bias=bias, backend=backend
        )

    assert_matches_oracle(run("sdpa"), run("reference"), inputs, dtype=dtype)


CSWIN = [
    # height, width, stripe width, heads, batch
    (7, 9, 2, 4, 2),
    (8, 8, 3, 2, 1),
    (5, 6, 1, 6, 1),
    (6, 6, 6, 2, 2),  # stripe == grid: both halves are global
    (14, 14, 7, 4, 1),
]


@pytest.mark.parametrize("height, width, stripe, heads, batch", CSWIN)
def test_cross_shaped_matches_oracle(height, width, stripe, heads, batch):
    inputs = random_inputs([(batch, height, width, heads, 8)] * 3)
    assert_matches_oracle(
        lambda q, k, v: cross_shaped_window_attention(q, k, v, stripe),
        lambda q, k, v: cross_shaped_reference(q, k, v, stripe),
        inputs,
    )


def test_cross_shaped_bfloat16_tolerance_rule():
    inputs = random_inputs([(2, 7, 9, 4, 16)] * 3)
    assert_low_precision_rule(
        lambda q, k, v: cross_shaped_window_attention(q, k, v, 2),
        lambda q, k, v: cross_shaped_reference(q, k, v, 2),
        inputs,
    )


def test_cross_shaped_heads_follow_cswin_branch_order():
    """Head 0 (first half) sees its column stripe: a key change outside the column stripe but in
    the row stripe moves only the second half of the heads."""
    q, k, v = random_inputs([(1, 6, 6, 2, 4)] * 3)
    out = cross_shaped_window_attention(q, k, v, 2)
    v2 = v.clone()
    v2[0, 0, 5] += 10.0  # row stripe 0, column stripe 2
    out2 = cross_shaped_window_attention(q, k, v2, 2)
    changed = (out2 - out).abs().amax(dim=-1)[0]  # (H, W, heads)
    assert torch.equal(changed[:, :, 0] > 0, torch.arange(6).view(1, 6).expand(6, 6) >= 4)
    assert torch.equal(changed[:, :, 1] > 0, torch.arange(6).view(6, 1).expand(6, 6) < 2)
