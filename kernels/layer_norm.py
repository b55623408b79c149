"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add.

Forward, for one row h of width N (``h = x + residual`` when a residual is given)::

    mean = (1/N) Σ_j h_j
    var  = (1/N) Σ_j (h_j − mean)²            (biased, as torch)
    rstd = 1 / √(var + eps)
    x̂    = (h − mean) · rstd
    y    = x̂ ⊙ w + b

RMSNorm is the same with ``mean := 0``: ``rstd = 1/√(mean(h²) + eps)``, ``y = h·rstd ⊙ w``.
The forward saves ``mean`` and ``rstd`` per row (fp32), and ``h`` itself when a residual
was added (it is also returned: the next block's residual stream).

Backward. With ``g = dy ⊙ w`` (the gradient reaching x̂) and
``∂x̂_i/∂h_j = rstd · (δ_ij − 1/N − x̂_i x̂_j / N)``::

    dh = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))       LayerNorm
    dh = rstd · (g − x̂ · mean(g ⊙ x̂))                  RMSNorm (no mean to subtract)
    dw = Σ_rows dy ⊙ x̂          db = Σ_rows dy

With a residual, h was also an output, so its incoming gradient is added:
``dx = dresidual = dh + dh_out``.

dw and db are reduced deterministically: each program walks a fixed set of rows and
writes its column sums into its own row of a (num_programs, N) fp32 buffer, which is
then summed over programs. No atomics, so the backward is bitwise reproducible.

Layout of the work:
* Rows that fit in one block (N ≤ MAX_BLOCK_N) are held whole in registers, BLOCK_M rows
  per program (several rows when rows are narrow). Statistics are two-pass (mean, then
  the centred sum of squares) on the registers, so there is no cancellation.
* Wider rows loop over BLOCK_N-wide chunks. The forward merges per-chunk (mean, M2)
  pairs with Chan et al.'s parallel-variance formula (one read for the statistics, a
  second to normalise). The backward makes two passes over its program's rows. Pass 1,
  row by row, sums c1 = mean(g) and c2 = mean(g ⊙ x̂) over the row's chunks into a
  (2, M) fp32 scratch. Pass 2 turns the loops around: column chunks outside, the
  program's rows inside, so a chunk's dw/db sums stay in registers and are written
  once per program, and w is loaded once per chunk. Memory traffic per element for
  fp16/bf16: dy and h read twice and dx written once, 10 bytes (fp32: 20; dh_out adds
  one read), plus 16·P/M bytes of fp32 partial sums written and read back by the
  reduction (P programs, M rows). Holding the row on chip would allow 6; a per-row
  read-modify-write of the fp32 partials, which this replaces, cost 26.

Limits: the last dim must be contiguous (unit stride; rows may have any stride);
fp16, bf16 or fp32 input, weight/bias in the input dtype or fp32; all math in fp32.
``h`` is rounded to the input dtype before it is normalised, exactly as the stored h
that the backward reads, so forward and backward see the same numbers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import empty as _empty
from ._utils import launch, program_slots, row_config

MAX_BLOCK_N = 8192
"""Widest row kept whole in registers; wider rows loop over chunks of this width."""

