"""The caches of tensors derived from weights (eval masks, position biases, prepared
inference weights) notice in-place updates and replaced parameters, including a replacement
that shares the old one's storage and version counter, which a key of address and version
alone (or ``id()`` and version) would take for the old parameter; and the grid-layout
operator's mask cache follows every change of the bias it was folded from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import winattn
from winattn.ops.backends.sdpa import ExpandedMaskCache
from winattn.ops.stamps import cached_by_parameters, clear_tensor_caches, parameter_stamp


def _twin(p: nn.Parameter) -> nn.Parameter:
    """Another parameter object on ``p``'s storage whose version moves with ``p``'s."""
    twin = nn.Parameter(p.detach())
    assert twin is not p and parameter_stamp([twin]) == parameter_stamp([p])
    return twin


def test_expanded_mask_cache_rebuilds_on_update_replacement_and_batch():
    table = nn.Parameter(torch.randn(2, 1, 4, 4))  # (windows, heads, N, N)
    builds = []

    def build():
        builds.append(1)
        return table.detach().clone()

    cache = ExpandedMaskCache()
    first = cache.get("plan", torch.float32, 2, [table], build)
    assert first.shape == (2, 1, 4, 4) and len(builds) == 1
    assert cache.get("plan", torch.float32, 2, [table], build) is first and len(builds) == 1
    cache.get("plan", torch.float32, 4, [table], build)  # another batch: rebuilt, replaced
    assert len(builds) == 2 and len(cache) == 1
    with torch.no_grad():
        table.add_(1.0)
    cache.get("plan", torch.float32, 4, [table], build)
    assert len(builds) == 3
    cache.get("plan", torch.float32, 4, [_twin(table)], build)
    assert len(builds) == 4


def test_cached_by_parameters_rebuilds_for_a_twin_parameter():
    weight = nn.Parameter(torch.randn(3))
    entries: dict = {}
    first = cached_by_parameters(entries, "k", [weight], lambda: weight.detach() * 2)
    assert cached_by_parameters(entries, "k", [weight], lambda: None) is first
    assert cached_by_parameters(entries, "k", [_twin(weight)], lambda: None) is None


def test_swin_v2_position_bias_and_mask_follow_a_replaced_cpb_parameter():
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=16
    ).eval()
    attn = model.layers[0].blocks[1].attn  # shifted: a mask and a bias
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        bias = attn.position_bias((8, 8))
        assert attn.position_bias((8, 8)) is bias
        masks = [entry[1] for entry in attn._mask_cache._entries.values()]
        attn.cpb_mlp[2].weight = _twin(attn.cpb_mlp[2].weight)
        assert attn.position_bias((8, 8)) is not bias
        model(x)
        assert all(entry[1] is not m for entry in attn._mask_cache._entries.values()
                   for m in masks)


def test_swin_v1_mask_follows_a_replaced_bias_table():
    model = winattn.create_model("swin_tiny_patch4_window7_224", depths=(2, 2),
                                 num_heads=(2, 4), embed_dim=16).eval()
    attn = model.layers[0].blocks[1].attn
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        model(x)
        masks = [entry[1] for entry in attn._mask_cache._entries.values()]
        assert masks
        attn.relative_position_bias_table = _twin(attn.relative_position_bias_table)
        model(x)
        assert all(entry[1] is not m for entry in attn._mask_cache._entries.values()
                   for m in masks)


def _operator_calls():
    q = torch.randn(1, 7, 11, 2, 4)
    seq = torch.randn(1, 13, 2, 4)
    return {
        "window": lambda t: winattn.window_attention(t, t, t, window_size=3, shift_size=1),
        "neighborhood": lambda t: winattn.neighborhood_attention(t, t, t, kernel_size=3),
        "sequence": lambda t: winattn.sequence_window_attention(t, t, t, 5),
    }, {"window": q, "neighborhood": q, "sequence": seq}


@pytest.mark.parametrize("name", ["window", "neighborhood", "sequence"])
def test_a_first_call_in_inference_mode_leaves_the_caches_usable_by_autograd(name):
    """Plans and masks cached while ``torch.inference_mode()`` ran are ordinary tensors: a
    later call with autograd on can save them for backward (an inference tensor cannot)."""
    calls, inputs = _operator_calls()
    fn, x = calls[name], inputs[name]
    clear_tensor_caches()
    fresh = x.clone().requires_grad_()
    fn(fresh).square().sum().backward()
    clear_tensor_caches()
    with torch.inference_mode():
        expected = fn(x)
    later = x.clone().requires_grad_()
    out = fn(later)
    torch.testing.assert_close(out.detach(), expected.clone(), atol=0, rtol=0)
    out.square().sum().backward()
    torch.testing.assert_close(later.grad, fresh.grad, atol=0, rtol=0)


@pytest.mark.parametrize("name, size", [("swin_tiny_patch4_window7_224", (36, 52)),
                                        ("swinv2_tiny_window8_256", (36, 52))])
def test_evaluating_in_inference_mode_then_training_works(name, size):
    """The usual loop: evaluate under ``torch.inference_mode()``, then train on, in this model
    and in a new one (the caches are process-wide), at a size that pads."""
    kwargs = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    torch.manual_seed(0)
    model = winattn.create_model(name, **kwargs)
    x = torch.randn(2, 3, *size)
    clear_tensor_caches()
    model.eval()
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    other = winattn.create_model(name, **kwargs)
    other(x).sum().backward()


def test_updates_through_data_are_seen():
    """``p.data`` has a version counter of its own, so an update written through it (an EMA
    done the old way) moves none of ``p``'s: the stamp samples the content too."""
    small = nn.Parameter(torch.randn(169, 3))  # a bias table: compared whole
    large = nn.Parameter(torch.randn(384, 96))  # a linear's weight: first and last 8 bytes
    for p in (small, large):
        before = parameter_stamp([p])
        p.data.mul_(0.999).add_(torch.ones_like(p), alpha=0.001)
        assert p._version == 0 and parameter_stamp([p]) != before
    before = parameter_stamp([small])
    small.data[80, 1] += 1.0  # a small parameter is compared whole: one element is enough
    assert parameter_stamp([small]) != before


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_models_follow_weights_copied_through_data(name):
    """Eval caches (bf16 weights, folded masks, V2's bias) warmed, then every parameter
    overwritten through ``.data``: the outputs are those of a model built with the new
    weights, in float32 and under bf16 autocast."""
    kwargs = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    torch.manual_seed(0)
    model = winattn.create_model(name, **kwargs).eval()
    fresh = winattn.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    x = torch.randn(1, 3, 64, 64)

    def run(m, bf16):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return m(x).float()

    for bf16 in (False, True):
        run(model, bf16)
    for p, q in zip(model.parameters(), fresh.parameters()):
        p.data.copy_(q.data)
    for bf16 in (False, True):
        torch.testing.assert_close(run(model, bf16), run(fresh, bf16), atol=0, rtol=0)


