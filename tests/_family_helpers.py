"""Shared checks for the local-attention family tests: fast path vs dense oracle, forward and
backward, in float64 and under STYLE.md's low-precision tolerance rule."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Fn = Callable[..., torch.Tensor]


def random_inputs(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]


def forward_backward(fn: Fn, inputs: Sequence[torch.Tensor], dtype: torch.dtype, grad_out_seed=1):
    """Run ``fn`` on fresh leaves in ``dtype``; return the output and the input gradients
    (float64) for a fixed random upstream gradient."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    generator = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.double(), [g.double() for g in grads]


def assert_matches_oracle(
    fast: Fn, oracle: Fn, inputs: Sequence[torch.Tensor], dtype=torch.float64
):
    """Fast path in ``dtype`` vs the oracle in float64: outputs and every input gradient."""
    out_ref, grads_ref = forward_backward(oracle, inputs, torch.float64)
    out, grads = forward_backward(fast, inputs, dtype)
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}
    torch.testing.assert_close(out, out_ref, **tol[dtype])
    for index, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(
            g, g_ref, **tol[dtype], msg=lambda m: f"grad of input {index}: {m}"
        )


def assert_low_precision_rule(
    fast: Fn, oracle: Fn, inputs: Sequence[torch.Tensor], dtype=torch.bfloat16, floor=1e-3
):
    """STYLE.md's rule: the fast path's error against the float64 oracle is at most 2x (outputs)
    or 3x (gradients) the oracle's own error when run in ``dtype``, plus a small floor."""
    out_ref, grads_ref = forward_backward(oracle, inputs, torch.float64)
    out_low_ref, grads_low_ref = forward_backward(oracle, inputs, dtype)
    out, grads = forward_backward(fast, inputs, dtype)
    err = (out - out_ref).abs().max().item()
    ref_err = (out_low_ref - out_ref).abs().max().item()
    assert err <= 2 * ref_err + floor, f"output error {err:.3g} vs oracle-in-{dtype} {ref_err:.3g}"
    for index, (g, g_low, g_ref) in enumerate(zip(grads, grads_low_ref, grads_ref)):
        err = (g - g_ref).abs().max().item()
        ref_err = (g_low - g_ref).abs().max().item()
        assert err <= 3 * ref_err + floor, (
            f"grad {index}: error {err:.3g} vs oracle-in-{dtype} {ref_err:.3g}"
        )
