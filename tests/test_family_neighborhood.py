"""Neighbourhood attention (NAT / DiNAT): the oracle against NATTEN's own index functions, and
the tiled fast path against the oracle, forward and backward."""

from __future__ import annotations

import functools

import pytest
import torch
from _family_helpers import assert_low_precision_rule, assert_matches_oracle, random_inputs

from winattn import LocalAttentionSettings, neighborhood_attention
from winattn.ops.family_reference import neighborhood_1d, neighborhood_reference


# --- NATTEN's definition, transcribed literally from its naive kernels (natten/cuda/naive) ----
def natten_get_window_start(index, length, kernel_size, neighborhood_size, dilation):
    if dilation <= 1:
        return max(index - neighborhood_size, 0) + (index + neighborhood_size >= length) * (
            length - index - neighborhood_size - 1
        )
    ni = index - neighborhood_size * dilation
    if ni < 0:
        return index % dilation
    if index + neighborhood_size * dilation >= length:
        imodd = index % dilation
        a = int(length / dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * neighborhood_size * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_get_pb_start(index, length, kernel_size, neighborhood_size, dilation):
    if dilation <= 1:
        return (
            neighborhood_size
            + (index < neighborhood_size) * (neighborhood_size - index)
            + (index + neighborhood_size >= length) * (length - index - 1 - neighborhood_size)
        )
    if index - neighborhood_size * dilation < 0:
        return kernel_size - 1 - (index // dilation)
    if index + neighborhood_size * dilation >= length:
        return (length - index - 1) // dilation
    return neighborhood_size


def natten_causal_keys(index, length, kernel_size, dilation):
    """NATTEN's causal mask (its flex-attention mask_mod), for one query."""
    return [
        j
        for j in range(length)
        if 0 <= index - j < kernel_size * dilation and index % dilation == j % dilation
    ]


def _valid_geometries(max_length=17):
    for length in range(1, max_length + 1):
        for kernel in range(1, length + 1, 2):
            for dilation in range(1, length // kernel + 1):
                yield length, kernel, dilation


def test_oracle_neighbourhoods_are_nattens():
    checked = 0
    for length, kernel, dilation in _valid_geometries():
        keys = neighborhood_1d(length, kernel, dilation, causal=False)
        for i in range(length):
            start = natten_get_window_start(i, length, kernel, kernel // 2, dilation)
            assert keys[i] == [start + m * dilation for m in range(kernel)], (length, kernel, i)
            checked += 1
    assert checked > 500


def test_oracle_bias_index_is_nattens():
    """NATTEN reads rpb[pb_start + m] for the m-th key; the oracle's index is
    (key - query) / dilation + kernel - 1."""
    for length, kernel, dilation in _valid_geometries():
        keys = neighborhood_1d(length, kernel, dilation, causal=False)
        for i in range(length):
            pb_start = natten_get_pb_start(i, length, kernel, kernel // 2, dilation)
            ours = [(j - i) // dilation + kernel - 1 for j in keys[i]]
            assert ours == [pb_start + m for m in range(kernel)], (length, kernel, dilation, i)


def test_oracle_causal_neighbourhoods_are_nattens():
    for length in range(1, 14):
        for kernel in range(1, length + 1):
            for dilation in range(1, length // kernel + 1):
                keys = neighborhood_1d(length, kernel, dilation, causal=True)
                for i in range(length):
                    assert keys[i] == natten_causal_keys(i, length, kernel, dilation)


def test_oracle_bias_lands_where_natten_puts_it():
    """One head, zero q/k: the softmax weights are exp(bias) over the neighbourhood, so the
    output picks out exactly which table entry each key got."""
    length, kernel, dilation = 11, 3, 3
    table = torch.randn(1, 2 * kernel - 1, dtype=torch.float64)
    zeros = torch.zeros(1, length, 1, 1, dtype=torch.float64)
    eye = torch.eye(length, dtype=torch.float64).view(1, length, 1, length)
    out = neighborhood_reference(
        zeros.expand(1, length, 1, length),
        zeros.expand(1, length, 1, length),
        eye,
        kernel,
        dilation=dilation,
        bias=table,
    )[0, :, 0, :]  # (query, key): attention weights
    for i in range(length):
        start = natten_get_window_start(i, length, kernel, kernel // 2, dilation)
        pb = natten_get_pb_start(i, length, kernel, kernel // 2, dilation)
        logits = table[0, pb : pb + kernel]
        expected = torch.zeros(length, dtype=torch.float64)
        expected[[start + m * dilation for m in range(kernel)]] = logits.softmax(0)
        torch.testing.assert_close(out[i], expected)


# --- fast path vs oracle ---------------------------------------------------------------------
CASES = [
    # grid, kernel, dilation, causal, batch, head_dim
    ((13,), 5, 1, False, 2, 24),
    ((13,), 3, 4, False, 1, 8),  # dilation groups of 4 and 3 positions
    ((9,), 3, 3, False, 2, 8),  # kernel * dilation == grid: the limit
    ((7,), 7, 1, False, 1, 8),  # kernel == grid
    ((11,), 4, 2, True, 2, 8),  # causal, even kernel
    ((9, 11), (3, 5), (2, 1), False, 2, 40),
    ((7, 7), 7, 1, False, 1, 8),  # kernel == grid in 2-D: global attention
    ((10, 6), 3, (3, 2), False, 1, 16),  # dilation at the limit on one axis
    ((8, 7), (4, 3), (1, 2), (True, False), 2, 8),
    ((5, 6, 7), 3, (1, 2, 2), False, 1, 8),
    ((4, 5, 3), (3, 3, 2), 1, (False, False, True), 2, 8),
]


def _case_id(case):
    grid, kernel, dilation, causal, batch, head_dim = case
    return f"g{grid}-k{kernel}-d{dilation}-c{causal}-b{batch}-hd{head_dim}"


def _setup(case, heads=2):
    grid, kernel, dilation, causal, batch, head_dim = case
    ndim = len(grid)
    kernel_t = (kernel,) * ndim if isinstance(kernel, int) else kernel
    causal_any = causal if isinstance(causal, bool) else any(causal)
    shape = (batch, *grid, heads, head_dim)
    shapes = [shape] * 3
    if not causal_any:
        shapes.append((heads, *(2 * k - 1 for k in kernel_t)))
    kwargs = dict(dilation=dilation, is_causal=causal)

    def fast(q, k, v, bias=None, settings=None):
        return neighborhood_attention(q, k, v, kernel, bias=bias, settings=settings, **kwargs)

    def oracle(q, k, v, bias=None):
        return neighborhood_reference(q, k, v, kernel, bias=bias, **kwargs)

    return fast, oracle, random_inputs(shapes)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fast_path_matches_oracle_float64(case):
    fast, oracle, inputs = _setup(case)
    assert_matches_oracle(fast, oracle, inputs)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8]], ids=_case_id)
def test_fast_path_matches_oracle_float32(case):
    fast, oracle, inputs = _setup(case)
    assert_matches_oracle(fast, oracle, inputs, dtype=torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[9]], ids=_case_id)
def test_fast_path_bfloat16_tolerance_rule(case):
    fast, oracle, inputs = _setup(case)
    assert_low_precision_rule(fast, oracle, inputs)


@pytest.mark.parametrize(
    "settings",
    [
        LocalAttentionSettings(tile_size=1),
        LocalAttentionSettings(tile_size=(2, 3)),
        LocalAttentionSettings(tile_size=64),
        LocalAttentionSettings(max_chunk_logits=1),  # one tile per chunk
    ],
)
def test_speed_settings_do_not_change_the_result(settings):
    fast, oracle, inputs = _setup(((9, 11), (3, 5), (2, 1), False, 2, 8))
    assert_matches_oracle(functools.partial(fast, settings=settings), oracle, inputs)


def test_kernel_one_is_identity_attention():
    q, k, v = random_inputs([(1, 5, 6, 2, 4)] * 3)
    torch.testing.assert_close(neighborhood_attention(q, k, v, 1), v)


def test_kernel_equal_to_grid_is_global_attention():
    q, k, v = random_inputs([(2, 5, 7, 2, 8)] * 3)
    out = neighborhood_attention(q, k, v, (5, 7))
    flat = lambda t: t.reshape(2, 35, 2, 8).transpose(1, 2)  # noqa: E731
    dense = torch.nn.functional.scaled_dot_product_attention(flat(q), flat(k), flat(v))
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(out.shape))


@pytest.mark.slow
def test_random_geometries_sweep():
    """Many random grids, kernels, dilations and causal flags, forward and backward."""
    generator = torch.Generator().manual_seed(1234)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    for _ in range(60):
        ndim = draw(1, 3)
        grid = tuple(draw(1, 12 if ndim < 3 else 6) for _ in range(ndim))
        causal = tuple(bool(draw(0, 1)) for _ in range(ndim))
        kernel, dilation = [], []
        for n, c in zip(grid, causal):
            k = draw(1, n)
            if not c and k % 2 == 0:
                k -= 1
            kernel.append(k)
            dilation.append(draw(1, n // k))
        case = (grid, tuple(kernel), tuple(dilation), causal, draw(1, 2), 8)
        fast, oracle, inputs = _setup(case)
        assert_matches_oracle(fast, oracle, inputs)
