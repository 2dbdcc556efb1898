"""The family's layer modules: each is its projections around one functional, trains (every
parameter gets a gradient), and equals the projections around the dense oracle."""

from __future__ import annotations

import pytest
import torch

from winattn.layers.local_attention import (
    CrossShapedWindowAttention,
    GlobalTokenWindowAttention,
    NeighborhoodAttention,
    SequenceWindowAttention,
    WindowAttentionND,
)
from winattn.ops.family_reference import (
    cross_shaped_reference,
    neighborhood_reference,
    sequence_reference,
)

LAYERS = [
    (lambda: NeighborhoodAttention(32, 4, 5, dilation=(2, 1)), (2, 11, 9, 32)),
    (
        lambda: NeighborhoodAttention(
            32, 2, 3, ndim=3, is_causal=(True, False, False), rel_pos_bias=False
        ),
        (1, 4, 5, 6, 32),
    ),
    (lambda: NeighborhoodAttention(32, 2, 5, ndim=1), (2, 13, 32)),
    (lambda: CrossShapedWindowAttention(32, 4, 3), (2, 7, 9, 32)),
    (lambda: WindowAttentionND(32, 2, (2, 3, 3), (1, 1, 1)), (1, 4, 6, 7, 32)),
    (
        lambda: GlobalTokenWindowAttention(
            32, 4, (3, 4), (1, 2), num_learned_tokens=2, pool_size=3
        ),
        (2, 7, 9, 32),
    ),
    (lambda: SequenceWindowAttention(32, 4, 6, is_causal=True, num_sink_tokens=2), (2, 20, 32)),
]


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_layer_trains(index):
    make, shape = LAYERS[index]
    torch.manual_seed(index)
    layer = make()
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.state_dict().keys() == dict(layer.named_parameters()).keys()


def _oracle_layer(layer, oracle, x):
    q, k, v = layer.split_qkv(x)
    return layer.merge_heads(oracle(q, k, v))


def test_neighborhood_layer_is_projections_around_the_oracle():
    torch.manual_seed(0)
    layer = NeighborhoodAttention(24, 3, (3, 5), dilation=(2, 1)).double()
    x = torch.randn(2, 9, 8, 24, dtype=torch.float64)
    expected = _oracle_layer(
        layer,
        lambda q, k, v: neighborhood_reference(q, k, v, (3, 5), dilation=(2, 1), bias=layer.rpb),
        x,
    )
    torch.testing.assert_close(layer(x), expected)
    assert tuple(layer.rpb.shape) == (3, 5, 9)


def test_cross_shaped_and_sequence_layers_match_oracles():
    torch.manual_seed(0)
    cswin = CrossShapedWindowAttention(16, 2, 2).double()
    x = torch.randn(1, 5, 7, 16, dtype=torch.float64)
    expected = _oracle_layer(cswin, lambda q, k, v: cross_shaped_reference(q, k, v, 2), x)
    torch.testing.assert_close(cswin(x), expected)
    seq = SequenceWindowAttention(16, 2, 4, mode="blocked", is_causal=True, num_sink_tokens=3)
    seq = seq.double()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    expected = _oracle_layer(
        seq,
        lambda q, k, v: sequence_reference(
            q, k, v, 4, mode="blocked", is_causal=True, num_sink_tokens=3
        ),
        x,
    )
    torch.testing.assert_close(seq(x), expected)


def test_causal_neighbourhood_layer_refuses_a_bias_table():
    with pytest.raises(ValueError, match="rel_pos_bias=True is not defined with causal"):
        NeighborhoodAttention(16, 2, 3, is_causal=True)