def _config(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an (M, N) problem."""
    return row_config(M, N, MAX_BLOCK_N, max_warps=16)


def _num_programs_bwd(device: torch.device, row_blocks: int) -> int:
    """Programs of the backward: about two per SM (each loops over its rows), and never
    more than there are row blocks. Fixed for a shape and device, hence deterministic."""
    return max(1, min(row_blocks, program_slots(device)))


# ----------------------------------------------------------------------------- forward


@triton.jit
def _load_h(X, R, stride_xm, stride_rm, rows64, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual) for a (BLOCK_M, BLOCK_N) tile, in the input dtype."""
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the input dtype: that is the h we store and the backward reads.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _normalize_store(h, mean, rstd, W, B, Y, stride_ym, rows64, cols, col_mask, mask,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = (h − mean)·rstd ⊙ w + b for a tile of fp32 h; stored in Y's dtype."""
    y = (h - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(
    X,     # (M, N) input; row stride stride_xm, unit column stride
    R,     # (M, N) residual (only read when HAS_RESIDUAL)
    W,     # (N,) weight (only read when HAS_WEIGHT)
    B,     # (N,) bias (only read when HAS_BIAS)
    Y,     # (M, N) output, X's dtype
    H,     # (M, N) h = x + residual, X's dtype (only written when HAS_RESIDUAL)
    MEAN,  # (M,) fp32 row means (not written for RMSNorm)
    RSTD,  # (M,) fp32 row 1/std
    stride_xm, stride_rm, stride_ym, stride_hm,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr,  # BLOCK_N >= N: the row stays in registers
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # row · stride can pass 2**31
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_h(X, R, stride_xm, stride_rm, rows64, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(H + rows64[:, None] * stride_hm + cols[None, :], h, mask=mask)
        hf = h.to(tl.float32)
        if RMS_NORM:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            var = tl.sum(hf * hf, axis=1) / N
        else:
            mean = tl.sum(hf, axis=1) / N
            # Masked lanes hold 0, so h − mean would add mean² each: zero them.
            d = tl.where(mask, hf - mean[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _normalize_store(hf, mean, rstd, W, B, Y, stride_ym, rows64, cols, col_mask, mask,
                         HAS_WEIGHT, HAS_BIAS)
    else:
        # Pass 1: statistics. Each chunk gives (count n_c, mean_c, M2_c); Chan's merge
        #   mean += δ·n_c/n,  M2 += M2_c + δ²·n_a·n_c/n  (δ = mean_c − mean, n = n_a + n_c)
        # keeps the variance exact without a third read.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            h = _load_h(X, R, stride_xm, stride_rm, rows64, cols, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(H + rows64[:, None] * stride_hm + cols[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            if RMS_NORM:
                m2 += tl.sum(hf * hf, axis=1)
            else:
                n_a = start * 1.0  # elements merged so far
                n_c = tl.sum((cols < N).to(tl.float32), axis=0)  # elements in this chunk
                mean_c = tl.sum(hf, axis=1) / n_c
                d = tl.where(mask, hf - mean_c[:, None], 0.0)
                delta = mean_c - mean
                mean += delta * (n_c / (n_a + n_c))
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_c / (n_a + n_c))
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalise. h is recomputed from x and residual (not read back from H),
        # so no thread reads what another thread of this program wrote.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            h = _load_h(X, R, stride_xm, stride_rm, rows64, cols, mask, HAS_RESIDUAL)
            _normalize_store(h.to(tl.float32), mean, rstd, W, B, Y, stride_ym, rows64, cols,
                             col_mask, mask, HAS_WEIGHT, HAS_BIAS)
    if not RMS_NORM:
        tl.store(MEAN + rows64, mean, mask=row_mask)
    tl.store(RSTD + rows64, rstd, mask=row_mask)


# ---------------------------------------------------------------------------- backward


@triton.jit
def _row_block(rb, M, BLOCK_M: tl.constexpr):
    """(rows as int64, row mask) of row block rb."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < M  # row · stride can pass 2**31


@triton.jit
def _load_stats(MEAN, RSTD, rows64, row_mask, BLOCK_M: tl.constexpr, RMS_NORM: tl.constexpr):
    """(mean, rstd) of a block of rows; mean is 0 for RMSNorm."""
    rstd = tl.load(RSTD + rows64, mask=row_mask, other=0.0)
    if RMS_NORM:
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        mean = tl.load(MEAN + rows64, mask=row_mask, other=0.0)
    return mean, rstd


@triton.jit
def _load_w(W, cols, col_mask, HAS_WEIGHT: tl.constexpr):
    """The weight chunk in fp32, loaded once and reused for every row of the program
    (without weight, a placeholder that ``_load_grad_tile`` never reads)."""
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        w = 0.0
    return w


@triton.jit
def _load_grad_tile(DY, H, w, stride_dym, stride_hm, rows64, cols, mask, mean, rstd,
                    HAS_WEIGHT: tl.constexpr):
    """fp32 tiles (dy, x̂, g = dy ⊙ w); x̂ is zero on masked lanes."""
    dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows64[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    xhat = tl.where(mask, (h.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        g = dy * w[None, :]
    else:
        g = dy
    return dy, xhat, g


@triton.jit
def _store_dx(g, xhat, rstd, c1, c2, DH_OUT, DX, stride_dhm, stride_dxm, rows64, cols, mask,
              HAS_DH_OUT: tl.constexpr):
    """dx = rstd·(g − c1 − x̂·c2) (+ dh_out), with c1 = mean(g), c2 = mean(g ⊙ x̂)."""
    dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    if HAS_DH_OUT:
        dh = tl.load(DH_OUT + rows64[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0)
        dx += dh.to(tl.float32)
    tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=mask)


@triton.jit
def _store_row_sums(DY, H, W, MEAN, RSTD, ROW_SUMS, stride_dym, stride_hm, pid, n_prog, M, N,
                    HAS_WEIGHT: tl.constexpr, RMS_NORM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1 of the chunked backward: c1 = mean(g) and c2 = mean(g ⊙ x̂) of every row of
    this program, over all of the row's chunks, into ROW_SUMS[0] and ROW_SUMS[1]."""
    for rb in range(pid, tl.cdiv(M, BLOCK_M), n_prog):
        rows64, row_mask = _row_block(rb, M, BLOCK_M)
        mean, rstd = _load_stats(MEAN, RSTD, rows64, row_mask, BLOCK_M, RMS_NORM)
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            w = _load_w(W, cols, col_mask, HAS_WEIGHT)  # from L2: the same chunk every row
            dy, xhat, g = _load_grad_tile(DY, H, w, stride_dym, stride_hm, rows64, cols, mask,
                                          mean, rstd, HAS_WEIGHT)
            c2 += tl.sum(g * xhat, axis=1)
            if not RMS_NORM:
                c1 += tl.sum(g, axis=1)
        if not RMS_NORM:
            tl.store(ROW_SUMS + rows64, c1 / N, mask=row_mask)
        tl.store(ROW_SUMS + M + rows64, c2 / N, mask=row_mask)


@triton.jit
def _row_means(g, xhat, ROW_SUMS, rows64, row_mask, M, N, RMS_NORM: tl.constexpr,
               BLOCK_M: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """(c1, c2) = (mean(g), mean(g ⊙ x̂)) per row: from the tile when it holds the whole
    row, else as pass 1 stored them. c1 is 0 for RMSNorm."""
    if WHOLE_ROW:
        c2 = tl.sum(g * xhat, axis=1) / N
    else:
        c2 = tl.load(ROW_SUMS + M + rows64, mask=row_mask, other=0.0)
    if RMS_NORM:
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    elif WHOLE_ROW:
        c1 = tl.sum(g, axis=1) / N
    else:
        c1 = tl.load(ROW_SUMS + rows64, mask=row_mask, other=0.0)
    return c1, c2


@triton.jit
def _layer_norm_bwd_kernel(
    DY,        # (M, N) gradient of y
    H,         # (M, N) the normalised input h (x, or x + residual)
    W,         # (N,) weight (only read when HAS_WEIGHT)
    MEAN,      # (M,) fp32 (not read for RMSNorm)
    RSTD,      # (M,) fp32
    DH_OUT,    # (M, N) gradient of the returned h (only read when HAS_DH_OUT)
    DX,        # (M, N) gradient of x (and of the residual), H's dtype
    DW_PART,   # (num_programs, N) fp32: row p holds program p's Σ dy ⊙ x̂
    DB_PART,   # (num_programs, N) fp32: row p holds program p's Σ dy
    ROW_SUMS,  # (2, M) fp32 scratch, chunked path only: each row's mean(g), mean(g ⊙ x̂)
    stride_dym, stride_hm, stride_dhm, stride_dxm,
    M, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr,  # BLOCK_N >= N: one chunk, the row sums come from the tile
):
    # Program p handles row blocks p, p + P, p + 2P, ...: a fixed split, so the partial
    # sums (and their final reduction) are the same on every run.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    part = pid.to(tl.int64) * N  # this program's row in DW_PART / DB_PART
    if not WHOLE_ROW:
        _store_row_sums(DY, H, W, MEAN, RSTD, ROW_SUMS, stride_dym, stride_hm, pid, n_prog,
                        M, N, HAS_WEIGHT, RMS_NORM, BLOCK_M, BLOCK_N)
        tl.debug_barrier()  # make this program's row sums visible to all its threads
    # Column chunks outside, this program's rows inside: the dw / db column sums of a
    # chunk stay in registers and are written once, with no read-modify-write.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w = _load_w(W, cols, col_mask, HAS_WEIGHT)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for rb in range(pid, tl.cdiv(M, BLOCK_M), n_prog):
            rows64, row_mask = _row_block(rb, M, BLOCK_M)
            mask = row_mask[:, None] & col_mask[None, :]
            mean, rstd = _load_stats(MEAN, RSTD, rows64, row_mask, BLOCK_M, RMS_NORM)
            dy, xhat, g = _load_grad_tile(DY, H, w, stride_dym, stride_hm, rows64, cols, mask,
                                          mean, rstd, HAS_WEIGHT)
            c1, c2 = _row_means(g, xhat, ROW_SUMS, rows64, row_mask, M, N, RMS_NORM, BLOCK_M,
                                WHOLE_ROW)
            _store_dx(g, xhat, rstd, c1, c2, DH_OUT, DX, stride_dhm, stride_dxm, rows64, cols,
                      mask, HAS_DH_OUT)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        if HAS_WEIGHT:
            tl.store(DW_PART + part + cols, dw, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_PART + part + cols, db, mask=col_mask)


# --------------------------------------------------------------------------- launchers


def _stride0(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], eps: float, rms_norm: bool
                   ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """LayerNorm (or RMSNorm) of ``h = x (+ residual)`` over the last dim.

    x, residual: (M, N), unit column stride, any row stride, same dtype (fp16/bf16/fp32).
    weight, bias: (N,) contiguous, x's dtype or fp32.
    Returns ``y`` (M, N) in x's dtype, ``h`` (M, N) in x's dtype (None without residual),
    ``mean`` (M,) fp32 (None for RMSNorm) and ``rstd`` (M,) fp32.
    """
    M, N = x.shape
    y = _empty((M, N), x.dtype, x.device)
    h = None if residual is None else _empty((M, N), x.dtype, x.device)
    mean = None if rms_norm else _empty((M,), torch.float32, x.device)
    rstd = _empty((M,), torch.float32, x.device)
    block_m, block_n, num_warps = _config(M, N)
    if M > 0:
        # Absent tensors are replaced by a tensor that is never read (a kernel argument
        # cannot be None); the constexpr flags say which are real.
        launch(_layer_norm_fwd_kernel)[(triton.cdiv(M, block_m),)](
            x, x if residual is None else residual, x if weight is None else weight,
            x if bias is None else bias, y, y if h is None else h,
            rstd if mean is None else mean, rstd,
            x.stride(0), _stride0(residual), y.stride(0), _stride0(h),
            M, N, eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, RMS_NORM=rms_norm,
            BLOCK_M=block_m, BLOCK_N=block_n, WHOLE_ROW=block_n >= N, num_warps=num_warps)
    return y, h, mean, rstd


def layer_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Optional[Tensor],
                   rstd: Tensor, dresidual_out: Optional[Tensor], has_bias: bool,
                   rms_norm: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``layer_norm_fwd``.

    dy, h, dresidual_out: (M, N), unit column stride; h is the tensor that was normalised
    (x, or the returned x + residual); mean/rstd as returned by the forward.
    Returns ``dx`` (M, N) in h's dtype (the LayerNorm VJP plus ``dresidual_out``: also the
    residual's gradient), ``dweight`` (N,) in weight's dtype (None without weight) and
    ``dbias`` (N,) in weight's dtype, or h's without weight (None unless ``has_bias``).
    """
    M, N = h.shape
    dx = _empty((M, N), h.dtype, h.device)
    block_m, block_n, num_warps = _config(M, N)
    n_prog = _num_programs_bwd(h.device, triton.cdiv(M, block_m))
    dw_part = _empty((n_prog, N), torch.float32, h.device) if weight is not None else None
    db_part = _empty((n_prog, N), torch.float32, h.device) if has_bias else None
    whole_row = block_n >= N
    row_sums = None if whole_row else _empty((2, M), torch.float32, h.device)
    if M > 0:
        launch(_layer_norm_bwd_kernel)[(n_prog,)](
            dy, h, h if weight is None else weight, rstd if mean is None else mean, rstd,
            dx if dresidual_out is None else dresidual_out, dx,
            dx if dw_part is None else dw_part, dx if db_part is None else db_part,
            rstd if row_sums is None else row_sums,
            dy.stride(0), h.stride(0), _stride0(dresidual_out), dx.stride(0),
            M, N,
            HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
            HAS_DH_OUT=dresidual_out is not None, RMS_NORM=rms_norm,
            BLOCK_M=block_m, BLOCK_N=block_n, WHOLE_ROW=whole_row, num_warps=num_warps)
    param_dtype = h.dtype if weight is None else weight.dtype
    dweight = None if weight is None else _reduce_partials(dw_part, M, weight.dtype)
    dbias = _reduce_partials(db_part, M, param_dtype) if has_bias else None
    return dx, dweight, dbias


def _reduce_partials(part: Tensor, M: int, dtype: torch.dtype) -> Tensor:
    """Σ over programs of the (num_programs, N) fp32 partial sums (fixed order: deterministic)."""
    if M == 0:  # no program ran: the buffer holds nothing
        return torch.zeros(part.shape[1], dtype=dtype, device=part.device)
    return part.sum(dim=0).to(dtype)
