"""Triton kernels of the fused shifted-window attention: forward, dq, and dk/dv/d(bias).

Imported only by :mod:`.triton_window`, and only once a call has been routed to Triton, so the
core never needs triton. The kernels read q, k, v straight from the grid layout
``(B, *grid, heads, head_dim)`` (any strides) and write the output straight back to it: the
padding, the cyclic shift, the window partition and Swin's shift-region mask are index
arithmetic inside the kernel, never a copy.

Every grid is handled as 3-D: a 1-D grid ``(n,)`` is ``(1, 1, n)`` and a 2-D grid ``(h, w)`` is
``(1, h, w)``, with window 1 and shift 0 on the added axes, which leaves the semantics unchanged.

Whether the kernels run compiled on a GPU or in Triton's CPU interpreter is fixed when this
module is first imported (``TRITON_INTERPRET=1`` at that moment: interpreter); see
:data:`INTERPRETED`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: True when the kernels below were built for Triton's CPU interpreter (numpy), not compiled.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Masked logits. Keys outside the window (padding, block overhang) get -inf; the running max
# starts at a finite -1e30 so a key block that is all padding gives exp(-inf) = 0, never NaN.
_RUNNING_MAX_INIT = tl.constexpr(-1.0e30)


# The kernels use only triton.language builtins and jit functions of this module, never the
# jit functions of triton's standard library (tl.max, tl.sum, tl.zeros): those are built when
# triton is first imported, and if that was before TRITON_INTERPRET was set (torch imports
# triton early), the interpreter cannot call them.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def _slot_coords(
    slot,
    j0,
    j1,
    j2,
    n0,
    n1,
    n2,
    P0,
    P1,
    P2,
    W0: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
):
    """For in-window slots (row-major) of window (j0, j1, j2): the padded-grid coordinate of each
    slot per axis, whether it is a real (unpadded) position, and its Swin shift-region id."""
    t2 = slot % W2
    t1 = (slot // W2) % W1
    t0 = slot // (W1 * W2)
    # Coordinates on the shifted, padded grid; that grid is torch.roll(padded, -s), so shifted
    # coordinate r holds padded coordinate (r + s) mod P.
    r0 = j0 * W0 + t0
    r1 = j1 * W1 + t1
    r2 = j2 * W2 + t2
    p0 = (r0 + S0) % P0
    p1 = (r1 + S1) % P1
    p2 = (r2 + S2) % P2
    real = (p0 < n0) & (p1 < n1) & (p2 < n2)
    # Regions [0, P-w), [P-w, P-s), [P-s, P) of the shifted axis. With s = 0 the second test
    # never holds and the first is constant inside a window, so no penalty arises.
    g0 = (r0 >= P0 - W0).to(tl.int32) + (r0 >= P0 - S0).to(tl.int32)
    g1 = (r1 >= P1 - W1).to(tl.int32) + (r1 >= P1 - S1).to(tl.int32)
    g2 = (r2 >= P2 - W2).to(tl.int32) + (r2 >= P2 - S2).to(tl.int32)
    region = (g0 * 3 + g1) * 3 + g2
    return p0, p1, p2, real, region


@triton.jit
def _window_of_program(pid, num_windows, nw1, nw2):
    """Batch index and per-axis window index of a program that serves one (batch, window)."""
    b = pid // num_windows
    wid = pid % num_windows
    j2 = wid % nw2
    j1 = (wid // nw2) % nw1
    j0 = wid // (nw1 * nw2)
    return b, j0, j1, j2


@triton.jit
def _logits(
    q,
    k,
    Bias,
    h,
    offs_m,
    offs_n,
    region_m,
    region_n,
    key_ok,
    scale,
    N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """scale * q.k + bias + Swin's -100 between shift regions, -inf for keys not in the window.

    Returns float32 ``[BLOCK_M, BLOCK_N]``.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    if HAS_BIAS:
        bias_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        bias_ptrs = Bias + h * N * N + offs_m[:, None] * N + offs_n[None, :]
        s += tl.load(bias_ptrs, mask=bias_ok, other=0.0).to(tl.float32)
    s = tl.where(region_m[:, None] != region_n[None, :], s - 100.0, s)
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(
    Q, K, V, Bias, Out, Lse,
    s_b, s_0, s_1, s_2, s_h, s_d,  # q, k, v strides (shared)
    o_b, o_0, o_1, o_2, o_h,  # out strides (contiguous, last stride 1)
    l_b, l_0, l_1, l_2,  # lse strides (contiguous, heads last)
    n0, n1, n2, P0, P1, P2, nw1, nw2, num_windows,
    scale,
    HEAD_DIM: tl.constexpr,
    N: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: one (batch, window), one head, BLOCK_M query slots; online softmax over the
    window's keys in blocks of BLOCK_N."""
    b, j0, j1, j2 = _window_of_program(tl.program_id(0), num_windows, nw1, nw2)
    h = tl.program_id(1)
    b = b.to(tl.int64)  # batch offsets can pass 2**31 elements
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    qp0, qp1, qp2, q_real, region_m = _slot_coords(
        offs_m, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
    )
    q_ok = (offs_m < N) & q_real
    q_rows = b * s_b + qp0 * s_0 + qp1 * s_1 + qp2 * s_2 + h * s_h
    q = tl.load(
        Q + q_rows[:, None] + offs_d[None, :] * s_d, mask=q_ok[:, None] & d_ok[None, :], other=0.0
    ).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], _RUNNING_MAX_INIT, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp0, kp1, kp2, k_real, region_n = _slot_coords(
            offs_n, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
        )
        k_ok = (offs_n < N) & k_real
        k_rows = b * s_b + kp0 * s_0 + kp1 * s_1 + kp2 * s_2 + h * s_h
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kv_offs = k_rows[:, None] + offs_d[None, :] * s_d
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = _logits(
            q, k, Bias, h, offs_m, offs_n, region_m, region_n, k_ok, scale,
            N, HAS_BIAS, DOT_PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_rows = b * o_b + qp0 * o_0 + qp1 * o_1 + qp2 * o_2 + h * o_h
    tl.store(
        Out + o_rows[:, None] + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=q_ok[:, None] & d_ok[None, :],
    )
    l_rows = b * l_b + qp0 * l_0 + qp1 * l_1 + qp2 * l_2 + h
    tl.store(Lse + l_rows, m_i + tl.log(l_i), mask=q_ok)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, Bias, DOut, Lse, Delta, DQ,
    s_b, s_0, s_1, s_2, s_h, s_d,
    o_b, o_0, o_1, o_2, o_h,  # strides of dout and dq (contiguous)
    l_b, l_0, l_1, l_2,  # strides of lse and delta
    n0, n1, n2, P0, P1, P2, nw1, nw2, num_windows,
    scale,
    HEAD_DIM: tl.constexpr,
    N: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: dq of BLOCK_M query slots of one (batch, window, head), recomputing the
    attention from the saved log-sum-exp."""
    b, j0, j1, j2 = _window_of_program(tl.program_id(0), num_windows, nw1, nw2)
    h = tl.program_id(1)
    b = b.to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    qp0, qp1, qp2, q_real, region_m = _slot_coords(
        offs_m, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
    )
    q_ok = (offs_m < N) & q_real
    q_mask = q_ok[:, None] & d_ok[None, :]
    q_rows = b * s_b + qp0 * s_0 + qp1 * s_1 + qp2 * s_2 + h * s_h
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * s_d, mask=q_mask, other=0.0).to(DOT_DTYPE)
    o_rows = b * o_b + qp0 * o_0 + qp1 * o_1 + qp2 * o_2 + h * o_h
    do = tl.load(DOut + o_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
    l_rows = b * l_b + qp0 * l_0 + qp1 * l_1 + qp2 * l_2 + h
    lse = tl.load(Lse + l_rows, mask=q_ok, other=0.0)
    delta = tl.load(Delta + l_rows, mask=q_ok, other=0.0)

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp0, kp1, kp2, k_real, region_n = _slot_coords(
            offs_n, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
        )
        k_ok = (offs_n < N) & k_real
        k_rows = b * s_b + kp0 * s_0 + kp1 * s_1 + kp2 * s_2 + h * s_h
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kv_offs = k_rows[:, None] + offs_d[None, :] * s_d
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = _logits(
            q, k, Bias, h, offs_m, offs_n, region_m, region_n, k_ok, scale,
            N, HAS_BIAS, DOT_PRECISION,
        )  # fmt: skip
        # Padded query slots have no output, hence no gradient: their rows are dropped.
        p = tl.where(q_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=DOT_PRECISION)

    tl.store(
        DQ + o_rows[:, None] + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask
    )


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, Bias, DOut, Lse, Delta, DK, DV, DBias,
    s_b, s_0, s_1, s_2, s_h, s_d,
    o_b, o_0, o_1, o_2, o_h,  # strides of dout, dk, dv (contiguous)
    l_b, l_0, l_1, l_2,
    n0, n1, n2, P0, P1, P2, nw1, nw2, num_windows,
    scale,
    bias_replicas,
    HEAD_DIM: tl.constexpr,
    N: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: dk, dv of BLOCK_N key slots of one (batch, window, head), looping over the
    window's query blocks; d(bias) tiles are added atomically into one of ``bias_replicas``
    float32 copies of the bias (fewer programs contend for one address), summed afterwards."""
    pid = tl.program_id(0)
    b, j0, j1, j2 = _window_of_program(pid, num_windows, nw1, nw2)
    h = tl.program_id(1)
    b = b.to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    kp0, kp1, kp2, k_real, region_n = _slot_coords(
        offs_n, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
    )
    k_ok = (offs_n < N) & k_real
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k_rows = b * s_b + kp0 * s_0 + kp1 * s_1 + kp2 * s_2 + h * s_h
    kv_offs = k_rows[:, None] + offs_d[None, :] * s_d
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dbias_base = DBias + (pid % bias_replicas).to(tl.int64) * (N * N * tl.num_programs(1))
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qp0, qp1, qp2, q_real, region_m = _slot_coords(
            offs_m, j0, j1, j2, n0, n1, n2, P0, P1, P2, W0, W1, W2, S0, S1, S2
        )
        q_ok = (offs_m < N) & q_real
        q_mask = q_ok[:, None] & d_ok[None, :]
        q_rows = b * s_b + qp0 * s_0 + qp1 * s_1 + qp2 * s_2 + h * s_h
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * s_d, mask=q_mask, other=0.0)
        q = q.to(DOT_DTYPE)
        o_rows = b * o_b + qp0 * o_0 + qp1 * o_1 + qp2 * o_2 + h * o_h
        do = tl.load(DOut + o_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
        do = do.to(DOT_DTYPE)
        l_rows = b * l_b + qp0 * l_0 + qp1 * l_1 + qp2 * l_2 + h
        lse = tl.load(Lse + l_rows, mask=q_ok, other=0.0)
        delta = tl.load(Delta + l_rows, mask=q_ok, other=0.0)

        s = _logits(
            q, k, Bias, h, offs_m, offs_n, region_m, region_n, k_ok, scale,
            N, HAS_BIAS, DOT_PRECISION,
        )  # fmt: skip
        p = tl.where(q_ok[:, None], tl.exp(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p.to(DOT_DTYPE)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            tile_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
            tile = dbias_base + h * N * N + offs_m[:, None] * N + offs_n[None, :]
            tl.atomic_add(tile, ds, mask=tile_ok)

    o_rows = b * o_b + kp0 * o_0 + kp1 * o_1 + kp2 * o_2 + h * o_h
    out_offs = o_rows[:, None] + offs_d[None, :]
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Launchers


#: Upper bound on the float32 scratch that holds the d(bias) replicas.
_BIAS_SCRATCH_BYTES = 64 * 2**20
_MAX_BIAS_REPLICAS = 16


def _geometry3(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Pad a 1-D or 2-D geometry to 3-D with leading axes of size 1, window 1, shift 0."""
    extra = 3 - len(grid)
    return (1,) * extra + tuple(grid), (1,) * extra + tuple(window), (0,) * extra + tuple(shift)


def _grid_strides(t: torch.Tensor, grid_ndim: int) -> tuple[int, ...]:
    """Strides (batch, axis0, axis1, axis2, rest...) with 0 for the added size-1 grid axes."""
    strides = t.stride()
    extra = 3 - grid_ndim
    return (strides[0],) + (0,) * extra + tuple(strides[1:])


def launch_config(tokens: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings (reasoned, not tuned on hardware: see docs/triton.md).

    tl.dot needs every tile dimension >= 16. float32 uses IEEE products (FMA loops, no tensor
    cores), so its tiles are halved to keep registers and shared memory in bounds. A Swin window
    (N <= 64) is one tile, so the key loop has one trip and software pipelining would only add
    shared memory: one stage.
    """
    largest = 32 if dtype == torch.float32 else 64
    block = max(16, min(largest, triton.next_power_of_2(tokens)))
    return dict(
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=4,
        num_stages=1,
    )


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """The dtype the tiles enter tl.dot in, and the dot's input precision.

    float32 uses IEEE products (no TF32) so float32 results match the float32 reference. The
    interpreter computes a bfloat16 tl.dot wrongly (numpy has no bfloat16), so there bfloat16
    tiles are widened to float32 first; compiled kernels use the bfloat16 tensor-core dot.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRETED):
        return tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "tf32"


def _launch_args(
    q: torch.Tensor,
    grid: tuple[int, ...],
    window: tuple[int, ...],
    shift: tuple[int, ...],
) -> tuple[tuple, dict, tuple[int, int, int]]:
    """Geometry arguments shared by the three kernels, their constexprs, and the launch grid."""
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    n, w, s = _geometry3(grid, window, shift)
    padded = tuple(math.ceil(a / b) * b for a, b in zip(n, w))
    per_axis = tuple(p // b for p, b in zip(padded, w))
    num_windows = math.prod(per_axis)
    tokens = math.prod(w)
    config = launch_config(tokens, head_dim, q.dtype)
    dot_dtype, precision = _dot_types(q.dtype)
    geometry = (*n, *padded, per_axis[1], per_axis[2], num_windows)
    constexprs = dict(
        HEAD_DIM=head_dim,
        N=tokens,
        W0=w[0], W1=w[1], W2=w[2],
        S0=s[0], S1=s[1], S2=s[2],
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision,
        **config,
    )  # fmt: skip
    launch = (batch * num_windows, heads, triton.cdiv(tokens, config["BLOCK_M"]))
    return geometry, constexprs, launch


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    window: tuple[int, ...],
    shift: tuple[int, ...],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. q, k, v share one stride set; bias is contiguous or None.

    Returns the output ``(B, *grid, heads, head_dim)`` (contiguous, q's dtype) and the float32
    log-sum-exp of every real query ``(B, *grid, heads)``, which the backward reuses.
    """
    grid = tuple(q.shape[1:-2])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    geometry, constexprs, launch = _launch_args(q, grid, window, shift)
    _forward_kernel[launch](
        q, k, v, bias if bias is not None else q, out, lse,
        *_grid_strides(q, len(grid)),
        *_grid_strides(out, len(grid))[:-1],
        *_grid_strides(lse, len(grid))[:-1],
        *geometry,
        scale,
        HAS_BIAS=bias is not None,
        **constexprs,
    )  # fmt: skip
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    window: tuple[int, ...],
    shift: tuple[int, ...],
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused backward: dq, dk, dv in q's dtype and layout (contiguous), d(bias) summed over batch
    and windows in bias's dtype (None unless ``bias_grad``).

    ``dout`` and ``out`` are contiguous; ``lse`` is the forward's.
    """
    grid = tuple(q.shape[1:-2])
    heads = q.shape[-2]
    # delta_i = sum_d dO_i * O_i, the softmax backward's row term, in lse's layout.
    delta = (dout.float() * out.float()).sum(-1)  # (B, *grid, heads)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    geometry, constexprs, launch = _launch_args(q, grid, window, shift)
    tokens = constexprs["N"]
    strides = (
        *_grid_strides(q, len(grid)),
        *_grid_strides(dq, len(grid))[:-1],
        *_grid_strides(lse, len(grid))[:-1],
    )
    has_bias = bias is not None
    bias_arg = bias if has_bias else q
    _backward_dq_kernel[launch](
        q, k, v, bias_arg, dout, lse, delta, dq,
        *strides,
        *geometry,
        scale,
        HAS_BIAS=has_bias,
        **constexprs,
    )  # fmt: skip

    bias_grad = bias_grad and has_bias
    replicas = 1
    if bias_grad:
        per_copy = heads * tokens * tokens * 4
        replicas = max(1, min(_MAX_BIAS_REPLICAS, launch[0], _BIAS_SCRATCH_BYTES // per_copy))
        dbias_scratch = torch.zeros(
            (replicas, heads, tokens, tokens), dtype=torch.float32, device=q.device
        )
    else:
        dbias_scratch = lse  # never written: BIAS_GRAD is off
    kv_launch = (launch[0], launch[1], triton.cdiv(tokens, constexprs["BLOCK_N"]))
    _backward_dkdv_kernel[kv_launch](
        q, k, v, bias_arg, dout, lse, delta, dk, dv, dbias_scratch,
        *strides,
        *geometry,
        scale,
        replicas,
        HAS_BIAS=has_bias,
        BIAS_GRAD=bias_grad,
        **constexprs,
    )  # fmt: skip
    dbias = dbias_scratch.sum(0).to(bias.dtype) if bias_grad else None
    return dq, dk, dv, dbias
