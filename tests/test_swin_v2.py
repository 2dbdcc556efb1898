"""Swin V2 model tests: configs and keys against timm; parity with the peers' own models
(random weights, converted, compared in eval).

Protocol (as for V1): build the peer's model (timm ``pretrained=False``, torchvision
``swin_v2_*(weights=None)``, transformers ``Swinv2ForImageClassification``), give every parameter
non-trivial random values (post-norm gains, q/v biases, CPB weights, logit scales on both sides
of the log(100) clamp), convert its state dict through ``winattn.load_checkpoint`` and compare
logits: at most 1e-4 against timm, torchvision and the official layout; Hugging Face adds the shift
mask twice (-200 instead of -100), so its shifted blocks differ and it gets a stated tolerance.
"""

from __future__ import annotations

import functools

import pytest
import swin_peers
import torch
from torch import nn

import winattn
from winattn.checkpoints import from_native, load_checkpoint
from winattn.cli.bench_cases import saved_tensor_bytes

timm = pytest.importorskip("timm")

V2_NAMES = [
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_small_window8_256",
    "swinv2_small_window16_256",
    "swinv2_base_window8_256",
    "swinv2_base_window16_256",
    "swinv2_base_window12_192",
    "swinv2_base_window12to16_192to256",
    "swinv2_base_window12to24_192to384",
    "swinv2_large_window12_192",
    "swinv2_large_window12to16_192to256",
    "swinv2_large_window12to24_192to384",
]
ATOL = 1e-4


randomize_ = functools.partial(swin_peers.randomize_, straddle_clamp=True)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def load(model: nn.Module, state_dict: dict) -> nn.Module:
    """Convert any peer's layout through the checkpoint loader (strict: every key accounted)."""
    load_checkpoint(model, state_dict)
    return model.eval()


# ---------------------------------------------------------------- configuration, keys, shapes
@pytest.mark.parametrize("name", V2_NAMES)
def test_keys_shapes_and_config_match_timm(name):
    with torch.device("meta"):
        peer = timm.create_model(name, pretrained=False)
        ours = winattn.create_model(name)
    theirs = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    cfg = peer.pretrained_cfg
    assert ours.data_config["input_size"] == tuple(cfg["input_size"])
    assert ours.data_config["crop_pct"] == cfg["crop_pct"]
    assert ours.num_classes == peer.num_classes
    for i, (their_stage, our_stage) in enumerate(zip(peer.layers, ours.layers)):
        their_block = their_stage.blocks[0]
        size = their_block.input_resolution
        window, _ = winattn.models.swin.resolve_window(
            size, our_stage.blocks[0].window_size, (0, 0), "timm"
        )
        assert window == tuple(their_block.window_size), f"stage {i}"
        assert (
            our_stage.blocks[0].attn.pretrained_window_size
            == tuple(their_block.attn.pretrained_window_size)
        ), f"stage {i}"
        shifted = their_stage.blocks[1] if len(their_stage.blocks) > 1 else None
        if shifted is not None and any(shifted.shift_size):
            _, shift = winattn.models.swin.resolve_window(
                size, our_stage.blocks[1].window_size, our_stage.blocks[1].shift_size, "timm"
            )
            assert shift == tuple(shifted.shift_size)


def test_buffers_are_not_persistent():
    model = winattn.create_model("swinv2_tiny_window8_256")
    assert not any(
        k.endswith(("relative_coords_table", "relative_position_index", "attn_mask", "k_bias"))
        for k in model.state_dict()
    )


