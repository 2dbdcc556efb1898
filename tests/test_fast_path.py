"""The fast path against the dense oracle: the grid-layout operator (forward and backward,
the recompute-in-backward Function included) and the window-order Swin stages."""

from __future__ import annotations

import functools

import pytest
import torch

from winattn import window_attention
from winattn.cli.bench_cases import saved_tensor_bytes
from winattn.ops.backends.sdpa import attend_qkv, expand_to_batch
from winattn.ops.geometry import padded_token_mask, plan_windows, transition_index

CASES = [
    # (grid, window, shift, heads, head_dim)
    ((14, 14), (7, 7), (3, 3), 3, 32),
    ((14, 14), (7, 7), (0, 0), 2, 24),
    ((9, 11), (4, 3), (2, 1), 2, 40),
    ((5, 6), (5, 6), (0, 0), 1, 64),
    ((6, 5), (1, 1), (0, 0), 2, 16),
    ((12,), (5,), (2,), 2, 32),
    ((4, 6, 5), (2, 3, 5), (1, 1, 0), 2, 24),
]


def _inputs(grid, heads, head_dim, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *grid, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    return q, k, v, gen


def _assert_within_tolerance_rule(exact, reference, fast, floor):
    """STYLE's low-precision rule: against the exact results, the fast path's error is at most
    2x (the output, first) or 3x (each gradient) the reference's error in the same precision,
    plus ``floor``."""
    for i, (e, r, f) in enumerate(zip(exact, reference, fast)):
        factor = 2 if i == 0 else 3
        ref_err = (r.double() - e).abs().max().item()
        err = (f.double() - e).abs().max().item()
        assert err <= factor * ref_err + floor, (i, err, ref_err)


def _autocast_grads(fn, x, params, grad, cast):
    """``fn(x)`` and its gradients for ``x`` and ``params``, under bf16 autocast or not."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
        out = fn(x)
    return [out.float(), *torch.autograd.grad(out.float(), [x, *params], grad)]


@pytest.mark.parametrize("grid, window, shift, heads, head_dim", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_match_reference(grid, window, shift, heads, head_dim, batch):
    q, k, v, gen = _inputs(grid, heads, head_dim, batch)
    tokens = 1
    for w in window:
        tokens *= w
    bias = torch.randn(heads, tokens, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = window_attention(
            *leaves[:3], window, shift_size=shift, bias=leaves[3], backend=backend
        )
        out.backward(grad)
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for name, ref, fast in zip(("out", "dq", "dk", "dv", "dbias"), *results.values()):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9, msg=name)


def test_float32_forward_matches_reference_without_grad():
    q, k, v, _ = _inputs((14, 21), 3, 32, batch=2, dtype=torch.float32)
    ref = window_attention(q.double(), k.double(), v.double(), 7, shift_size=3, backend="reference")
    with torch.no_grad():
        fast = window_attention(q, k, v, 7, shift_size=3, backend="sdpa")
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)


def test_transition_index_moves_tokens_between_orders():
    plain = plan_windows((14, 21), (7, 7), (0, 0))
    shifted = plan_windows((14, 21), (7, 7), (3, 3))
    grid = torch.arange(14 * 21).view(1, 14, 21, 1)
    in_plain = plain.partition(grid).reshape(1, -1, 1)
    moved = in_plain.index_select(1, transition_index(plain, shifted))
    torch.testing.assert_close(moved, shifted.partition(grid).reshape(1, -1, 1))
    with pytest.raises(ValueError, match="different grids"):
        transition_index(plain, plan_windows((14, 14), (7, 7), (0, 0)))


def test_move_tokens_gradient_is_the_inverse_gather():
    from winattn.ops.geometry import move_tokens

    plain = plan_windows((14, 21), (7, 7), (0, 0))
    shifted = plan_windows((14, 21), (7, 7), (3, 3))
    x = torch.randn(2, 14 * 21, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 14 * 21, 5, dtype=torch.float64)
    out = move_tokens(x, plain, shifted)
    assert type(out.grad_fn).__name__ == "_PermuteTokensBackward"
    want = x.index_select(1, transition_index(plain, shifted))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    (got_grad,) = torch.autograd.grad(out, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    small = x[:1, :, :2].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: move_tokens(t, shifted, plain), (small,))


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_tokens_is_index_select_on_the_token_axis(batch):
    """Row gathers for every image at once, on a non-contiguous input and an index that drops
    and repeats tokens (as reversing a padded plan drops the padding); gradients too."""
    from winattn.ops.geometry import gather_tokens

    x = torch.randn(batch, 5, 11, dtype=torch.float64).transpose(1, 2).requires_grad_()
    index = torch.tensor([10, 0, 3, 3, 7, 1])
    got = gather_tokens(x, index)
    want = x.index_select(1, index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
        rtol=0, atol=0,
    )


def test_padded_token_mask_marks_exactly_the_padding():
    plan = plan_windows((14, 14), (7, 7), (3, 3))
    outside = padded_token_mask(plan, (12, 13))
    grid = torch.zeros(1, 14, 14, 1, dtype=torch.bool)
    grid[:, 12:] = True
    grid[:, :, 13:] = True
    torch.testing.assert_close(outside, plan.partition(grid).reshape(-1, 1))
    assert padded_token_mask(plan, (14, 14)) is None


def test_attend_qkv_per_window_mask_gradient_sums_over_batch():
    gen = torch.Generator().manual_seed(1)
    batch, windows, heads, tokens, head_dim = 3, 4, 2, 9, 8
    qkv = torch.randn(batch * windows, tokens, 3, heads, head_dim, generator=gen,
                      dtype=torch.float64)
    mask = torch.randn(windows, heads, tokens, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch * windows, tokens, heads, head_dim, generator=gen,
                       dtype=torch.float64)

    def dense(qkv, mask):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d)
        logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + expand_to_batch(mask, batch * windows)
        return (logits.softmax(-1) @ v).transpose(1, 2)

    got, want = [], []
    for fn, sink in ((None, got), (dense, want)):
        leaves = [qkv.clone().requires_grad_(), mask.clone().requires_grad_()]
        if fn is None:
            q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
            out = attend_qkv(q, k, v, leaves[1], head_dim**-0.5)
        else:
            out = fn(*leaves)
        out.backward(grad)
        sink += [out.detach(), leaves[0].grad, leaves[1].grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bf16_attention_backward_within_tolerance_rule_and_keeps_no_attention_matrix():
    """The bf16 matmul path saves no rows x heads x N x N tensor for backward (keeping its
    float32 probabilities measured no faster); outputs and gradients obey STYLE's 2x / 3x
    rule against the float64 oracle, relative to the dense formula computed in bfloat16."""
    gen = torch.Generator().manual_seed(3)
    batch, windows, heads, tokens, head_dim = 2, 4, 3, 49, 32
    qkv = torch.randn(batch * windows, tokens, 3, heads, head_dim, generator=gen,
                      dtype=torch.float64)
    mask = torch.randn(windows, heads, tokens, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch * windows, tokens, heads, head_dim, generator=gen,
                       dtype=torch.float64)

    def dense(qkv, mask):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + expand_to_batch(mask, batch * windows)
        return (logits.softmax(-1) @ v).transpose(1, 2)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (qkv, mask)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(*leaves)
        out.backward(grad.to(dtype))
        return [out.detach(), leaves[0].grad, leaves[1].grad], saved

    def fast(qkv, mask):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attend_qkv(q, k, v, mask, head_dim**-0.5)

    exact, _ = run(dense, torch.float64)
    reference, _ = run(dense, torch.bfloat16)
    got, saved = run(fast, torch.bfloat16)
    square = (batch * windows, heads, tokens, tokens)
    assert not [t for t in saved if tuple(t.shape) == square]
    _assert_within_tolerance_rule(exact, reference, got, 1e-3)


@pytest.mark.parametrize("mask_rows", [None, 4])
def test_attend_project_function_matches_attention_then_linear(mask_rows):
    """float32 Function (oneDNN has no float64 matmul) against attend_qkv + the module in
    float64; it keeps neither the attention output nor the attention matrix."""
    gen = torch.Generator().manual_seed(4)
    rows, heads, tokens, head_dim = 8, 3, 9, 8
    channels = heads * head_dim
    qkv = torch.randn(rows, tokens, 3, heads, head_dim, generator=gen)
    mask = None if mask_rows is None else torch.randn(mask_rows, heads, tokens, tokens,
                                                      generator=gen)
    proj = torch.nn.Linear(channels, 20)
    grad = torch.randn(rows, tokens, 20, generator=gen)

    def run(fn, dtype):
        proj.to(dtype)
        leaves = [qkv.to(dtype).clone().requires_grad_()]
        if mask is not None:
            leaves.append(mask.to(dtype).clone().requires_grad_())
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(leaves[0], leaves[1] if mask is not None else None)
        params = list(proj.parameters())
        grads = torch.autograd.grad(out, leaves + params, grad.to(dtype))
        return [out.detach(), *grads], saved

    def fast(qkv, m):
        out = fused_attention.attend_project(qkv, m, 0.3, proj)
        assert type(out.grad_fn).__name__ == "_AttendProjectFunctionBackward"
        return out

    got, saved = run(fast, torch.float32)
    assert not [t for t in saved if tuple(t.shape) in ((rows, tokens, heads, head_dim),
                                                      (rows, heads, tokens, tokens))]

    def reference(qkv, m):
        out = attend_qkv(*qkv.permute(2, 0, 3, 1, 4).unbind(0), m, 0.3)
        return proj(out.reshape(rows, tokens, channels))

    want, _ = run(reference, torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_attend_project_under_bf16_autocast_within_tolerance_rule():
    gen = torch.Generator().manual_seed(5)
    rows, heads, tokens, head_dim = 8, 3, 49, 32
    qkv = torch.randn(rows, tokens, 3, heads, head_dim, generator=gen)
    mask = torch.randn(4, heads, tokens, tokens, generator=gen)
    proj = torch.nn.Linear(heads * head_dim, heads * head_dim)
    grad = torch.randn(rows, tokens, heads * head_dim, generator=gen)

    def run(fn, cast):
        leaves = [qkv.clone().requires_grad_(), mask.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            qkv_c = leaves[0].to(torch.bfloat16) if cast else leaves[0]
            out = fn(qkv_c, leaves[1].to(qkv_c.dtype))
        grads = torch.autograd.grad(out.float(), leaves + list(proj.parameters()), grad)
        return [out.float(), *grads]

    def modules(qkv, m):
        out = attend_qkv(*qkv.permute(2, 0, 3, 1, 4).unbind(0), m, head_dim**-0.5)
        return proj(out.reshape(rows, tokens, -1))

    with torch.autocast("cpu", enabled=False):
        exact = [t.double() for t in run(modules, False)]
    plain = run(modules, True)
    fast = run(lambda qkv, m: fused_attention.attend_project(qkv, m, head_dim**-0.5, proj), True)
    _assert_within_tolerance_rule(exact, plain, fast, 1e-4)


# --------------------------------------------------------------------------- Swin stages
from winattn import SwinConfig, SwinTransformer  # noqa: E402
from winattn.layers import fused, fused_attention, fused_norm  # noqa: E402

TINY = dict(embed_dim=16, depths=(2, 3), num_heads=(2, 4), window_size=4, patch_size=2,
            drop_path_rate=0.0, num_classes=5)


def _grid_path(model: SwinTransformer, x: torch.Tensor) -> torch.Tensor:
    """The same model run block by block on the grid layout (roll-free operator calls)."""
    feats = model.patch_embed(x)
    for stage in model.layers:
        feats = stage._forward_grid(stage.downsample(feats))
    return model.forward_head(model.norm(feats))


@pytest.mark.parametrize("size", [(32, 32), (30, 42), (18, 26)])
def test_window_order_stages_match_grid_path_forward_and_backward(size):
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    grads = []
    for run in (model, lambda t: _grid_path(model, t)):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-9, atol=1e-10,
                                   msg=name)


def test_eval_matches_grid_path_and_mask_cache_follows_weight_updates(monkeypatch):
    # Whole stages: their mask is expanded to the batch (window groups use one per image).
    monkeypatch.setattr(swin_module.SwinBlock, "_runs_in_window_groups", lambda s, t: False)
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _grid_path(model, x), rtol=1e-5, atol=1e-5)
        table = model.layers[0].blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))  # a cached folded mask must not survive this
        torch.testing.assert_close(model(x), _grid_path(model, x), rtol=1e-5, atol=1e-5)
        caches = [len(b.attn._mask_cache) for stage in model.layers for b in stage.blocks]
        other = torch.randn(3, 3, 32, 32)  # another batch size replaces, not adds, the masks
        torch.testing.assert_close(model(other), _grid_path(model, other), rtol=1e-5, atol=1e-5)
        assert [len(b.attn._mask_cache) for stage in model.layers for b in stage.blocks] == caches


def test_checkpointed_stages_give_the_same_gradients():
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).double()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_swin_first_stage_recomputes_the_mlp_hidden_layer_without_changing_gradients(
    monkeypatch,
):
    monkeypatch.setattr(fused_norm, "RECOMPUTE_CHUNK_TOKENS", 16)  # several chunks per stage
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY))  # float32: the fused Functions serve it
    flags = [[b.recompute_mlp_hidden for b in stage.blocks] for stage in model.layers]
    assert flags == [[True, True], [False] * 3]
    with torch.no_grad():  # no zero biases: a recomputation that dropped one would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 30, 42)
    grads = []
    for recompute in (True, False):
        for block in model.layers[0].blocks:
            block.recompute_mlp_hidden = recompute
        model.zero_grad()
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_norm_mlp_function_matches_modules(monkeypatch, recompute, bias):
    """float32 (the Function's oneDNN matmuls have no float64) against the modules in
    float64, keeping the hidden layer or recomputing it in chunks (21 tokens by 8), with and
    without the linears' biases."""
    monkeypatch.setattr(fused_norm, "RECOMPUTE_CHUNK_TOKENS", 8)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(12)
    fc1, fc2 = torch.nn.Linear(12, 48, bias=bias), torch.nn.Linear(48, 12, bias=bias)
    with torch.no_grad():
        for module in (norm, fc1, fc2):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(3, 7, 12, requires_grad=True)
    grad = torch.randn(3, 7, 12)
    got = fused_norm.norm_mlp(x, norm, fc1, fc2, recompute_hidden=recompute)
    assert type(got.grad_fn).__name__ == "_NormMlpFunctionBackward"
    got_grads = torch.autograd.grad(got, [x, *params], grad)
    with torch.no_grad():
        no_grad = fused_norm.norm_mlp(x, norm, fc1, fc2)  # the fused oneDNN inference calls
    for module in (norm, fc1, fc2):
        module.double()
    x64 = x.detach().double().requires_grad_()
    want = fc2(torch.nn.functional.gelu(fc1(norm(x64))))
    want_grads = torch.autograd.grad(want, [x64, *params], grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_grad.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk", [4096, 50])
def test_norm_mlp_recomputing_its_hidden_layer_keeps_less_and_matches(monkeypatch, autocast, chunk):
    """``recompute_hidden`` saves exactly the hidden layer's bytes fewer. In one chunk it runs
    the same ops as keeping the layer: bit-identical. In several (196 tokens by 50, the last
    one short) only the weight gradients' summation order changes: float32 within 1e-5; bf16
    is held to STYLE's rule in test_bf16_autocast_training_error_within_twice_the_modules_error.
    """
    monkeypatch.setattr(fused_norm, "RECOMPUTE_CHUNK_TOKENS", chunk)
    torch.manual_seed(0)
    norm, fc1, fc2 = torch.nn.LayerNorm(32), torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(4, 49, 32, requires_grad=True)
    grad = torch.randn(4, 49, 32)
    results, kept = {}, {}
    for recompute in (False, True):

        def run(r=recompute):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return fused_norm.norm_mlp(x, norm, fc1, fc2, recompute_hidden=r)

        out, kept[recompute] = saved_tensor_bytes(run, params)
        assert type(out.grad_fn).__name__ == "_NormMlpFunctionBackward"
        results[recompute] = [out, *torch.autograd.grad(out, [x, *params], grad)]
    hidden_bytes = 4 * 49 * 128 * (2 if autocast else 4)
    assert kept[False] - kept[True] == hidden_bytes
    if chunk >= 196:
        for a, b in zip(results[False], results[True]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif not autocast:
        for a, b in zip(results[False], results[True]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_without_norm_matches_modules_and_keeps_less(monkeypatch, recompute, bias):
    """Swin V2's ``fc2(gelu(fc1(x)))`` (its norm comes after): float32 outputs and gradients
    against the modules in float64; it keeps ``x`` and the pre-activation, the modules also
    keep the GELU's output (one hidden layer more); with ``recompute`` not the pre-activation
    either."""
    monkeypatch.setattr(fused_norm, "RECOMPUTE_CHUNK_TOKENS", 8)
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(12, 48, bias=bias), torch.nn.Linear(48, 12, bias=bias)
    params = [*fc1.parameters(), *fc2.parameters()]
    x = torch.randn(3, 7, 12, requires_grad=True)
    grad = torch.randn(3, 7, 12)
    got, kept_fused = saved_tensor_bytes(
        lambda: fused_norm.mlp(x, fc1, fc2, recompute_hidden=recompute), params)
    _, kept_modules = saved_tensor_bytes(lambda: fc2(torch.nn.functional.gelu(fc1(x))), params)
    assert type(got.grad_fn).__name__ == "_NormMlpFunctionBackward"
    hidden_bytes = 3 * 7 * 48 * 4
    assert kept_modules - kept_fused == hidden_bytes * (2 if recompute else 1)
    got_grads = torch.autograd.grad(got, [x, *params], grad)
    with torch.no_grad():
        no_grad = fused_norm.mlp(x, fc1, fc2)  # the fused oneDNN inference calls
    fc1.double(), fc2.double()
    x64 = x.detach().double().requires_grad_()
    want = fc2(torch.nn.functional.gelu(fc1(x64)))
    want_grads = torch.autograd.grad(want, [x64, *params], grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_grad.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_mlp_without_norm_under_bf16_autocast_within_tolerance_rule():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
    params = list(fc1.parameters()) + list(fc2.parameters())
    x = torch.randn(4, 49, 32, requires_grad=True)
    grad = torch.randn(4, 49, 32)

    def modules(t):
        return fc2(torch.nn.functional.gelu(fc1(t)))

    reference = _autocast_grads(modules, x, params, grad, True)
    fast = _autocast_grads(lambda t: fused_norm.mlp(t, fc1, fc2), x, params, grad, True)
    fc1.double(), fc2.double()
    params64 = list(fc1.parameters()) + list(fc2.parameters())
    x64 = x.detach().double().requires_grad_()
    exact = _autocast_grads(modules, x64, params64, grad.double(), False)
    _assert_within_tolerance_rule(exact, reference, fast, floor=1e-2)


@pytest.mark.parametrize("padded", [False, True])
def test_norm_linear_function_matches_modules(padded):
    """float32 (the Function's oneDNN matmul has no float64) against the modules in float64."""
    torch.manual_seed(0)
    norm, layer = torch.nn.LayerNorm(12), torch.nn.Linear(12, 36)
    with torch.no_grad():
        for p in (*norm.parameters(), *layer.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    params = [*norm.parameters(), *layer.parameters()]
    x = torch.randn(3, 8, 12, requires_grad=True)
    grad = torch.randn(3, 8, 36)
    padding = (torch.arange(8) % 3 == 2).view(8, 1) if padded else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = fused_norm.norm_linear(x, norm, layer, padding)
    assert type(got.grad_fn).__name__ == "_NormLinearFunctionBackward"
    # x is kept, the normalised copy of it is not
    assert sum(t.shape == x.shape for t in saved) == 1
    got_grads = torch.autograd.grad(got, [x, *params], grad)
    norm.double(), layer.double()
    x64 = x.detach().double().requires_grad_()
    normed = norm(x64)
    if padded:
        normed = normed.masked_fill(padding, 0.0)
    want = layer(normed)
    want_grads = torch.autograd.grad(want, [x64, *norm.parameters(), *layer.parameters()],
                                     grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_norm_linear_under_bf16_autocast_within_tolerance_rule():
    torch.manual_seed(0)
    norm, layer = torch.nn.LayerNorm(32), torch.nn.Linear(32, 96)
    params = [*norm.parameters(), *layer.parameters()]
    x = torch.randn(4, 49, 32, requires_grad=True)
    grad = torch.randn(4, 49, 96)

    def run(fn, cast):
        return _autocast_grads(fn, x, params, grad, cast)

    with torch.autocast("cpu", enabled=False):
        exact = [t.double() for t in run(lambda t: layer(norm(t)), False)]
    plain = run(lambda t: layer(norm(t)), True)
    fast = run(lambda t: fused_norm.norm_linear(t, norm, layer), True)
    _assert_within_tolerance_rule(exact, plain, fast, 1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_autocast_training_error_within_twice_the_modules_error(monkeypatch, recompute):
    """STYLE's low-precision rule on the fused MLP, keeping the hidden layer or recomputing it
    in chunks (196 tokens by 50): error against float64 at most 2x (output) and 3x
    (gradients) the error of the plain modules under the same autocast, plus a floor."""
    monkeypatch.setattr(fused_norm, "RECOMPUTE_CHUNK_TOKENS", 50)
    torch.manual_seed(0)
    norm, fc1, fc2 = torch.nn.LayerNorm(32), torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(4, 49, 32, requires_grad=True)
    grad = torch.randn(4, 49, 32)

    def run(fn, cast):
        return _autocast_grads(fn, x, params, grad, cast)

    modules = lambda t: fc2(torch.nn.functional.gelu(fc1(norm(t))))  # noqa: E731
    with torch.autocast("cpu", enabled=False):
        exact = [t.double() for t in run(modules, False)]  # float32 is far below bf16 noise
    plain = run(modules, True)
    fast = run(lambda t: fused_norm.norm_mlp(t, norm, fc1, fc2, recompute_hidden=recompute), True)
    _assert_within_tolerance_rule(exact, plain, fast, 1e-5)


def test_swin_tiny_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    name = "swin_tiny_patch4_window7_224"
    peer = timm.create_model(name, drop_path_rate=0.0).eval()
    ours = winattn_create(name)
    ours.load_state_dict({k: v for k, v in peer.state_dict().items()
                          if "relative_position_index" not in k and "attn_mask" not in k})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4)


def winattn_create(name):
    from winattn import create_model

    return create_model(name, drop_path_rate=0.0).eval()


# --------------------------------------------------------------------------- grouped inference
from winattn.models import swin as swin_module  # noqa: E402
from winattn.ops.backends import sdpa as sdpa_module  # noqa: E402
from winattn.ops.backends.sdpa import explicit_attention  # noqa: E402


@pytest.mark.parametrize("mask_rows", [None, 1, 4, 12])
def test_explicit_attention_matches_dense_in_float64(mask_rows):
    gen = torch.Generator().manual_seed(2)
    rows, heads, tokens, head_dim = 12, 3, 9, 8
    qkv = torch.randn(rows, tokens, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the model passes them
    mask = None
    logits = q @ k.transpose(-1, -2) * 0.3
    if mask_rows is not None:
        mask = torch.randn(mask_rows, heads, tokens, tokens, generator=gen, dtype=torch.float64)
        logits = logits + mask.repeat(rows // mask_rows, 1, 1, 1)  # windows innermost
    want = (logits.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.3), want, rtol=1e-12, atol=1e-12)


def _plain_and_grouped(monkeypatch, model, x, group_tokens, force=False):
    """The model's output on the whole-stage path and on the grouped path, and how many
    window runs the grouped path attended."""
    runs = []
    original = swin_module.WindowAttention.forward_window_rows

    def counted(self, chunk, plan, first):
        runs.append((chunk.shape[0], first))
        return original(self, chunk, plan, first)

    monkeypatch.setattr(swin_module.WindowAttention, "forward_window_rows", counted)
    chooser = swin_module.SwinBlock._runs_in_window_groups
    with torch.no_grad():
        monkeypatch.setattr(swin_module.SwinBlock, "_runs_in_window_groups", lambda s, t: False)
        plain = model(x)
        assert not runs
        monkeypatch.setattr(swin_module, "WINDOW_GROUPS_FROM_TOKENS", 0)
        monkeypatch.setattr(swin_module, "WINDOW_GROUP_TOKENS", group_tokens)
        if force:  # float64: the grouped path's bookkeeping checked exactly
            chooser = lambda self, t: not self.training  # noqa: E731
        monkeypatch.setattr(swin_module.SwinBlock, "_runs_in_window_groups", chooser)
        grouped = model(x)
    return plain, grouped, runs


@pytest.mark.parametrize("group_tokens", [32, 80, 10**6])  # 2 windows, 5 -> 4 windows, images
def test_grouped_inference_matches_whole_stage_exactly_in_float64(monkeypatch, group_tokens):
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).double().eval()
    x = torch.randn(3, 3, 30, 42, dtype=torch.float64)  # padded maps, shifted windows
    plain, grouped, runs = _plain_and_grouped(monkeypatch, model, x, group_tokens, force=True)
    assert runs and any(first > 0 for _, first in runs) == (group_tokens < 10**6)
    torch.testing.assert_close(grouped, plain, rtol=1e-10, atol=1e-10)


def test_grouped_bf16_inference_error_within_twice_the_whole_stage_error(monkeypatch):
    monkeypatch.setattr(sdpa_module, "cpu_has_amx", lambda: False)  # AMX: no groups in bf16
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(3, 3, 30, 42)
    with torch.no_grad():
        exact = model.double()(x.double())
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, grouped, runs = _plain_and_grouped(monkeypatch, model, x, 32)
    assert runs
    plain_error = (plain.double() - exact).abs().max()
    assert (grouped.double() - exact).abs().max() <= 2 * plain_error + 1e-3


def test_bf16_inference_runs_a_small_stage_as_one_group(monkeypatch):
    monkeypatch.setattr(sdpa_module, "cpu_has_amx", lambda: False)  # AMX: no groups in bf16
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(3, 3, 30, 42)
    runs = []
    original = swin_module.WindowAttention.forward_window_rows

    def counted(self, chunk, plan, first):
        runs.append((chunk.shape[0], first, 3 * plan.num_windows))
        return original(self, chunk, plan, first)

    monkeypatch.setattr(swin_module.WindowAttention, "forward_window_rows", counted)
    monkeypatch.setattr(swin_module, "WINDOW_GROUPS_FROM_TOKENS", 10**12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    blocks = sum(len(stage.blocks) for stage in model.layers)
    assert len(runs) == blocks  # every block of every stage, each in one call
    assert all(size == rows and first == 0 for size, first, rows in runs)


def test_bf16_inference_weights_and_biases_follow_updates_and_models_still_deepcopy():
    import copy

    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)

    def run(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float()

    first = run(model)  # caches packed bf16 weights for every linear
    twin = copy.deepcopy(model)  # the cache is not part of the module
    torch.testing.assert_close(run(twin), first)
    with torch.no_grad():
        model.layers[0].blocks[0].mlp.fc1.weight.mul_(2.0)  # not to be served from the cache
    assert not torch.allclose(run(model), first)
    torch.testing.assert_close(run(model), run(copy.deepcopy(model)))
    before = run(model)
    with torch.no_grad():
        model.layers[0].blocks[0].attn.proj.bias.add_(1.0)  # nor a bias (cached cast too)
    assert not torch.allclose(run(model), before)
    torch.testing.assert_close(run(model), run(copy.deepcopy(model)))
    before = run(model)
    with torch.no_grad():
        model.head.fc.weight.mul_(2.0)  # nor the classifier's (the head runs oneDNN too)
    assert not torch.allclose(run(model), before)
    torch.testing.assert_close(run(model), run(copy.deepcopy(model)))


# --------------------------------------------------------------------------- attention path
def test_attention_paths_compute_the_same_function_and_auto_is_window_order_on_cpu(monkeypatch):
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).double().eval()
    x = torch.randn(2, 3, 30, 42, dtype=torch.float64)
    grid_calls = []
    original = swin_module.SwinStage._forward_grid
    monkeypatch.setattr(swin_module.SwinStage, "_forward_grid",
                        lambda self, t: grid_calls.append(1) or original(self, t))
    outputs = {}
    with torch.no_grad():
        for path in ("auto", "window-order", "grid"):
            model.set_attention_path(path)
            grid_calls.clear()
            outputs[path] = model(x)
            assert bool(grid_calls) == (path == "grid"), path
    torch.testing.assert_close(outputs["grid"], outputs["window-order"], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="path='flash'"):
        model.set_attention_path("flash")


def test_auto_path_expects_the_fused_kernel_only_on_cuda_with_triton(monkeypatch):
    import types

    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))
    cpu_like = types.SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.delenv("WINATTN_BACKEND", raising=False)
    monkeypatch.setattr(swin_module, "triton_available", lambda: True)
    assert swin_module.fused_kernel_expected(cuda_like)
    assert not swin_module.fused_kernel_expected(cpu_like)
    monkeypatch.setenv("WINATTN_BACKEND", "sdpa")  # another backend forced: keep window order
    assert not swin_module.fused_kernel_expected(cuda_like)
    monkeypatch.delenv("WINATTN_BACKEND")
    monkeypatch.setattr(swin_module, "triton_available", lambda: False)
    assert not swin_module.fused_kernel_expected(cuda_like)


@pytest.mark.parametrize("amx", [False, True])
def test_float32_gradients_through_onednn_match_float64(monkeypatch, amx):
    """The fused linears' float32 backward (without AMX oneDNN for the weight gradients at few
    rows and the BLAS at many; with AMX the BLAS) against the plain modules in float64."""
    monkeypatch.setattr(sdpa_module, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    norm, fc1, fc2 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    qkv = torch.nn.Linear(16, 48)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters(), *qkv.parameters()]
    for rows in (3 * 7, 3000):  # below and above the oneDNN weight-gradient limit
        x = torch.randn(rows, 16, requires_grad=True)
        grad = torch.randn(rows, 16)
        got = fused_norm.norm_mlp(x, norm, fc1, fc2) + fused.linear(x, qkv)[:, :16]
        got_grads = torch.autograd.grad(got, [x, *params], grad)
        xd = x.detach().double().requires_grad_()
        ref_params = [p.detach().double().requires_grad_() for p in params]
        n_w, n_b, w1, b1, w2, b2, wq, bq = ref_params
        normed = torch.nn.functional.layer_norm(xd, (16,), n_w, n_b, norm.eps)
        hidden = torch.nn.functional.gelu(torch.nn.functional.linear(normed, w1, b1))
        want = torch.nn.functional.linear(hidden, w2, b2)
        want = want + torch.nn.functional.linear(xd, wq, bq)[:, :16]
        want_grads = torch.autograd.grad(want, [xd, *ref_params], grad.double())
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"{rows} {i}")


# --------------------------------------------------------------------------- small pieces
@pytest.mark.parametrize("size", [(32, 32), (30, 42)])  # the second pads to (32, 44)
def test_patch_embedding_as_one_matmul_equals_the_convolution(size):
    import copy

    from winattn.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=8).double()
    with torch.no_grad():  # LayerNorm affine parameters away from 1 and 0
        embed.norm.weight.uniform_(0.5, 1.5)
        embed.norm.bias.normal_()
    x = torch.randn(2, 3, *size, dtype=torch.float64)

    def by_convolution(module, images):
        pad = (0, -size[1] % 4, 0, -size[0] % 4)
        out = module.proj(torch.nn.functional.pad(images, pad))
        return module.norm(out.permute(0, 2, 3, 1))

    def by_matmul(images):
        return embed.norm(embed._embed_patches(torch.nn.functional.pad(images, pad)))

    pad = (0, -size[1] % 4, 0, -size[0] % 4)
    results = []
    for run in (by_matmul, functools.partial(by_convolution, embed)):
        embed.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append([out.detach(), *(p.grad.clone() for p in embed.parameters())])
    assert results[0][0].shape == (2, -(-size[0] // 4), -(-size[1] // 4), 8)
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)

    # Under bf16 autocast: the matmul's error within STYLE's rule of the convolution's.
    single = copy.deepcopy(embed).float()
    grad = torch.randn_like(results[0][0])
    exact = _autocast_grads(functools.partial(by_convolution, embed),
                            x.clone().requires_grad_(), list(embed.parameters()), grad, False)
    x32, params = x.float().requires_grad_(), list(single.parameters())
    reference = _autocast_grads(functools.partial(by_convolution, single), x32, params,
                                grad.float(), True)
    fast = _autocast_grads(single, x32, params, grad.float(), True)
    _assert_within_tolerance_rule(exact, reference, fast, floor=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert single._embeds_by_matmul(x32)  # the path the comparison above took
    # float32 keeps the convolution: the peers' rounding, bit for bit.
    assert not single._embeds_by_matmul(x32)
    with torch.no_grad():
        torch.testing.assert_close(single(x32), by_convolution(single, x32), rtol=0, atol=0)


def test_patch_embedding_cached_kernel_follows_updates():
    from winattn.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=8).eval()
    x = torch.randn(1, 3, 16, 16)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            before = embed(x).float()
            embed.proj.weight.mul_(-1.0)  # an in-place update: the cached kernel is stale
            after = embed(x).float()
            embed.proj.weight.mul_(-1.0)
        assert not torch.allclose(before, after)


def test_cached_masks_are_contiguous_for_sdpa():
    # SDPA's CPU kernel copies a strided mask on every call; the folded masks are built
    # contiguous (the bias gathered from the table is a permuted view).
    import winattn
    from winattn.ops.backends.sdpa import combine_mask

    bias = torch.randn(4, 4, 3).permute(2, 0, 1)  # (heads, N, N), strided
    assert combine_mask(None, bias, torch.bfloat16).is_contiguous()
    assert combine_mask(torch.zeros(5, 4, 4), bias, torch.float32).is_contiguous()
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        model = winattn.create_model(name, depths=(2, 2), num_heads=(1, 2), embed_dim=16,
                                     num_classes=3).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        masks = [entry[1] for module in model.modules() if hasattr(module, "_mask_cache")
                 for entry in module._mask_cache._entries.values()]
        assert masks and all(m is None or m.is_contiguous() for m in masks), name


def test_linear_add_is_the_residual_plus_the_linear():
    """``fused.linear_add``: the residual added inside the oneDNN call. float32 within 1e-5 of
    the modules; bf16 within STYLE's rule of the modules' bf16 error (it rounds once where
    they round twice); with gradients it is the plain sum, and gradients flow."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32)
    x, residual = torch.randn(2, 49, 48), torch.randn(2, 49, 32) * 4
    with torch.no_grad():
        torch.testing.assert_close(fused.linear_add(x, layer, residual),
                                   residual + layer(x), rtol=1e-5, atol=1e-5)
        exact = residual.double() + torch.nn.functional.linear(
            x.double(), layer.weight.double(), layer.bias.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = fused.linear_add(x, layer, residual.bfloat16())
            modules = residual.bfloat16() + layer(x)
        assert ours.dtype == torch.bfloat16
        ours_err = (ours.double() - exact).abs().max().item()
        modules_err = (modules.double() - exact).abs().max().item()
        assert ours_err <= 2 * modules_err + 1e-3, (ours_err, modules_err)
    x.requires_grad_()
    out = fused.linear_add(x, layer, residual)
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 49, 48))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lean_inference_blocks_equal_the_general_eval_path(monkeypatch, dtype):
    """``SwinBlock._infer`` (eval with the weights prepared once per block and no per-call
    checks) gives the general eval path's output bit for bit, on padded maps with shifted
    windows, and follows in-place weight updates and replaced parameters."""
    monkeypatch.setattr(swin_module.SwinBlock, "_runs_in_window_groups", lambda s, t: False)
    calls = []
    lean = swin_module.SwinBlock._infer

    def counted(self, *args):
        calls.append(self)
        return lean(self, *args)

    monkeypatch.setattr(swin_module.SwinBlock, "_infer", counted)
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(2, 3, 30, 42)
    blocks = [b for stage in model.layers for b in stage.blocks]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast:
            calls.clear()
            ours = model(x)
            assert len(calls) == len(blocks)
            with monkeypatch.context() as m:
                m.setattr(fused, "inference_ready", lambda *a: False)
                general = model(x)
            assert len(calls) == len(blocks)  # the general path did not come through _infer
        return ours, general

    ours, general = both()
    assert torch.equal(ours, general)
    block = blocks[1]
    with torch.no_grad():
        block.mlp.fc1.weight.mul_(3.0)
        block.attn.qkv.bias = torch.nn.Parameter(torch.randn_like(block.attn.qkv.bias))
    updated, general = both()
    assert torch.equal(updated, general)
    assert not torch.equal(updated, ours)


def test_float32_inference_takes_whole_stages_below_the_group_size(monkeypatch):
    """float32 eval chooses the whole-stage path (``_infer``) for a stage that would be one
    window group, and groups for a larger one; both give the same output."""
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(1, 3, 32, 32)  # stage 1: 256 tokens, stage 2: 64
    with torch.no_grad():
        expected = model(x)
    for limit, grouped in ((10**6, False), (0, True)):
        monkeypatch.setattr(swin_module, "WINDOW_GROUPS_FROM_TOKENS", limit)
        with torch.no_grad():
            tokens = torch.randn(1, 64, 16)
            assert model.layers[0].blocks[0]._runs_in_window_groups(tokens) is grouped
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
