"""Gated activations over (M, N) rows: ``y = act(a) · b`` (SwiGLU, GEGLU), and ``y = act(a)``.

The Llama MLP is ``down(silu(gate(x)) · up(x))``: ``a`` is the gate projection, ``b`` the
up projection. One pass reads a and b and writes y; eager torch writes ``act(a)`` and
reads it back.

Activations, with σ(a) = 1 / (1 + e^(−a))::

    silu(a)  = a · σ(a)
    silu'(a) = σ(a) + a · σ(a) · (1 − σ(a)) = σ(a) · (1 + a · (1 − σ(a)))
    gelu, gelu'  (exact erf or tanh form): as in kernels/gelu.py, whose helpers are used

σ cannot overflow into a NaN: for a → −∞, e^(−a) = inf gives σ = 0 and silu = −0; for
a → +∞, σ = 1.

Backward of ``y = act(a) · b``::

    da = dy · b · act'(a),      db = dy · act(a)

and of ``y = act(a)`` (no gate): ``da = dy · act'(a)``. The forward saves nothing: the
backward recomputes act(a) from a, which is cheaper than storing and reading it back.
Each element is independent, so there is no reduction and the result is deterministic.

Limits: a, b, dy (M, N) with unit column stride and any row stride (the two halves
``x[:, :N]``, ``x[:, N:]`` of one (M, 2N) tensor are such views); a and b share a dtype,
fp16, bf16 or fp32. The math runs in fp32 and each output is rounded once.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ._utils import empty as _empty
from ._utils import launch, row_config
from .gelu import _gelu, _gelu_grad

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_MAX_BLOCK_N = 1024


def _config(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an (M, N) problem."""
    return row_config(M, N, _MAX_BLOCK_N, max_warps=8)


@triton.jit
def _act_and_grad(a, ACT: tl.constexpr):
    """(act(a), act'(a)) for fp32 a; ACT is one of ``ACTIVATIONS``."""
    if ACT == "silu":
        sig = 1.0 / (1.0 + tl.exp(-a))
        return a * sig, sig * (1.0 + a * (1.0 - sig))
    else:
        return _gelu(a, ACT == "gelu_tanh"), _gelu_grad(a, ACT == "gelu_tanh")


@triton.jit
def _act(a, ACT: tl.constexpr):
    """act(a) for fp32 a."""
    if ACT == "silu":
        return a / (1.0 + tl.exp(-a))
    else:
        return _gelu(a, ACT == "gelu_tanh")


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row offsets (int64), column offsets and mask of tile ``pid`` of a flat grid over
    (row block, column block) tiles: grid dims 1 and 2 are capped at 65535 on CUDA."""
    col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64), cols, mask    # row · stride can pass 2**31


@triton.jit
def _swiglu_fwd_kernel(
    A,  # (M, N) gate input; row stride stride_am, unit column stride
    B,  # (M, N) up input, A's dtype (only read when HAS_GATE)
    Y,  # (M, N) output, A's dtype
    stride_am, stride_bm, stride_ym,
    M, N,
    ACT: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows64, cols, mask = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    a = tl.load(A + rows64[:, None] * stride_am + cols[None, :], mask=mask, other=0.0)
    y = _act(a.to(tl.float32), ACT)
    if HAS_GATE:
        b = tl.load(B + rows64[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0)
        y = y * b.to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # (M, N) gradient of y
    A,   # (M, N) the forward's gate input
    B,   # (M, N) the forward's up input (only read when HAS_GATE)
    DA,  # (M, N) gradient of a, A's dtype
    DB,  # (M, N) gradient of b, B's dtype (only written when HAS_GATE)
    stride_dym, stride_am, stride_bm, stride_dam, stride_dbm,
    M, N,
    ACT: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows64, cols, mask = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    a = tl.load(A + rows64[:, None] * stride_am + cols[None, :], mask=mask, other=0.0)
    act, act_grad = _act_and_grad(a.to(tl.float32), ACT)
    if HAS_GATE:
        b = tl.load(B + rows64[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0)
        tl.store(DB + rows64[:, None] * stride_dbm + cols[None, :],
                 (dy * act).to(DB.dtype.element_ty), mask=mask)
        dy = dy * b.to(tl.float32)
    tl.store(DA + rows64[:, None] * stride_dam + cols[None, :],
             (dy * act_grad).to(DA.dtype.element_ty), mask=mask)


def _grid(M: int, N: int) -> tuple[tuple[int], int, int, int]:
    block_m, block_n, num_warps = _config(M, N)
    return (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),), block_m, block_n, num_warps


def swiglu_fwd(a: Tensor, b: Optional[Tensor], activation: str) -> Tensor:
    """``act(a) · b`` (``act(a)`` when b is None); a, b (M, N) with unit column stride,
    activation one of ``ACTIVATIONS``. Returns y (M, N) contiguous in a's dtype."""
    M, N = a.shape
    y = _empty((M, N), a.dtype, a.device)
    if M > 0 and N > 0:
        grid, block_m, block_n, num_warps = _grid(M, N)
        gate = a if b is None else b
        launch(_swiglu_fwd_kernel)[grid](
            a, gate, y, a.stride(0), gate.stride(0), y.stride(0), M, N,
            ACT=activation, HAS_GATE=b is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y


def _launch_bwd(dy: Tensor, a: Tensor, b: Optional[Tensor], da: Tensor, db: Optional[Tensor],
                activation: str) -> None:
    M, N = a.shape
    if M == 0 or N == 0:
        return
    grid, block_m, block_n, num_warps = _grid(M, N)
    gate = a if b is None else b
    dgate = da if db is None else db
    launch(_swiglu_bwd_kernel)[grid](
        dy, a, gate, da, dgate, dy.stride(0), a.stride(0), gate.stride(0), da.stride(0),
        dgate.stride(0), M, N, ACT=activation, HAS_GATE=b is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def swiglu_bwd(dy: Tensor, a: Tensor, b: Optional[Tensor], activation: str
               ) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of ``swiglu_fwd``: da (M, N) in a's dtype and db (M, N) in b's dtype
    (None without b), both contiguous. dy, a, b: (M, N) with unit column stride."""
    M, N = a.shape
    da = _empty((M, N), a.dtype, a.device)
    db = None if b is None else _empty((M, N), b.dtype, b.device)
    _launch_bwd(dy, a, b, da, db, activation)
    return da, db


def swiglu_packed_bwd(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    """Gradient of ``swiglu_fwd(x[:, :N], x[:, N:])`` for x (M, 2N) with unit column
    stride, dy (M, N): dx (M, 2N) contiguous in x's dtype, ``[da | db]``, written by one
    launch (no concatenation)."""
    M, N2 = x.shape
    N = N2 // 2
    dx = _empty((M, N2), x.dtype, x.device)
    _launch_bwd(dy, x[:, :N], x[:, N:], dx[:, :N], dx[:, N:], activation)
    return dx