# ---------------------------------------------------------------- timm
@pytest.mark.parametrize(
    "name,img_size,window_rule",
    [
        ("swinv2_tiny_window8_256", 256, "official"),
        # 128: the last stage (4x4) is smaller than the window; timm shrinks it (CPB by 3).
        ("swinv2_tiny_window8_256", 128, "timm"),
        ("swinv2_tiny_window16_256", 256, "timm"),
    ],
)
def test_matches_timm(name, img_size, window_rule):
    peer = randomize_(timm.create_model(name, pretrained=False, img_size=img_size))
    ours = load(
        winattn.create_model(name, img_size=img_size, window_rule=window_rule), peer.state_dict()
    )
    x = torch.randn(1, 3, img_size, img_size)
    torch.testing.assert_close(logits(ours, x), logits(peer, x), atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", V2_NAMES)
def test_matches_timm_every_variant(name):
    peer = randomize_(timm.create_model(name, pretrained=False))
    ours = load(winattn.create_model(name), peer.state_dict())
    size = peer.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)
    torch.testing.assert_close(logits(ours, x), logits(peer, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- official layout
def official_state_dict(peer: nn.Module) -> dict:
    """timm's weights in the official layout, with the buffers official checkpoints persist."""
    state = from_native(peer.state_dict(), "official")
    for key, buffer in peer.named_buffers():
        if key.endswith(("relative_coords_table", "relative_position_index")):
            state[key] = buffer.clone()  # block keys are the same in both layouts
    return state


@pytest.mark.parametrize(
    "name,img_size", [("swinv2_tiny_window8_256", 256), ("swinv2_base_window12to16_192to256", 128)]
)
def test_matches_official_layout(name, img_size):
    peer = randomize_(timm.create_model(name, pretrained=False, img_size=img_size))
    state = official_state_dict(peer)
    ours = winattn.create_model(name, img_size=img_size, window_rule="timm")
    ours.check_checkpoint_buffers(state)
    load(ours, state)
    x = torch.randn(1, 3, img_size, img_size)
    torch.testing.assert_close(logits(ours, x), logits(peer, x), atol=ATOL, rtol=0)


def test_pretrained_window_mismatch_is_named():
    """A fine-tuned checkpoint's CPB was normalised by its pre-training window: without it the
    model would silently compute other biases; the check names the setting to use."""
    peer = timm.create_model(
        "swinv2_base_window12to16_192to256", pretrained=False, img_size=64,
        depths=(1, 1, 1, 1),
    )
    state = official_state_dict(peer)
    wrong = winattn.create_model(
        "swinv2_base_window16_256", img_size=64, depths=(1, 1, 1, 1)
    )
    with pytest.raises(ValueError, match=r"pretrained_window_sizes\[0\]=12"):
        wrong.check_checkpoint_buffers(state)
    with pytest.raises(ValueError, match=r"pretrained_window_sizes\[0\]=12"):
        winattn.load_checkpoint(wrong, state)  # the loader runs the check before converting
    right = winattn.create_model(
        "swinv2_base_window12to16_192to256", img_size=64, depths=(1, 1, 1, 1)
    )
    right.check_checkpoint_buffers(state)
    winattn.load_checkpoint(right, state)


# ---------------------------------------------------------------- torchvision
@pytest.mark.parametrize(
    "tv_name,name,img_size",
    [
        ("swin_v2_t", "swinv2_tiny_window8_256", 256),
        # 224: every stage (56, 28, 14, 7) is padded up to the window 8 before the shift;
        # the last stage is smaller than the window, which torchvision never shrinks.
        ("swin_v2_t", "swinv2_tiny_window8_256", 224),
        pytest.param("swin_v2_s", "swinv2_small_window8_256", 256, marks=pytest.mark.slow),
        pytest.param("swin_v2_b", "swinv2_base_window8_256", 256, marks=pytest.mark.slow),
    ],
)
def test_matches_torchvision(tv_name, name, img_size):
    models = pytest.importorskip("torchvision.models")
    peer = randomize_(getattr(models, tv_name)(weights=None))
    ours = winattn.create_model(name, window_rule="torchvision")
    ours.check_checkpoint_buffers(peer.state_dict())  # torchvision persists its tables
    load(ours, peer.state_dict())
    x = torch.randn(1, 3, img_size, img_size)
    torch.testing.assert_close(logits(ours, x), logits(peer, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- Hugging Face
#: Hugging Face's Swinv2 adds the shift mask twice (-200 where the others add -100). A key
#: across a shift boundary keeps weight exp(delta - 100) in the peers and exp(delta - 200) in HF,
#: where delta is its logit lead (cosine logits reach 100 + 16 when a head's scale sits at its
#: clamp). Measured on these random weights (scales uniform in [0, 5.5]): 2e-6 to 3e-6; with every
#: logit scale at the clamp: 8e-4 to 9e-4 (docs/swin_v2.md). The bound covers the random case.
HF_ATOL = 1e-3


@pytest.mark.parametrize("img_size,window", [(256, 8), (128, 8)])
def test_matches_huggingface_within_its_double_mask(img_size, window):
    transformers = pytest.importorskip("transformers")
    config = transformers.Swinv2Config(
        image_size=img_size, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24], window_size=window, num_labels=1000, drop_path_rate=0.0,
    )
    peer = randomize_(transformers.Swinv2ForImageClassification(config))
    ours = load(
        winattn.create_model("swinv2_tiny_window8_256", img_size=img_size, window_rule="timm"),
        peer.state_dict(),
    )
    x = torch.randn(1, 3, img_size, img_size)
    torch.testing.assert_close(logits(ours, x), logits(peer, x), atol=HF_ATOL, rtol=0)


# ---------------------------------------------------------------- the window-order fast path
@pytest.mark.parametrize("size", [(64, 64), (72, 88), (40, 24)])
def test_window_order_matches_the_grid_path_forward_and_backward(monkeypatch, size):
    """The stages keep the tokens in window order (as V1's do), in inference and in training:
    the same function as the grid path in float64, outputs and every parameter's gradient,
    with maps that need padding and maps that shrink the window."""
    from winattn.layers.attention_v2 import WindowAttentionV2

    torch.manual_seed(0)
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2, 2), num_heads=(2, 4, 4), embed_dim=16,
        drop_path_rate=0.0,
    )
    randomize_(model)
    model.double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    calls = []
    original = WindowAttentionV2.forward_windows
    monkeypatch.setattr(WindowAttentionV2, "forward_windows",
                        lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        model.set_attention_path("grid")
        grid = model(x)
        assert not calls
        model.set_attention_path("auto")
        fast = model(x)
    assert calls  # the path under test ran
    torch.testing.assert_close(fast, grid, atol=1e-10, rtol=0)
    model.train()
    grads = {}
    for path in ("grid", "auto"):
        calls.clear()
        model.set_attention_path(path)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        assert bool(calls) == (path == "auto")
        grads[path] = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads[path].values())
    for name, grad in grads["grid"].items():
        # float64 rounding in another order: ~1e-13 of the tensor's largest entry (up to 1e4)
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(grads["auto"][name], grad, atol=1e-9 * scale, rtol=0,
                                   msg=name)


def test_window_order_bf16_training_gradients_within_the_tolerance_rule():
    """Under bf16 autocast, the window-order path's gradients against float64 stay within
    STYLE's rule, parameter by parameter: relative error (norm of the difference over the
    reference's norm) at most 3x the grid path's own plus a small floor. (Logit scales near
    their initial value: straddling the clamp, both paths' bf16 gradients of the scale are off
    by more than 100% for some heads, which no rule can compare.)"""
    import copy

    torch.manual_seed(0)
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=32,
        drop_path_rate=0.0,
    )
    swin_peers.randomize_(model)
    model.train()
    reference = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64)
    reference.set_attention_path("grid")
    reference(x.double()).square().sum().backward()
    errors = {}
    for path in ("grid", "auto"):
        model.set_attention_path(path)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        errors[path] = {
            n: ((p.grad.double() - r.grad).norm() / r.grad.norm()).item()
            for (n, p), r in zip(model.named_parameters(), reference.parameters())
        }
    for name, grid_error in errors["grid"].items():
        assert errors["auto"][name] <= 3 * grid_error + 0.02, (name, errors["auto"][name])


