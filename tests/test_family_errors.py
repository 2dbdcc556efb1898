"""Bad input to the family's functionals: clear errors naming the argument, the value received
and what was expected."""

from __future__ import annotations

import pytest
import torch

import winattn
from winattn import (
    cross_shaped_window_attention,
    neighborhood_attention,
    sequence_window_attention,
    window_attention_with_globals,
)


def qkv(*shape):
    t = torch.randn(*shape)
    return t, t, t


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((1, 7, 2, 4), dict(kernel_size=9), r"kernel_size\[0\]=9 is larger than the grid \(7"),
        ((1, 6, 9, 2, 4), dict(kernel_size=(3, 11)), r"kernel_size\[1\]=11 is larger.*\(9"),
        (
            (1, 8, 2, 4),
            dict(kernel_size=3, dilation=3),
            r"dilation\[0\]=3 leaves some queries fewer than kernel_size\[0\]=3 keys.*size 8.*"
            r"kernel_size \* dilation <= 8",
        ),
        ((1, 9, 2, 4), dict(kernel_size=4), r"kernel_size\[0\]=4 is even"),
        ((1, 9, 2, 4), dict(kernel_size=3, dilation=0), r"dilation\[0\] must be >= 1, got 0"),
        ((1, 9, 9, 2, 4), dict(kernel_size=(3, 3, 3)), r"kernel_size must be .* 2 ints"),
        ((1, 9, 9, 2, 4), dict(kernel_size=3, is_causal=(True,)), r"is_causal must be .* 2 bools"),
        ((9, 2, 4), dict(kernel_size=3), r"q must be laid out .* got rank 3"),
        ((1, 3, 3, 3, 3, 2, 4), dict(kernel_size=3), r"q must be laid out .* got rank 7"),
    ],
)
def test_neighborhood_errors(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(*qkv(*shape), **kwargs)


def test_neighborhood_bias_errors():
    q, k, v = qkv(1, 9, 9, 2, 4)
    with pytest.raises(ValueError, match=r"bias must have shape .* \(2, 5, 5\) .* got \(2, 5, 3\)"):
        neighborhood_attention(q, k, v, (3, 3), bias=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"bias .* is not defined with causal masking"):
        neighborhood_attention(q, k, v, 3, is_causal=True, bias=torch.zeros(2, 5, 5))


def test_mismatched_shapes_and_dtypes():
    q = torch.randn(1, 9, 2, 4)
    with pytest.raises(ValueError, match=r"q, k and v must have one shape"):
        neighborhood_attention(q, q, torch.randn(1, 9, 3, 4), 3)
    with pytest.raises(TypeError, match=r"one floating dtype"):
        neighborhood_attention(q, q.double(), q, 3)


@pytest.mark.parametrize(
    "global_shape, match",
    [
        ((2, 3, 4, 8), r"global_k has 4 heads .* expected q's 3"),
        ((2, 3, 3, 16), r"global_k has head_dim 16 .* expected q's 8"),
        ((1, 3, 3, 8), r"global_k has batch 1, expected q's batch 2"),
        ((2, 3, 8), r"global_k must be laid out \(batch, num_globals, heads, head_dim\) .* rank 3"),
    ],
)
def test_globals_errors(global_shape, match):
    q, k, v = qkv(2, 6, 6, 3, 8)
    g = torch.randn(*global_shape)
    with pytest.raises(ValueError, match=match):
        window_attention_with_globals(q, k, v, 3, g, g)


def test_globals_value_shape_must_match_keys():
    q, k, v = qkv(2, 6, 6, 3, 8)
    with pytest.raises(ValueError, match=r"global_k and global_v must have one shape"):
        window_attention_with_globals(q, k, v, 3, torch.randn(2, 3, 3, 8), torch.randn(2, 4, 3, 8))


def test_window_errors_still_come_from_window_attention():
    q, k, v = qkv(2, 6, 6, 3, 8)
    g = torch.randn(2, 1, 3, 8)
    with pytest.raises(ValueError, match=r"window_size\[1\]=7 is larger than the grid"):
        window_attention_with_globals(q, k, v, (3, 7), g, g)


def test_cross_shaped_errors():
    with pytest.raises(ValueError, match=r"q has 3 heads; .* expected an even number"):
        cross_shaped_window_attention(*qkv(1, 6, 6, 3, 4), 2)
    with pytest.raises(ValueError, match=r"stripe_width=7 does not fit the grid 6x8; .* <= 6"):
        cross_shaped_window_attention(*qkv(1, 6, 8, 2, 4), 7)
    with pytest.raises(ValueError, match=r"q must be laid out .* 2 grid axes .* got rank 4"):
        cross_shaped_window_attention(*qkv(1, 6, 2, 4), 2)


@pytest.mark.parametrize(
    "shape, args, kwargs, match",
    [
        ((1, 10, 2, 4), (11,), {}, r"window_size=11 does not fit the sequence of length 10"),
        ((1, 10, 2, 4), (4,), {}, r"window_size=4 is even"),
        ((1, 10, 2, 4), (3,), dict(mode="dilated"), r"mode must be one of .* got 'dilated'"),
        ((1, 10, 2, 4), (3,), dict(num_sink_tokens=11), r"num_sink_tokens=11 must be .* \[0, 10\]"),
        ((1, 10, 10, 2, 4), (3,), {}, r"q must be laid out .* 1 grid axes .* got rank 5"),
    ],
)
def test_sequence_errors(shape, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sequence_window_attention(*qkv(*shape), *args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(is_causal="no"), TypeError, r"is_causal must be a bool, got 'no'"),
        (dict(is_causal=1), TypeError, r"is_causal must be a bool, got 1"),
        (dict(num_sink_tokens=True), ValueError, r"num_sink_tokens=True must be an int"),
    ],
)
def test_sequence_flags_are_not_taken_by_truthiness(kwargs, error, match):
    # A string such as "no" is truthy: taken as-is it would run the causal variant.
    with pytest.raises(error, match=match):
        sequence_window_attention(*qkv(1, 10, 2, 4), 3, **kwargs)


