"""winattn's CPU kernel for small windows (ops/backends/window_attention.cpp): against the
float64 reference, with every mask form the models pass, strided views of a fused qkv, the
subnormal range, and the dispatch around it (gradients, tracing, the switch, a failed build)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import winattn
from winattn.ops.backends import cpu_kernel, sdpa

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(),
    reason="winattn's CPU kernel is not available here (CPU without AVX512-BF16, no compiler)",
)


def _qkv(rows: int, heads: int, tokens: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v ``(rows, heads, N, 32)``: strided views of one fused ``(rows, N, 3, heads, 32)``
    tensor, as the Swin blocks pass them."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(rows, tokens, 3, heads, 32, generator=gen).to(dtype)
    return fused.permute(2, 0, 3, 1, 4).unbind(0)


def _reference(q, k, v, mask, scale):
    """float64 attention, ``(rows, N, heads, d)``."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = scale * q @ k.transpose(-1, -2)
    if mask is not None:
        windows = mask.shape[0]
        logits = (logits.view(-1, windows, *logits.shape[1:]) + mask.double()).flatten(0, 1)
    return (logits.softmax(-1) @ v).transpose(1, 2)


def _masks(windows: int, heads: int, tokens: int, gen: torch.Generator):
    """Every mask form: none, per window and head, per window broadcast over heads, a shared
    bias ``(1, heads, N, N)``, Swin's -100 between regions and -inf on padded keys."""
    bias = torch.randn(windows, heads, tokens, tokens, generator=gen)
    shift = torch.zeros(windows, 1, tokens, tokens)
    shift[:, :, : tokens // 2, tokens // 2 :] = -100.0
    shift[:, :, tokens // 2 :, : tokens // 2] = -100.0
    padded = bias.clone()
    padded[..., -3:] = float("-inf")  # the last three keys are padding
    return {
        "none": None,
        "per window": bias,
        "heads broadcast": bias[:, :1].contiguous(),
        "shared": bias[:1].contiguous(),
        "shift -100": bias + shift,
        "padding -inf": padded,
    }


@pytest.mark.parametrize("tokens,heads", [(49, 3), (64, 2), (16, 4), (9, 1)])
@pytest.mark.parametrize("mask_name", ["none", "per window", "heads broadcast", "shared",
                                       "shift -100", "padding -inf"])
def test_float32_kernel_matches_float64_reference(tokens, heads, mask_name):
    gen = torch.Generator().manual_seed(tokens + heads)
    windows, batch = 4, 3
    q, k, v = _qkv(batch * windows, heads, tokens, torch.float32)
    mask = _masks(windows, heads, tokens, gen)[mask_name]
    with torch.no_grad():
        out = cpu_kernel.attend(q, k, v, mask, 0.3)
    assert out is not None and out.shape == (batch * windows, tokens, heads, 32)
    assert out.is_contiguous() and out.dtype == torch.float32
    error = (out.double() - _reference(q, k, v, mask, 0.3)).abs().max().item()
    # float32 rounding over at most 64 terms (measured up to 2.2e-6); models' parity is 1e-4.
    assert error < 1e-5, error


@pytest.mark.parametrize("mask_name", ["per window", "shift -100", "padding -inf"])
def test_bf16_kernel_within_the_tolerance_rule(mask_name):
    """Error against float64 at most twice that of PyTorch's own bf16 SDPA kernel."""
    gen = torch.Generator().manual_seed(5)
    windows, batch, heads, tokens = 8, 4, 3, 49
    q, k, v = _qkv(batch * windows, heads, tokens, torch.bfloat16, seed=1)
    mask = _masks(windows, heads, tokens, gen)[mask_name]
    ref = _reference(q, k, v, mask, 32**-0.5)
    with torch.no_grad():
        out = cpu_kernel.attend(q, k, v, mask.to(torch.bfloat16), 32**-0.5)
        expanded = sdpa.expand_to_batch(mask.to(torch.bfloat16), batch * windows)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=expanded, scale=32**-0.5)
    assert out is not None and out.dtype == torch.bfloat16
    error = (out.double() - ref).abs().max().item()
    sdpa_error = (theirs.transpose(1, 2).double() - ref).abs().max().item()
    assert error <= 2 * sdpa_error, (error, sdpa_error)


def test_exponentials_in_the_subnormal_range_come_out_as_zero_and_the_rest_exact():
    """Logits about 100 below their row's maximum (Swin's -100) give probabilities under
    2**-126 of the largest: zero here, as winattn's other CPU paths flush them."""
    q, k, v = _qkv(2, 1, 49, torch.float32, seed=3)
    mask = torch.zeros(1, 1, 49, 49)
    mask[..., 20:] = -100.0
    with torch.no_grad():
        out = cpu_kernel.attend(q, k, v, mask, 1.0)
    expected = _reference(q[..., :, :], k[..., :20, :], v[..., :20, :], None, 1.0)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_attend_qkv_takes_the_kernel_for_forwards_and_never_under_tracing(monkeypatch):
    """Without gradients and in the training Function's forward (whose backward recomputes
    the probabilities itself); not while torch.compile or an exporter traces."""
    q, k, v = _qkv(8, 3, 49, torch.float32)
    mask = torch.randn(4, 3, 49, 49)
    calls = []
    real = cpu_kernel._extension()

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu_kernel, "_extension", lambda: counting)
    with torch.no_grad():
        kernel_out = sdpa.attend_qkv(q, k, v, mask, 0.2)
    assert len(calls) == 1
    leaf = [t.detach().requires_grad_() for t in (q, k, v)]
    with_grad = sdpa.attend_qkv(*leaf, mask, 0.2)
    assert len(calls) == 2 and type(with_grad.grad_fn).__name__.startswith("_WindowAttention")
    assert torch.equal(with_grad.detach(), kernel_out)
    with_grad.square().sum().backward()
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _reference(*reference, mask, 0.2).square().sum().backward()
    for ours, theirs in zip(leaf, reference):
        assert (ours.grad.double() - theirs.grad).abs().max() < 1e-4
    monkeypatch.setattr(cpu_kernel, "_tracing", lambda: True)
    with torch.no_grad():
        sdpa.attend_qkv(q, k, v, mask, 0.2)
    assert len(calls) == 2