def test_inference_mode_caches_the_bias_without_breaking_later_training():
    """The position bias and mask are cached in eval mode, inference mode included (the cached
    tensors are ordinary ones); a weight update invalidates them, and training afterwards
    still gets gradients for the CPB weights."""
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=16
    )
    randomize_(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        first = model(x)
        again = model(x)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    attn = model.layers[0].blocks[0].attn
    assert attn._bias_cache and attn._mask_cache
    entries = len(attn._mask_cache)
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))  # another batch size replaces, not adds, the masks
    assert len(attn._mask_cache) == entries
    with torch.no_grad():
        attn.cpb_mlp[2].weight.mul_(2.0)  # an in-place update: the caches must notice
        updated = model(x)
        model.set_attention_path("grid")
        grid = model(x)
    torch.testing.assert_close(updated, grid, atol=1e-5, rtol=0)
    assert not torch.allclose(updated, first)
    model.train()
    model(x).sum().backward()
    assert attn.cpb_mlp[2].weight.grad is not None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lean_inference_blocks_equal_the_general_eval_path(monkeypatch, dtype):
    """``SwinV2Block._infer`` (weights, qkv bias and logit scale prepared once, no per-call
    checks) gives the general eval path's output bit for bit on padded maps with shifted
    windows, and follows in-place updates and replaced parameters."""
    from winattn.layers import fused
    from winattn.models import swin_v2

    calls = []
    lean = swin_v2.SwinV2Block._infer
    monkeypatch.setattr(swin_v2.SwinV2Block, "_infer",
                        lambda self, *a: calls.append(1) or lean(self, *a))
    torch.manual_seed(0)
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=16
    ).eval()
    randomize_(model)
    x = torch.randn(2, 3, 72, 88)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast:
            calls.clear()
            ours = model(x)
            assert len(calls) == 4
            with monkeypatch.context() as m:
                m.setattr(fused, "inference_ready", lambda *a: False)
                general = model(x)
            assert len(calls) == 4
        return ours, general

    ours, general = both()
    assert torch.equal(ours, general)
    block = model.layers[0].blocks[1]
    with torch.no_grad():
        block.attn.logit_scale.add_(0.5)
        block.attn.q_bias = nn.Parameter(torch.randn_like(block.attn.q_bias))
        block.mlp.fc1.weight.mul_(2.0)
    updated, general = both()
    assert torch.equal(updated, general)
    assert not torch.equal(updated, ours)