def _grid_call(bias: torch.Tensor | None, batch: int = 2, dtype=torch.float32):
    """The grid-layout operator on a shifted 8x8 grid, window 4, 2 heads: (call, reference)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, batch, 8, 8, 2, 4, generator=gen).to(dtype).unbind(0)

    def call():
        return winattn.window_attention(q, k, v, 4, shift_size=2, bias=bias)

    def reference():
        return winattn.window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="reference")

    return call, reference


def _sdpa_masks():
    from winattn.ops.backends import BACKENDS

    return next(b for b in BACKENDS if b.name == "sdpa").masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_mask_cache_follows_every_change_of_the_bias(dtype):
    masks = _sdpa_masks()
    masks.clear()
    bias = torch.randn(2, 16, 16)
    call, reference = _grid_call(bias, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        first = call()
        assert len(masks) == 1
        assert torch.equal(call(), first) and len(masks) == 1  # served from the cache
        bias.mul_(-1.0)  # in place
        assert not torch.equal(call(), first)
        assert (call().float() - reference().float()).abs().max() < tol
        bias.data[1, 3, 5] = 40.0  # through .data, no version bump, mid-tensor
        assert (call().float() - reference().float()).abs().max() < tol
        bias.copy_(torch.randn(2, 16, 16))
        assert (call().float() - reference().float()).abs().max() < tol


def test_operator_mask_cache_is_bypassed_with_gradients_and_keyed_by_batch():
    masks = _sdpa_masks()
    masks.clear()
    bias = torch.randn(2, 16, 16, requires_grad=True)
    call, reference = _grid_call(bias)
    out = call()
    assert len(masks) == 0  # the bias wants a gradient: folded afresh, nothing kept
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    with torch.no_grad():
        call()
        _grid_call(bias, batch=3)[0]()
    assert len(masks) == 2  # one per batch size


def test_operator_mask_cache_stays_under_its_byte_bound():
    masks = _sdpa_masks()
    masks.clear()
    kept = masks.max_bytes
    try:
        masks.max_bytes = 3 * 2 * 4 * 2 * 16 * 16 * 4  # three batch-2 masks of 4 windows
        with torch.no_grad():
            for _ in range(5):
                _grid_call(torch.randn(2, 16, 16))[0]()
                _grid_call(torch.randn(2, 16, 16), batch=3)[0]()
        assert sum(m.nbytes for _, m in masks._entries.values()) <= masks.max_bytes
        masks.max_bytes = 16  # smaller than any mask: built, not kept
        masks.clear()
        with torch.no_grad():
            _grid_call(torch.randn(2, 16, 16))[0]()
        assert len(masks) == 0
    finally:
        masks.max_bytes = kept