def test_calls_it_does_not_fit_go_to_sdpa():
    q, k, v = _qkv(4, 2, 49, torch.float32)
    with torch.no_grad():
        assert cpu_kernel.attend(q[..., :16], k[..., :16], v[..., :16], None, 1.0) is None
        big = torch.randn(2, 1, 100, 32)
        assert cpu_kernel.attend(big, big, big, None, 1.0) is None  # more than 64 tokens
        half = q.half()
        assert cpu_kernel.attend(half, half, half, None, 1.0) is None
        assert cpu_kernel.attend(q, k, v, torch.zeros(3, 2, 49, 49), 1.0) is None  # 3 ∤ 4


def test_switch_off_and_a_failed_build_leave_sdpa_serving(monkeypatch, caplog):
    q, k, v = _qkv(4, 2, 49, torch.float32)
    expected = sdpa._fused_attention(q, k, v, None, 0.5)
    try:
        cpu_kernel._extension.cache_clear()
        monkeypatch.setenv("WINATTN_CPU_KERNEL", "0")
        with torch.no_grad():
            assert cpu_kernel.attend(q, k, v, None, 0.5) is None
            assert torch.equal(sdpa.attend_qkv(q, k, v, None, 0.5), expected)
        cpu_kernel._extension.cache_clear()
        monkeypatch.delenv("WINATTN_CPU_KERNEL")
        from torch.utils import cpp_extension

        def broken(*args, **kwargs):
            raise RuntimeError("no toolchain")

        monkeypatch.setattr(cpp_extension, "load", broken)
        with caplog.at_level(logging.WARNING, logger="winattn"), torch.no_grad():
            assert cpu_kernel.attend(q, k, v, None, 0.5) is None
            assert torch.equal(sdpa.attend_qkv(q, k, v, None, 0.5), expected)
        assert "build failed" in caplog.text
    finally:
        monkeypatch.undo()
        cpu_kernel._extension.cache_clear()
    assert cpu_kernel.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swin_with_the_kernel_matches_swin_without(monkeypatch, dtype):
    """A Swin whose heads are 32 wide (so the kernel serves), padded maps and shifted windows,
    V1 and V2, eval: the kernel against SDPA on the same model."""
    for name, size in (("swin_tiny_patch4_window7_224", 96), ("swinv2_tiny_window8_256", 80)):
        model = winattn.create_model(
            name, depths=(2, 2), num_heads=(1, 2), embed_dim=32, num_classes=10
        ).eval()
        x = torch.randn(2, 3, size, size)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        with torch.no_grad(), autocast:
            with_kernel = model(x).float()
            cpu_kernel._extension.cache_clear()
            monkeypatch.setenv("WINATTN_CPU_KERNEL", "0")
            without = model(x).float()
            monkeypatch.delenv("WINATTN_CPU_KERNEL")
            cpu_kernel._extension.cache_clear()
        tol = 1e-5 if dtype == torch.float32 else 5e-2 * without.abs().max().item()
        assert (with_kernel - without).abs().max().item() < tol, name


