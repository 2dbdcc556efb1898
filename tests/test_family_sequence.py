"""1-D windowed attention over sequences: blocked and sliding, causal, sink tokens."""

from __future__ import annotations

import pytest
import torch
from _family_helpers import assert_low_precision_rule, assert_matches_oracle, random_inputs

from winattn import neighborhood_attention, sequence_window_attention, window_attention
from winattn.ops.family_reference import sequence_reference

CASES = [
    # length, window, mode, causal, sinks, batch
    (23, 5, "sliding", False, 0, 2),
    (23, 5, "sliding", True, 3, 1),
    (23, 6, "sliding", True, 0, 2),  # causal windows may be even
    (9, 9, "sliding", False, 2, 1),  # window == sequence
    (23, 4, "blocked", False, 0, 2),  # = window_attention 1-D, last block shorter
    (23, 4, "blocked", True, 2, 1),
    (23, 4, "blocked", False, 3, 2),
    (10, 3, "blocked", True, 0, 1),
    (7, 3, "sliding", True, 7, 1),  # every token a sink
    (40, 7, "sliding", False, 5, 1),  # several tiles, sinks partly inside the early windows
]


def _id(case):
    return "L{}-w{}-{}-causal{}-sinks{}-b{}".format(*case)


def _setup(case, heads=3, head_dim=8):
    length, window, mode, causal, sinks, batch = case
    kwargs = dict(mode=mode, is_causal=causal, num_sink_tokens=sinks)

    def fast(q, k, v):
        return sequence_window_attention(q, k, v, window, **kwargs)

    def oracle(q, k, v):
        return sequence_reference(q, k, v, window, **kwargs)

    return fast, oracle, random_inputs([(batch, length, heads, head_dim)] * 3)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_oracle_float64(case):
    fast, oracle, inputs = _setup(case)
    assert_matches_oracle(fast, oracle, inputs)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=_id)
def test_bfloat16_tolerance_rule(case):
    fast, oracle, inputs = _setup(case)
    assert_low_precision_rule(fast, oracle, inputs)


def test_modes_are_the_window_and_neighbourhood_operators():
    q, k, v = random_inputs([(2, 30, 2, 8)] * 3)
    blocked = sequence_window_attention(q, k, v, 7, mode="blocked")
    torch.testing.assert_close(blocked, window_attention(q, k, v, 7, backend="reference"))
    sliding = sequence_window_attention(q, k, v, 7, mode="sliding", is_causal=True)
    torch.testing.assert_close(sliding, neighborhood_attention(q, k, v, 7, is_causal=True))


def test_causal_output_ignores_the_future():
    q, k, v = random_inputs([(1, 20, 2, 8)] * 3)
    out = sequence_window_attention(q, k, v, 5, is_causal=True, num_sink_tokens=2)
    k2, v2 = k.clone(), v.clone()
    k2[:, 12:], v2[:, 12:] = 7.0, -3.0
    out2 = sequence_window_attention(q, k2, v2, 5, is_causal=True, num_sink_tokens=2)
    torch.testing.assert_close(out[:, :12], out2[:, :12])
    assert not torch.allclose(out[:, 12:], out2[:, 12:])
