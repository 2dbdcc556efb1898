"""The family's fast paths on CUDA against the float64 oracle on CPU; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from _family_helpers import random_inputs

import winattn
from winattn.ops.family_reference import (
    cross_shaped_reference,
    neighborhood_reference,
    sequence_reference,
    window_globals_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CALLS = [
    (
        (2, 9, 11, 2, 16),
        lambda q, k, v: winattn.neighborhood_attention(q, k, v, (3, 5), dilation=(2, 1)),
        lambda q, k, v: neighborhood_reference(q, k, v, (3, 5), dilation=(2, 1)),
    ),
    (
        (2, 7, 9, 4, 16),
        lambda q, k, v: winattn.cross_shaped_window_attention(q, k, v, 2),
        lambda q, k, v: cross_shaped_reference(q, k, v, 2),
    ),
    (
        (2, 40, 2, 16),
        lambda q, k, v: winattn.sequence_window_attention(
            q, k, v, 6, is_causal=True, num_sink_tokens=3
        ),
        lambda q, k, v: sequence_reference(q, k, v, 6, is_causal=True, num_sink_tokens=3),
    ),
]


@pytest.mark.parametrize("index", range(len(CALLS)))
def test_fast_paths_on_cuda_float32(index):
    shape, fast, oracle = CALLS[index]
    q, k, v = random_inputs([shape] * 3)
    expected = oracle(q, k, v)
    out = fast(*(t.float().cuda() for t in (q, k, v)))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-3, atol=1e-3)


def test_globals_on_cuda_float32():
    q, k, v = random_inputs([(2, 7, 9, 2, 16)] * 3)
    gk, gv = random_inputs([(2, 3, 2, 16)] * 2, seed=1)
    expected = window_globals_reference(q, k, v, (3, 4), gk, gv, shift_size=(1, 2))
    out = winattn.window_attention_with_globals(
        *(t.float().cuda() for t in (q, k, v)),
        (3, 4),
        gk.float().cuda(),
        gv.float().cuda(),
        shift_size=(1, 2),
    )
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-3, atol=1e-3)
