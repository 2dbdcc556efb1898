"""A shape-generic windowed attention for exporters and compilers.

The cached :class:`~winattn.ops.geometry.WindowPlan` builds its gather maps and masks from
Python ints: an exporter would freeze them into constants of one input size, and a compiler
would recompile for every size. This path computes the same function from the traced sizes:
zero-pad, a gather for the cyclic shift, reshape into windows, a mask built with ``arange`` on
the padded sizes, attention, and the way back. The shift may itself be a tensor computed from
the traced size (:class:`TracedWindows`), so a model's window decisions stay in the graph. It
is used while tracing (``torch.compile``, ``torch.export``, the ONNX exporter) and matches the
cached path (tests/test_export.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from .backends import forced_backend
from .geometry import SHIFT_REGION_PENALTY

#: Set by :func:`shape_generic`: eager calls take the path of traced graphs.
_shape_generic_forced = False


def is_tracing() -> bool:
    """True while torch.compile / torch.export / the ONNX exporter trace the caller (or inside
    :func:`shape_generic`)."""
    return (
        _shape_generic_forced
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


@contextlib.contextmanager
def shape_generic() -> Iterator[None]:
    """Run eager code on the shape-generic path that exported and compiled graphs take.

    What a ``dynamic=True`` ONNX export computes at a size, without exporting: models inside
    this context take the same path (tensor-valued window decisions, unconditional padding,
    no cached plans), op for op.

    Example:
        >>> import torch, winattn  # doctest: +SKIP
        >>> model = winattn.create_model("swin_tiny_patch4_window7_224").eval()  # doctest: +SKIP
        >>> with torch.no_grad(), winattn.ops.traceable.shape_generic():  # doctest: +SKIP
        ...     traced_like = model(torch.randn(1, 3, 160, 160))
    """
    global _shape_generic_forced
    previous, _shape_generic_forced = _shape_generic_forced, True
    try:
        yield
    finally:
        _shape_generic_forced = previous


def use_traceable_path(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether a traced call takes the shape-generic path instead of the dispatcher.

    Always under the ONNX exporter (a graph of standard ops). Under torch.compile / torch.export
    too, except when a backend is forced (argument or ``WINATTN_BACKEND``) or the tensors are on
    a GPU, where the dispatcher's fused kernels (custom ops) are what the compiled graph should
    call.
    """
    if torch.onnx.is_in_onnx_export() or _shape_generic_forced:
        return True
    if not is_tracing():
        return False
    return forced_backend(backend) is None and x.device.type == "cpu"


class TracedWindows(NamedTuple):
    """A block's window decision as tensors of the traced size, for the shape-generic path.

    Swin picks a block's shift (and shrinks its window) by comparing the feature map with the
    window. Branching on a traced size would freeze one choice into an exported graph (or make
    a compiler specialise on it), so models state the choice as 0-d long tensors instead, and
    the path applies it with tensor ops: a shift of 0 rolls nothing and cuts no regions; a key
    limit masks the keys at and past it, which turns a padded window into the shrunk one.

    Attributes:
        shift: per axis, the cyclic shift in use.
        key_limit: per axis, keys at this padded coordinate or beyond are excluded (``None``:
            only the operator's own padding is).
        window: per axis, the window the eager path would use (a shrunk window's extent), for
            position biases that depend on it (Swin V2's coordinate normalisation).
    """

    shift: tuple[torch.Tensor, ...]
    key_limit: tuple[torch.Tensor, ...] | None
    window: tuple[torch.Tensor, ...]


Shift = Union[int, torch.Tensor]


def _moves(shift: Shift) -> bool:
    """Whether an axis may be shifted: any tensor shift (its value is only known at run time),
    or a positive int."""
    return isinstance(shift, torch.Tensor) or shift > 0