def test_grid_operator_with_the_kernel_matches_the_reference():
    """window_attention on a grid the window does not divide (padded keys), shifted, bias."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, 17, 13, 2, 32, generator=gen).unbind(0)
    bias = torch.randn(2, 49, 49, generator=gen)
    with torch.no_grad():
        out = winattn.window_attention(q, k, v, 7, shift_size=3, bias=bias)
        ref = winattn.window_attention(
            q.double(), k.double(), v.double(), 7, shift_size=3, bias=bias.double(),
            backend="reference",
        )
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_converted_masks_are_kept_only_for_masks_that_live():
    """Eval masks (kept by the models) are converted once; a training mask, built afresh each
    step, is converted and dropped; entries go with their masks."""
    q, k, v = _qkv(4, 2, 49, torch.float32)
    cpu_kernel._mask_cache.clear()
    kept = torch.randn(2, 2, 49, 49)
    with torch.no_grad():
        cpu_kernel.attend(q, k, v, kept, 1.0)
        cpu_kernel.attend(q, k, v, kept, 1.0)
        assert len(cpu_kernel._mask_cache) == 1
        for _ in range(5):  # what the training Function's forward passes
            sdpa.attend_without_grad(q, k, v, torch.randn(2, 2, 49, 49), 1.0)
        assert len(cpu_kernel._mask_cache) == 1
        kept.add_(1.0)  # a new version: converted again, same entry
        cpu_kernel.attend(q, k, v, kept, 1.0)
        assert len(cpu_kernel._mask_cache) == 1
    del kept
    with torch.no_grad():
        cpu_kernel.attend(q, k, v, torch.randn(2, 2, 49, 49), 1.0)
    assert len(cpu_kernel._mask_cache) == 1  # the dead mask's entry went


def test_the_kernel_is_an_operator_flop_counters_and_fake_tensors_see():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = _qkv(6, 3, 49, torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cpu_kernel.attend(q, k, v, None, 1.0)
    assert counter.get_total_flops() == 4 * 6 * 3 * 49 * 49 * 32
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        out = torch.ops.winattn_cpu.window_attention(fake, fake, fake, None, 1.0)
    assert out.shape == (6, 49, 3, 32) and out.dtype == torch.bfloat16


def test_flop_count_in_a_fresh_process_includes_the_kernel(monkeypatch):
    """`winattn info --flops` counts the kernel's attention even when the count's forward is
    the first call of the process (the FLOP counter copies its formulas when it starts)."""
    import subprocess
    import sys

    from winattn.cli.commands import count_flops

    code = (
        "import winattn; from winattn.cli.commands import count_flops; "
        "m = winattn.create_model('swin_tiny_patch4_window7_224', depths=(2, 2), "
        "num_heads=(1, 2), embed_dim=32).eval(); print(count_flops(m, (3, 96, 96)))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()[-1]
    model = winattn.create_model(
        "swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(1, 2), embed_dim=32
    ).eval()
    cpu_kernel._extension.cache_clear()
    monkeypatch.setenv("WINATTN_CPU_KERNEL", "0")
    try:
        on_sdpa = count_flops(model, (3, 96, 96))
    finally:
        monkeypatch.delenv("WINATTN_CPU_KERNEL")
        cpu_kernel._extension.cache_clear()
    assert int(fresh) == on_sdpa
