"""Window attention plus global keys/values, merged through the log-sum-exp."""

from __future__ import annotations

import math

import pytest
import torch
from _family_helpers import assert_low_precision_rule, assert_matches_oracle, random_inputs

from winattn import window_attention, window_attention_with_globals
from winattn.ops import global_tokens
from winattn.ops.family_reference import dense_attention, window_globals_reference
from winattn.ops.global_tokens import attend_with_lse, merge_by_lse

CASES = [
    # grid, window, shift, globals, batch
    ((7, 9), (3, 4), (1, 2), 3, 2),  # padded and shifted
    ((8,), 3, 1, 1, 1),  # 1-D, one global token
    ((4, 5, 6), (2, 3, 3), (1, 1, 1), 2, 1),
    ((6, 6), 6, 0, 5, 2),  # window == grid
    ((14, 14), 7, 3, 4, 1),
]


def _id(case):
    return "g{}-w{}-s{}-G{}-b{}".format(*case)


def _setup(case, heads=2, head_dim=8):
    grid, window, shift, num_globals, batch = case
    window_t = (window,) * len(grid) if isinstance(window, int) else window
    tokens = math.prod(window_t)
    shapes = [(batch, *grid, heads, head_dim)] * 3 + [(batch, num_globals, heads, head_dim)] * 2
    shapes.append((heads, tokens, tokens))

    def fast(q, k, v, gk, gv, bias):
        return window_attention_with_globals(q, k, v, window, gk, gv, shift_size=shift, bias=bias)

    def oracle(q, k, v, gk, gv, bias):
        return window_globals_reference(q, k, v, window, gk, gv, shift_size=shift, bias=bias)

    return fast, oracle, random_inputs(shapes)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_oracle_float64(case):
    fast, oracle, inputs = _setup(case)
    assert_matches_oracle(fast, oracle, inputs)


def test_matches_oracle_float32():
    fast, oracle, inputs = _setup(CASES[0])
    assert_matches_oracle(fast, oracle, inputs, dtype=torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=_id)
def test_bfloat16_tolerance_rule(case):
    fast, oracle, inputs = _setup(case)
    assert_low_precision_rule(fast, oracle, inputs)


def test_merge_by_lse_is_one_softmax_over_the_union():
    q, k, v = random_inputs([(3, 5, 8), (3, 11, 8), (3, 11, 8)])
    allowed = torch.ones(5, 11, dtype=torch.bool)
    out_a, lse_a = attend_with_lse(q, k[:, :4], v[:, :4], None, 0.3)
    out_b, lse_b = attend_with_lse(q, k[:, 4:], v[:, 4:], None, 0.3)
    whole = dense_attention(
        q.view(3, 5, 1, 8), k.view(3, 11, 1, 8), v.view(3, 11, 1, 8), allowed, scale=0.3
    )
    torch.testing.assert_close(merge_by_lse(out_a, lse_a, out_b, lse_b), whole.view(3, 5, 8))
    torch.testing.assert_close(lse_a, torch.logsumexp(0.3 * q @ k[:, :4].transpose(1, 2), -1))


def test_globals_that_no_query_prefers_leave_window_attention():
    """Global keys with logits far below the window's: the output is window_attention's."""
    q, k, v = random_inputs([(1, 7, 9, 2, 8)] * 3)
    q, k = q.abs(), k.abs()  # window logits > 0, global logits < -50 * |q|_1 / sqrt(d)
    global_k = torch.full((1, 2, 2, 8), -50.0, dtype=q.dtype)
    out = window_attention_with_globals(q, k, v, (3, 4), global_k, v[:, 0, :2])
    torch.testing.assert_close(out, window_attention(q, k, v, (3, 4)))


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_path_matches_oracle(case, dtype, monkeypatch):
    """Without autograd the CPU path runs both parts through the fused kernel."""
    served = []
    original = global_tokens._fused_forward

    def recording(*args):
        out = original(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(global_tokens, "_fused_forward", recording)
    fast, oracle, inputs = _setup(case)
    expected = oracle(*inputs)
    with torch.no_grad():
        out = fast(*(t.to(dtype) for t in inputs)).double()
    assert served == [True]
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out, expected, **tol)


def test_inference_path_bfloat16_tolerance_rule():
    fast, oracle, inputs = _setup(CASES[0])
    expected = oracle(*inputs)
    low = [t.to(torch.bfloat16) for t in inputs]
    with torch.no_grad():
        err = (fast(*low).double() - expected).abs().max().item()
        ref_err = (oracle(*low).double() - expected).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
