"""The caches of tensors derived from weights (eval masks, position biases, prepared
inference weights) notice in-place updates and replaced parameters, including a replacement
that shares the old one's storage and version counter, which a key of address and version
alone (or ``id()`` and version) would take for the old parameter."""

from __future__ import annotations

import torch
from torch import nn

import winattn
from winattn.ops.backends.sdpa import ExpandedMaskCache
from winattn.ops.stamps import cached_by_parameters, parameter_stamp


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