# ---------------------------------------------------------------- q/k normalisation with grad
def _composite_scaled_units(qk: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """What autograd differentiated before the Function: the same formula as composite ops."""
    heads = qk.shape[-2]
    work = torch.promote_types(qk.dtype, torch.float32)
    norms = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=work)
    scale = torch.stack([logit_scale.view(heads), torch.ones_like(logit_scale.view(heads))])
    factor = scale.to(work).view(2, heads, 1) / norms.clamp_min(1e-12)
    return (qk.to(work) * factor).to(qk.dtype)


def _composite_scaled_qkv(qkv: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return torch.cat([_composite_scaled_units(qkv[:, :, :2], logit_scale), qkv[:, :, 2:]], 2)


def test_scaled_qkv_function_gradients():
    """gradcheck in float64 (vectors away from zero, where the norm is differentiable), and
    the composite ops' gradients with an all-zero vector (a padded key: the clamped side)."""
    from winattn.layers.attention_v2 import _ScaledQkvFunction

    torch.manual_seed(0)
    qkv = torch.randn(3, 5, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, 1, 1, dtype=torch.float64) * 3 + 1).requires_grad_()
    assert torch.autograd.gradcheck(_ScaledQkvFunction.apply, (qkv, scale))
    padded = qkv.detach().clone()
    padded[0, 1, 1] = 0.0  # k of one token, every head
    padded.requires_grad_()
    grad = torch.randn(qkv.shape, dtype=torch.float64)
    for fn in (_ScaledQkvFunction.apply, _composite_scaled_qkv):
        out = fn(padded, scale)
        torch.testing.assert_close(out, _composite_scaled_qkv(padded, scale), rtol=0, atol=0)
    got = torch.autograd.grad(_ScaledQkvFunction.apply(padded, scale), (padded, scale), grad)
    want = torch.autograd.grad(_composite_scaled_qkv(padded, scale), (padded, scale), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_scaled_qkv_function_keeps_its_output_only_and_bf16_errors_within_the_rule():
    """Under bf16 the composite ops kept the qkv projection, a float32 copy of q and k and
    the scaled q and k; the Function keeps its output (which attention keeps anyway) and the
    norms. Its gradients are formed from the bf16 output instead of the input: against
    float64 on the same inputs, STYLE's rule (at most 3x the composite ops' error + a floor).
    The floor, 1e-2, is about bf16's precision: the composite ops formed the logit scale's
    gradient from float32 copies (3e-7 here), the Function from the bf16 output (5e-3), a sum
    over every vector that partly cancels. In a whole bf16 training step both are buried in
    the attention backward's own bf16 error (the test above: the scales' relative errors
    0.005-0.05 either way); a wrong formula is off by order 1, and gradcheck holds it exact."""
    from winattn.layers.attention_v2 import _ScaledQkvFunction

    torch.manual_seed(0)
    qkv = torch.randn(16, 49, 3, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    scale = (torch.rand(4, 1, 1) * 3 + 1).requires_grad_()
    grad = torch.randn(16, 49, 3, 4, 32).bfloat16()
    saved, results = {}, {}
    for name, fn in (("function", _ScaledQkvFunction.apply), ("composite", _composite_scaled_qkv)):
        out, saved[name] = saved_tensor_bytes(functools.partial(fn, qkv, scale), [scale])
        results[name] = [out, *torch.autograd.grad(out, (qkv, scale), grad)]
    qkv_bytes = qkv.numel() * 2
    norms_bytes = 16 * 49 * 2 * 4 * 4
    assert saved["function"] == qkv_bytes + norms_bytes  # its output's, and the norms
    assert saved["composite"] >= qkv_bytes + 16 * 49 * 2 * 128 * 4  # input, fp32 copy, ...
    torch.testing.assert_close(results["function"][0], results["composite"][0], rtol=0, atol=0)
    qkv64 = qkv.detach().double().requires_grad_()
    scale64 = scale.detach().double().requires_grad_()
    exact = torch.autograd.grad(_composite_scaled_qkv(qkv64, scale64), (qkv64, scale64),
                                grad.double())
    for i, want in enumerate(exact):
        ours = ((results["function"][1 + i].double() - want).norm() / want.norm()).item()
        theirs = ((results["composite"][1 + i].double() - want).norm() / want.norm()).item()
        assert ours <= 3 * theirs + 1e-2, (i, ours, theirs)


def test_checkpointed_stages_give_the_same_gradients_through_the_training_functions():
    """Gradient checkpointing reruns the window-order blocks (the scaled-qkv, attention and
    MLP Functions) in backward: the same gradients as without it."""
    torch.manual_seed(0)
    model = winattn.create_model(
        "swinv2_tiny_window8_256", depths=(2, 2), num_heads=(2, 4), embed_dim=32,
        drop_path_rate=0.0,
    )
    swin_peers.randomize_(model)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("first", ["fp32", "bf16"])
def test_cached_bias_follows_autocast(first):
    """Under bf16 autocast the CPB MLP runs in bf16 (as in timm), without it in float32: the
    eval caches keep the two apart, so each mode's logits are the same whichever ran first
    (a bias cached by one used to serve the other: 0.06 apart in bf16, and fp32 logits carrying
    bf16 rounding)."""
    kwargs = dict(depths=(2, 2), num_heads=(2, 4), embed_dim=16)
    torch.manual_seed(0)
    model = winattn.create_model("swinv2_tiny_window8_256", **kwargs).eval()
    randomize_(model)
    x = torch.randn(1, 3, 64, 64)

    def run(mode):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            return model(x).float()

    def fresh(mode):
        clone = winattn.create_model("swinv2_tiny_window8_256", **kwargs).eval()
        clone.load_state_dict(model.state_dict())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            return clone(x).float()

    second = "bf16" if first == "fp32" else "fp32"
    run(first)
    torch.testing.assert_close(run(second), fresh(second), atol=0, rtol=0)
    torch.testing.assert_close(run(first), fresh(first), atol=0, rtol=0)
