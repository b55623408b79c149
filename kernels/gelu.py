"""GELU with an optional fused bias: ``y = gelu(x + b)``, elementwise over (M, N) rows.

Exact GELU, with Φ and φ the standard normal CDF and density::

    gelu(z)  = z · Φ(z) = z/2 · (1 + erf(z / √2))
    gelu'(z) = Φ(z) + z · φ(z),          φ(z) = exp(−z²/2) / √(2π)

Tanh approximation (``approximate="tanh"``), with k = √(2/π) and c = 0.044715::

    u        = k · (z + c·z³),   t = tanh(u)
    gelu(z)  = z/2 · (1 + t)
    gelu'(z) = (1 + t)/2 + z/2 · (1 − t²) · k · (1 + 3c·z²)

Triton 3.6 and 3.9 share no tanh intrinsic, so tanh is built from ``e = exp(−2|u|)``,
which lies in (0, 1] and cannot overflow::

    tanh(u) = sign(u) · (1 − e) / (1 + e),      1 − tanh²(u) = 4e / (1 + e)²

The second form matters: ``1 − t·t`` loses all digits where t ≈ ±1, and gelu' multiplies
that by a term that grows like z³.

Backward: ``dx = dy · gelu'(x + b)`` and ``db = Σ_rows dx``. The bias gradient is reduced
deterministically: each program walks a fixed set of row blocks for its column block
and writes its column sums to its own row of a (num_programs_m, N) fp32 buffer, which is
summed afterwards. No atomics, so the backward is bitwise reproducible.

Limits: x is (M, N) with unit column stride (rows may have any stride); bias is (N,)
contiguous, broadcast over rows. fp16, bf16 or fp32 input, bias in x's dtype or fp32;
``x + b`` and the GELU are computed in fp32 and rounded once, to x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import empty as _empty
from ._utils import launch, program_slots, row_config

_MAX_BLOCK_N = 1024

_SQRT1_2 = tl.constexpr(0.7071067811865476)       # 1/√2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)     # √(2/π)
_C = tl.constexpr(0.044715)


def _config(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an (M, N) problem."""
    return row_config(M, N, _MAX_BLOCK_N, max_warps=8)


def _row_programs_bwd(device: torch.device, row_blocks: int, col_blocks: int) -> int:
    """Programs along the rows in the backward with bias: enough to fill the GPU about
    twice over, each looping over its row blocks. Fixed per shape: deterministic."""
    return max(1, min(row_blocks, triton.cdiv(program_slots(device), col_blocks)))


@triton.jit
def _tanh_sech2(u):
    """(tanh(u), 1 − tanh²(u)) without overflow or cancellation."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """gelu(z) for fp32 z."""
    if APPROX_TANH:
        t, _ = _tanh_sech2((z + z * z * z * _C) * _SQRT_2_PI)
        return 0.5 * z * (1.0 + t)
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))


@triton.jit
def _gelu_grad(z, APPROX_TANH: tl.constexpr):
    """gelu'(z) for fp32 z."""
    if APPROX_TANH:
        # Constants sit right of the tensors: the interpreter mishandles constexpr * tensor.
        t, sech2 = _tanh_sech2((z + z * z * z * _C) * _SQRT_2_PI)
        du_dz = (z * z * (3.0 * 0.044715) + 1.0) * _SQRT_2_PI
        return 0.5 * (1.0 + t) + 0.5 * z * sech2 * du_dz
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf


@triton.jit
def _load_z(X, B, stride_xm, rows64, cols, col_mask, mask, HAS_BIAS: tl.constexpr):
    """z = x + b for a (BLOCK_M, BLOCK_N) tile, in fp32."""
    z = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    z = z.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0)
        z += b.to(tl.float32)[None, :]
    return z


@triton.jit
def _gelu_fwd_kernel(
    X,  # (M, N) input; row stride stride_xm, unit column stride
    B,  # (N,) bias (only read when HAS_BIAS)
    Y,  # (M, N) output, X's dtype
    stride_xm, stride_ym,
    M, N,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One flat grid over (row block, column block) tiles: grid dims 1 and 2 are capped
    # at 65535 on CUDA, so neither count may go there.
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # row · stride can pass 2**31
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    z = _load_z(X, B, stride_xm, rows64, cols, col_mask, mask, HAS_BIAS)
    y = _gelu(z, APPROX_TANH)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY,       # (M, N) gradient of y
    X,        # (M, N) the forward's input
    B,        # (N,) bias (only read when HAS_BIAS)
    DX,       # (M, N) gradient of x, X's dtype
    DB_PART,  # (ROW_PROGRAMS, N) fp32: row p holds Σ dx over row program p's rows
    stride_dym, stride_xm, stride_dxm,
    M, N,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (p, c) handles column block c of row blocks p, p + P, p + 2P, ... (P row
    # programs): a fixed split, so the dbias partial sums are the same on every run.
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    row_prog = pid // col_blocks
    row_progs = tl.num_programs(0) // col_blocks
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for rb in range(row_prog, tl.cdiv(M, BLOCK_M), row_progs):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mask = (rows < M)[:, None] & col_mask[None, :]
        z = _load_z(X, B, stride_xm, rows64, cols, col_mask, mask, HAS_BIAS)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        dx = dy.to(tl.float32) * _gelu_grad(z, APPROX_TANH)  # 0 on masked lanes (dy = 0)
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        db += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PART + row_prog.to(tl.int64) * N + cols, db, mask=col_mask)


def gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """``gelu(x + bias)``; x (M, N) with unit column stride, bias (N,) or None,
    approximate ``"none"`` or ``"tanh"``. Returns y (M, N) contiguous in x's dtype."""
    M, N = x.shape
    y = _empty((M, N), x.dtype, x.device)
    if M > 0 and N > 0:
        block_m, block_n, num_warps = _config(M, N)
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        launch(_gelu_fwd_kernel)[(tiles,)](
            x, x if bias is None else bias, y, x.stride(0), y.stride(0), M, N,
            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y


def gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of ``gelu_fwd``: ``dx`` (M, N) in x's dtype and ``dbias`` (N,) in
    bias's dtype (None without bias). dy, x: (M, N) with unit column stride."""
    M, N = x.shape
    dx = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:  # nothing to launch; the sum over no rows is 0
        return dx, None if bias is None else torch.zeros(N, dtype=bias.dtype, device=x.device)
    block_m, block_n, num_warps = _config(M, N)
    row_blocks, col_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    # Without bias there is nothing to reduce: one program per tile.
    row_progs = (_row_programs_bwd(x.device, row_blocks, col_blocks) if bias is not None
                 else row_blocks)
    db_part = _empty((row_progs, N), torch.float32, x.device) if bias is not None else None
    launch(_gelu_bwd_kernel)[(row_progs * col_blocks,)](
        dy, x, x if bias is None else bias, dx, dx if db_part is None else db_part,
        dy.stride(0), x.stride(0), dx.stride(0), M, N,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if bias is None:
        return dx, None
    return dx, db_part.sum(dim=0).to(bias.dtype)
