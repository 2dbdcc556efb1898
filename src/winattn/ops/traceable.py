"""A shape-generic windowed attention for exporters and compilers.

The cached :class:`~winattn.ops.geometry.WindowPlan` builds its gather maps and masks from
Python ints: an exporter would freeze them into constants of one input size, and a compiler
would recompile for every size. This path computes the same function from the traced sizes:
zero-pad, ``torch.roll``, reshape into windows, a mask built with ``arange`` on the padded sizes,
attention, and the way back. It is used while tracing (``torch.compile``, ``torch.export``, the
ONNX exporter) and matches the cached path (tests/test_export.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import SHIFT_REGION_PENALTY


def is_tracing() -> bool:
    """True while torch.compile / torch.export / the ONNX exporter trace the caller."""
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _axis_geometry(
    size, window: int, shift: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Per position of the shifted, padded axis: its shift region and whether it is padding."""
    padded = (size + window - 1) // window * window
    shifted = torch.arange(padded, device=device)
    # The padded coordinate read at each shifted position, (r + s) mod P; written without a
    # modulo by the traced size, which the ONNX converter cannot lower.
    source = shifted + shift
    source = torch.where(source >= padded, source - padded, source)
    if shift > 0:
        region = (shifted >= padded - window).long() + (shifted >= padded - shift).long()
    else:
        region = torch.zeros_like(shifted)
    return region, source >= size, padded


def traceable_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: tuple[int, ...],
    shift_size: tuple[int, ...],
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """:func:`~winattn.window_attention`'s function, written with shape-generic tensor ops.

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)``, 1 to 3 grid axes.
        window_size, shift_size: one int per grid axis (already validated by the caller).
        bias: ``(heads, N, N)`` or None.
        scale: multiplies q.k.

    Returns:
        ``(B, *grid, heads, head_dim)``.
    """
    ndim = q.dim() - 3
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    grid = q.shape[1:-2]
    tokens = math.prod(window_size)
    device = q.device

    regions, pads, padded = [], [], []
    for n, w, s in zip(grid, window_size, shift_size):
        region, is_pad, p = _axis_geometry(n, w, s, device)
        regions.append(region)
        pads.append(is_pad)
        padded.append(p)
    counts = [p // w for p, w in zip(padded, window_size)]  # windows per axis

    def to_windows(t: torch.Tensor) -> torch.Tensor:
        pad: list = [0, 0, 0, 0]  # head_dim, heads
        for n, p in zip(reversed(grid), reversed(padded)):
            pad += [0, p - n]
        t = F.pad(t, pad)  # (B, *padded, heads, d)
        if any(shift_size):
            t = torch.roll(t, [-s for s in shift_size], list(range(1, ndim + 1)))
        split = [batch]
        for c, w in zip(counts, window_size):
            split += [c, w]
        t = t.reshape(*split, heads, head_dim)  # (B, c0, w0, c1, w1, ..., heads, d)
        order = [0] + [1 + 2 * a for a in range(ndim)] + [2 * ndim + 1]
        order += [2 + 2 * a for a in range(ndim)] + [2 * ndim + 2]
        t = t.permute(order)  # (B, c0, c1, ..., heads, w0, w1, ..., d)
        return t.reshape(batch, -1, heads, tokens, head_dim)  # (B, nW, heads, N, d)

    # Window-partition the per-position region ids and padding flags the same way.
    region = torch.zeros((), dtype=torch.long, device=device)
    is_pad = torch.zeros((), dtype=torch.bool, device=device)
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = -1
        region = region * 3 + regions[axis].view(shape)
        is_pad = is_pad | pads[axis].view(shape)
    split = []
    for c, w in zip(counts, window_size):
        split += [c, w]
    order = [2 * a for a in range(ndim)] + [2 * a + 1 for a in range(ndim)]
    region = region.expand(*padded).reshape(split).permute(order).reshape(-1, tokens)  # (nW, N)
    is_pad = is_pad.expand(*padded).reshape(split).permute(order).reshape(-1, tokens)  # (nW, N)

    logits = torch.matmul(to_windows(q) * scale, to_windows(k).transpose(-1, -2))
    # (B, nW, heads, N, N); softmax in at least float32, as the peers under autocast
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    penalty = (region[:, :, None] != region[:, None, :]).to(logits.dtype) * SHIFT_REGION_PENALTY
    mask = penalty.masked_fill(is_pad[:, None, :], float("-inf"))  # (nW, N, N)
    logits = logits + mask[:, None]
    out = torch.matmul(logits.softmax(dim=-1).to(v.dtype), to_windows(v))  # (B, nW, heads, N, d)

    # Back: windows -> padded grid, undo the shift, crop the padding.
    split = [batch] + counts + [heads] + list(window_size) + [head_dim]
    out = out.reshape(split)  # (B, c0, c1, ..., heads, w0, w1, ..., d)
    order = [0]
    for a in range(ndim):
        order += [1 + a, 2 + ndim + a]
    order += [1 + ndim, 2 + 2 * ndim]
    out = out.permute(order).reshape(batch, *padded, heads, head_dim)  # (B, *padded, heads, d)
    if any(shift_size):
        out = torch.roll(out, list(shift_size), list(range(1, ndim + 1)))
    for axis, n in enumerate(grid):
        out = out.narrow(axis + 1, 0, n)
    return out
