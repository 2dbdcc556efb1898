"""The CPU-specific choices follow the CPU: bf16 inference in window groups on matmul attention
without AMX, whole stages on SDPA with it; float32 backward matmuls through oneDNN without AMX,
the BLAS with it (docs/fast-path.md has the measurements behind each). Whichever CPU runs
the tests, both branches are exercised by setting ``cpu_has_amx``."""

from __future__ import annotations

import pytest
import torch

from winattn import SwinConfig, SwinTransformer
from winattn.layers import fused
from winattn.models import swin as swin_module
from winattn.ops.backends import sdpa

TINY = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
            window_size=4, num_classes=5, drop_path_rate=0.0)


def test_the_probe_can_be_overridden_by_the_environment(monkeypatch):
    try:
        for value, want in (("1", True), ("0", False)):
            monkeypatch.setenv("WINATTN_CPU_AMX", value)
            sdpa.cpu_has_amx.cache_clear()
            assert sdpa.cpu_has_amx() is want
    finally:
        monkeypatch.delenv("WINATTN_CPU_AMX")
        sdpa.cpu_has_amx.cache_clear()


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_inference_path_follows_the_cpu(monkeypatch, amx):
    monkeypatch.setattr(sdpa, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    x = torch.randn(2, 3, 30, 42)  # padded maps, shifted windows
    with torch.no_grad():
        exact = model.double()(x.double())
    model.float()
    grouped_calls = []
    original = swin_module.WindowAttention.forward_window_rows
    monkeypatch.setattr(swin_module.WindowAttention, "forward_window_rows",
                        lambda self, *a: grouped_calls.append(1) or original(self, *a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert bool(grouped_calls) == (not amx)
    assert sdpa.prefers_matmuls(torch.zeros(1, dtype=torch.bfloat16)) == (not amx)
    # STYLE's rule against the float64 model, with the grid path's bf16 error as the yardstick.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_attention_path("grid")
        reference = model(x)
        model.set_attention_path("auto")
    reference_error = (reference.double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * reference_error + 1e-3


@pytest.mark.parametrize("amx", [False, True])
def test_float32_backward_matmuls_follow_the_cpu(monkeypatch, amx):
    monkeypatch.setattr(sdpa, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(40, 16, requires_grad=True)
    out = fused.linear(x, layer)
    onednn_calls = []
    original = fused._matmul_forward
    monkeypatch.setattr(fused, "_matmul_forward",
                        lambda *a: onednn_calls.append(1) or original(*a))
    grads = torch.autograd.grad(out, [x, layer.weight], torch.ones_like(out))
    assert bool(onednn_calls) == (not amx)
    want = torch.autograd.grad(layer(x), [x, layer.weight], torch.ones_like(out))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