@pytest.mark.parametrize("shape", [(0, 6, 6, 2, 4), (1, 6, 6, 0, 4), (1, 6, 6, 2, 0)])
@pytest.mark.parametrize("op", ["window", "neighborhood", "stripes", "globals"])
def test_empty_inputs_give_empty_outputs(op, shape):
    """A batch, head count or head size of 0 gives an empty output shaped as q, as SDPA does,
    and a backward through it runs."""
    q = torch.randn(*shape, requires_grad=True)
    if op == "globals":
        g = torch.randn(shape[0], 2, shape[-2], shape[-1])
        out = winattn.window_attention_with_globals(q, q, q, 3, g, g, shift_size=1)
    elif op == "window":
        out = winattn.window_attention(q, q, q, 3, shift_size=1)
    elif op == "neighborhood":
        out = winattn.neighborhood_attention(q, q, q, 3)
    else:
        out = winattn.cross_shaped_window_attention(q, q, q, 2)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_empty_sequence_gives_an_empty_output():
    q = torch.randn(0, 9, 2, 4, requires_grad=True)
    out = sequence_window_attention(q, q, q, 3, is_causal=True, num_sink_tokens=2)
    assert out.shape == q.shape
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_a_bias_that_is_not_floating_is_refused(dtype):
    # A boolean mask (SDPA's meaning: allowed) would otherwise be added as 0/1 to the logits.
    q = torch.randn(1, 6, 6, 2, 4)
    with pytest.raises(TypeError, match=rf"bias must be a floating tensor .* got {dtype}"):
        winattn.window_attention(q, q, q, 3, bias=torch.ones(2, 9, 9, dtype=dtype))
    with pytest.raises(TypeError, match=rf"bias must be a floating tensor .* got {dtype}"):
        winattn.neighborhood_attention(q, q, q, 3, bias=torch.ones(2, 5, 5, dtype=dtype))


def test_settings_and_layers_name_bad_values():
    from winattn.layers.local_attention import (
        GlobalTokenWindowAttention,
        NeighborhoodAttention,
        WindowAttentionND,
    )
    from winattn.ops.tiles import LocalAttentionSettings

    for kwargs, match in [(dict(tile_size=0), r"tile_size must be >= 1 on every axis, got 0"),
                          (dict(tile_size=(4, -1)), r"tile_size must be >= 1 on every axis"),
                          (dict(max_chunk_logits=0), r"max_chunk_logits must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            LocalAttentionSettings(**kwargs)
    q = torch.randn(1, 6, 6, 2, 4)
    with pytest.raises(TypeError, match=r"settings must be a LocalAttentionSettings or None"):
        neighborhood_attention(q, q, q, 3, settings={"tile_size": 4})
    with pytest.raises(ValueError, match=r"x has 8 channels .* expected the layer's dim=16"):
        NeighborhoodAttention(16, 2, 3)(torch.randn(1, 6, 6, 8))
    # An int window, as the operator takes one (2-D unless ndim says otherwise).
    layer = GlobalTokenWindowAttention(16, 2, 3, num_learned_tokens=2)
    assert layer.window_size == (3, 3) and layer(torch.randn(1, 6, 6, 16)).shape == (1, 6, 6, 16)
    assert WindowAttentionND(16, 2, 3, ndim=3).window_size == (3, 3, 3)