def _axis_geometry(
    size, window: int, shift: Shift, limit: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Per position of the shifted, padded axis: the padded coordinate it reads, its shift
    region and whether it is an excluded key."""
    padded = (size + window - 1) // window * window
    shifted = torch.arange(padded, device=device)
    # The padded coordinate read at each shifted position, (r + s) mod P; written without a
    # modulo by the traced size, which the ONNX converter cannot lower.
    source = shifted + shift
    source = torch.where(source >= padded, source - padded, source)
    if _moves(shift):
        # A tensor shift of 0 makes the second test false everywhere: one region per window.
        region = (shifted >= padded - window).long() + (shifted >= padded - shift).long()
    else:
        region = torch.zeros_like(shifted)
    excluded = source >= size
    if limit is not None:
        excluded = excluded | (source >= limit)
    return source, region, excluded, padded


def traceable_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: tuple[int, ...],
    shift_size: tuple[Shift, ...],
    bias: torch.Tensor | None,
    scale: float,
    key_limit: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """:func:`~winattn.window_attention`'s function, written with shape-generic tensor ops.

    Args:
        q, k, v: ``(B, *grid, heads, head_dim)``, 1 to 3 grid axes.
        window_size: one int per grid axis (already validated by the caller).
        shift_size: one per grid axis: an int, or a 0-d long tensor computed from the traced
            size (:class:`TracedWindows`), ``0 <= shift < window``.
        bias: ``(heads, N, N)`` or None.
        scale: multiplies q.k.
        key_limit: per axis, keys at or past this coordinate are excluded (-inf), as padded
            ones are; ``None``: only padding is.

    Returns:
        ``(B, *grid, heads, head_dim)``.
    """
    ndim = q.dim() - 3
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    grid = q.shape[1:-2]
    tokens = math.prod(window_size)
    device = q.device
    limits = key_limit if key_limit is not None else (None,) * ndim

    sources, regions, excluded, padded = [], [], [], []
    for n, w, s, limit in zip(grid, window_size, shift_size, limits):
        source, region, is_excluded, p = _axis_geometry(n, w, s, limit, device)
        sources.append(source)
        regions.append(region)
        excluded.append(is_excluded)
        padded.append(p)
    counts = [p // w for p, w in zip(padded, window_size)]  # windows per axis
    # Axes that move: the cyclic shift is a gather by ``source`` (a tensor shift cannot go
    # through torch.roll), undone by the inverse gather.
    moving = [a for a, s in enumerate(shift_size) if _moves(s)]

    def to_windows(t: torch.Tensor) -> torch.Tensor:
        pad: list = [0, 0, 0, 0]  # head_dim, heads
        for n, p in zip(reversed(grid), reversed(padded)):
            pad += [0, p - n]
        t = F.pad(t, pad)  # (B, *padded, heads, d)
        for axis in moving:
            t = t.index_select(axis + 1, sources[axis])  # shifted by -s along the axis
        split = [batch]
        for c, w in zip(counts, window_size):
            split += [c, w]
        t = t.reshape(*split, heads, head_dim)  # (B, c0, w0, c1, w1, ..., heads, d)
        order = [0] + [1 + 2 * a for a in range(ndim)] + [2 * ndim + 1]
        order += [2 + 2 * a for a in range(ndim)] + [2 * ndim + 2]
        t = t.permute(order)  # (B, c0, c1, ..., heads, w0, w1, ..., d)
        return t.reshape(batch, -1, heads, tokens, head_dim)  # (B, nW, heads, N, d)

    # Window-partition the per-position region ids and exclusion flags: each axis's flags
    # viewed as (windows, offset) and broadcast to (c0, c1, ..., w0, w1, ...). Built by
    # broadcasting rather than expand+permute, whose strides torch.compile would specialise
    # on a window count of 1.
    region = torch.zeros((), dtype=torch.long, device=device)
    is_excluded = torch.zeros((), dtype=torch.bool, device=device)
    for axis in range(ndim):
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = counts[axis], window_size[axis]
        region = region * 3 + regions[axis].reshape(shape)
        is_excluded = is_excluded | excluded[axis].reshape(shape)
    region = region.reshape(-1, tokens)  # (nW, N)
    is_excluded = is_excluded.reshape(-1, tokens)  # (nW, N)

    logits = torch.matmul(to_windows(q) * scale, to_windows(k).transpose(-1, -2))
    # (B, nW, heads, N, N); softmax in at least float32, as the peers under autocast
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    penalty = (region[:, :, None] != region[:, None, :]).to(logits.dtype) * SHIFT_REGION_PENALTY
    mask = penalty.masked_fill(is_excluded[:, None, :], float("-inf"))  # (nW, N, N)
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
    # One gather per axis undoes the shift and crops the padding at once. A gather, not a
    # slice, also for unshifted axes: a slice is a view whose strides depend on whether the axis
    # was padded, a fact torch.compile would guard on and recompile for.
    for axis, n in enumerate(grid):
        back = torch.arange(n, device=device)
        if axis in moving:
            back = back - shift_size[axis]
            back = torch.where(back < 0, back + padded[axis], back)  # (p - s) mod P
        out = out.index_select(axis + 1, back)
    return out
