"""Flash attention in Triton: forward, backward and their launchers.

What is computed
----------------
For one sequence and query head, with query rows q_i, key rows k_j and value rows v_j
(i < Tq, j < Tk, both counted from the sequence's start) and off = Tk − Tq:

    x_ij = scale · q_i·k_j                           scores
    x_ij = c · tanh(x_ij / c)                        soft cap c > 0 (optional)
    x_ij = x_ij − a · |i + off − j|                  ALiBi slope a (optional)
    x_ij = -inf unless i + off − left ≤ j ≤ i + off + right      the window
    L_i  = log Σ_j exp(x_ij)                         row log-sum-exp (natural log)
    P_ij = exp(x_ij − L_i)                           softmax, never stored
    O_i  = Σ_j P_ij · z_ij · v_j                     z_ij = keep_ij / (1 − p), dropout p

The window (left, right) bounds each side, −1 leaving that side open; causal attention
is right = 0 (with the window's left kept), aligned to the bottom-right as in flash-attn:
query i sees key j ≤ i + (Tk − Tq). With Tq = 1 (decoding) the query sees every key.
A row that sees no key (causal with Tq > Tk, or a window past the keys) gets O_i = 0,
L_i = -inf and no gradient. Dropout keeps key j of row i iff the Philox draw
u(seed, offset, b·H + h, i, j) ≥ p (first word of ``tl.philox(seed, j, i, b·H + h,
offset)`` through ``uint_to_uniform_float``); L is the log-sum-exp of the undropped
scores, and the backward draws the same mask again instead of storing it. Without the
options z = 1 and x_ij = scale · q_i·k_j.

Forward: online softmax. A program owns BLOCK_M query rows and streams over key blocks
of BLOCK_N rows. Per row it keeps the running max m, the running sum l = Σ exp(x − m)
and the unnormalised output acc = Σ exp(x − m)·z·v. When a key block raises the max to
m', everything summed so far was scaled by exp(−m) and must now be scaled by exp(−m'),
so the old sums are multiplied by α = exp(m − m'):

    l   ← α·l   + Σ_j exp(x_ij − m')
    acc ← α·acc + Σ_j exp(x_ij − m')·z_ij·v_j

At the end O = acc / l and L = m + log l. Subtracting the max keeps every exponent ≤ 0,
so scores of ±1e4 stay finite. The exponentials use exp2 with log2(e) folded into the
scale (x₂ = x·log2 e, exp(x) = 2^x₂): one multiply per score fewer. A row that has seen
no key yet has m = -inf; it is exponentiated against 0 instead, which avoids
-inf − (-inf) = NaN. The forward writes O and L only: the Tq×Tk matrix never exists.

Backward keeps L and recomputes P from Q and K (and z from the seed). With dO the
gradient of O:

    dV_j  = Σ_i P_ij z_ij dO_i
    dP_ij = z_ij · dO_i·v_j
    dX_ij = P_ij (dP_ij − Δ_i),   Δ_i = Σ_j P_ij dP_ij = dO_i·O_i     (softmax VJP)
    dS_ij = dX_ij · (1 − tanh²(scale · q_i·k_j / c))    with a soft cap, else dX_ij
    dQ_i  = scale · Σ_j dS_ij k_j
    dK_j  = scale · Σ_i dS_ij q_i

(the ALiBi bias does not depend on q or k). Three kernels: Δ (preprocessing), dK/dV (a
program per key block; it loops over the query heads of its KV group and over the query
blocks) and dQ (a program per query block; it loops over the key blocks). Every output
element is written by exactly one program, with no atomics, so the backward is bitwise
reproducible. That costs 7 matmuls per tile (dK/dV: QKᵀ, PᵀdO, VdOᵀ, dSᵀQ; dQ: QKᵀ,
dOVᵀ, dSK). With ``deterministic=False`` the dK/dV pass also computes dS·K for each
(key block, query block) and adds it to an fp32 dQ with atomics: 5 matmuls, no dQ pass
(FlashAttention-2's backward), but the adds' order, so dQ's last bits, vary by run.

Schedule: programs start roughly in program-id order, so each kernel hands out its
blocks heaviest first (causal: the last query blocks see the most keys, the first key
blocks the most queries); the light ones then fill the last wave.

Masking: a program visits only the blocks that hold a key (or query) its rows can see,
so a window of W keys costs O(T·W), not O(T²). Blocks visible in full to every row they
meet run without a mask; only blocks that straddle an edge of the window or hold the key
tail (Tk not a multiple of BLOCK_N) apply one. Lanes outside the tensors (the query tail,
the head-dim padding) load zeros, which add nothing to any dot product, and are never
stored; in the backward, query rows past Tq also load dO = 0, so they add nothing.

Head dim: tiles are powers of two, so D runs as one tile of BLOCK_D = max(16, next
power of two) columns, padded, or, where that pads much (``head_dim_split``: 80, 96,
192, ...), as two column pieces [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2), both
powers of two, the second masked at D: 96 = 64 + 32 instead of 128. Every tile along D
is then two tiles: a product that contracts D (Q·Kᵀ, dO·Vᵀ) is the sum of two dots, a
product into D (P·V, Pᵀ·dO, dSᵀ·Q, dS·K) two dots into two accumulators. The second
piece's names end in 2 (q2, acc2, K2); without a split (constexpr BLOCK_D2 = 0) they
stand in for the first and no code reads them, so those kernels compile as before.

Variable lengths (varlen): sequences of different lengths packed along one token axis,
q (total_q, H, D), sequence b owning rows cu_seqlens_q[b] : cu_seqlens_q[b + 1] (and
likewise for k, v). The same kernels serve it (constexpr VARLEN): a program reads its
sequence's start and length from cu_seqlens, and the grid, sized from the longest
sequence, has programs past their sequence's end return at once.

Memory paths: on sm_90+ the tiles of Q, K, V, O (dO, dQ, dK, dV) move by TMA (the copy
engine, ``cp.async.bulk.tensor``) through tensor descriptors that each program builds
for its sequence's head (constexpr TMA; ``_rows``), one per head-dim piece (block
shapes (BLOCK, BLOCK_D) and (BLOCK, BLOCK_D2), the second loading at column BLOCK_D):
out-of-bounds rows and head-dim padding load as zeros and are not stored, as the
pointer path's masks do. The launchers take TMA per call when the device has it and
every such tensor qualifies (fp16/bf16, unit stride along D, base and other strides
multiples of 16 bytes: ``_tma_ok``), else masked pointer loads; L, Δ and the atomic
path's fp32 dQ always use pointers.
FASTATTN_TMA=0 turns TMA off. The forward's loops run warp-specialized (constexpr
WARP_SPEC) where Triton applies it: sm_100+ (Triton 3.6-3.9 leave sm_90 loops as they
are).

Limits
------
- Head dim D: any integer in [1, 256], as one tile of max(16, next power of two)
  columns (``tl.dot`` needs K ≥ 16) or two power-of-two pieces (``head_dim_split``:
  80 = 64 + 16, 96 = 64 + 32, 192 = 128 + 64), with masked loads and stores past D.
  The padding left costs matmul work: D = 24 runs 32 columns, 112 runs 128, 200 runs
  256; 80 runs 80, 96 runs 96, 192 runs 192. Δ (a row reduction) keeps the padded
  tile.
- dtypes: fp16, bf16, fp32 (q, k, v alike); accumulation in fp32. fp32 dots use
  ``input_precision="ieee"`` (true fp32, no TF32). ALiBi slopes are fp32.
- Lengths: any Tq, Tk ≥ 1 (dense); in varlen any lengths ≥ 0, with max_seqlen_q/k at
  least the longest (they size the grid; a longer sequence is cut short, unchecked, as
  that needs a device sync). GQA/MQA: H % Hkv == 0, query head h reads KV head
  h // (H // Hkv).
- Any strides (views, transposes, packed QKV slices, stride-0 expands). Offsets
  across batch, heads and sequence starts are int64; inside one sequence's head they
  are int32, so its rows must span fewer than 2**31 elements (the launchers check).
- Dropout: seed in [0, 2**63), offset in [0, 2**32); at most 2**32 query heads
  (b·H + h), query rows and keys per sequence (the Philox counters are 32-bit).
- Under TRITON_INTERPRET=1, ``tl.dot`` on bf16 operands gives wrong results
  (triton#11584); the launchers then set DOT_FP32 and the tiles are cast to fp32
  before each dot.

Sources: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023);
Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018); Press et al.,
"Train Short, Test Long" (ALiBi, 2022); Beltagy et al., "Longformer" (2020) for the
sliding window; Gemma 2 (2024) for the logit soft cap; Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3" (2011) for Philox.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, launch, next_pow2
from ._utils import empty as _empty

LOG2E = math.log2(math.e)
FP8 = torch.float8_e4m3fn
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, FP8)   # FP8: forward
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256


# --------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DOT_FP32: tl.constexpr, acc=None):
    """``a @ b`` (plus the fp32 ``acc``) accumulated in fp32; true-fp32 products when
    IEEE (fp32 inputs)."""
    if DOT_FP32:  # interpreter with bf16 inputs: triton#11584
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot_t(a, a2, b, b2, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
           BLOCK_D2: tl.constexpr):
    """``a @ bᵀ`` of two tiles along the head dim, (M, D) and (N, D): a product that
    contracts D, so with a split (BLOCK_D2 > 0) the sum of the two column pieces'
    products, the second accumulated onto the first (a2, b2: the second pieces)."""
    out = _dot(a, tl.trans(b), IEEE, DOT_FP32)
    if BLOCK_D2 > 0:
        out = _dot(a2, tl.trans(b2), IEEE, DOT_FP32, out)
    return out


@triton.jit
def _program_ids(T, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """(block index along T, batch·head index) of this program. The grid is flat, one
    program per (block, head) pair with the block fastest (so programs that share K/V
    run together): CUDA caps grid axes 1 and 2 at 65,535, which batched decoding
    (e.g. batch 2048 × 32 heads) exceeds; axis 0 takes 2**31 − 1.

    Programs start roughly in program-id order, so the heaviest blocks should take the
    lowest ids: the grid's tail is then light blocks that fill the GPU's last wave
    instead of heavy ones that run on alone. HEAVY_LAST (the blocks at the end of T do
    the most work, as the causal forward's query blocks) hands each head's blocks out
    from the last; otherwise from the first."""
    n_blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    block = pid % n_blocks
    if HEAVY_LAST:
        block = n_blocks - 1 - block
    return block, pid // n_blocks


@triton.jit
def _sequence(CU_SEQLENS, b, T, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: read from cu_seqlens with VARLEN (the start
    in int64, as it scales the whole packed tensor's stride), else (0, T)."""
    start = 0
    if VARLEN:
        first = tl.load(CU_SEQLENS + b)
        T = tl.load(CU_SEQLENS + b + 1) - first
        start = first.to(tl.int64)
    return start, T


@triton.jit
def _slope(SLOPES, b, h, stride_ab, stride_ah, ALIBI: tl.constexpr):
    """ALiBi slope of (sequence b, query head h) in log2 units; 0 without ALIBI."""
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + h * stride_ah) * 1.4426950408889634
    return slope


@triton.jit
def _rows(X, T, stride_m, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, TMA: tl.constexpr):
    """Where ``_load_tiles`` and ``_store_tiles`` find one sequence's head, for each of
    the head dim's two column pieces (``head_dim_split``): with TMA a tensor descriptor
    each, (T, HEAD_DIM) rows of X with row stride ``stride_m`` and unit column stride,
    moved in (BLOCK, BLOCK_D) and (BLOCK, BLOCK_D2) tiles (the copy engine fills what
    lies past T or HEAD_DIM with zeros on a load and drops it on a store); without, X
    twice. Without a split (BLOCK_D2 = 0) the second is the first again, a stand-in
    that no code reads."""
    if TMA:
        src = tl.make_tensor_descriptor(X, shape=[T, HEAD_DIM], strides=[stride_m, 1],
                                        block_shape=[BLOCK, BLOCK_D])
        src2 = src
        if BLOCK_D2 > 0:
            src2 = tl.make_tensor_descriptor(X, shape=[T, HEAD_DIM], strides=[stride_m, 1],
                                             block_shape=[BLOCK, BLOCK_D2])
    else:
        src = X
        src2 = X
    return src, src2


@triton.jit
def _tile_mask(row_ok, col_ok):
    """Mask of a (rows, columns) tile: the rows ``row_ok`` and the columns ``col_ok``,
    one of them None where all exist."""
    if col_ok is None:
        mask = row_ok[:, None]
    elif row_ok is None:
        mask = col_ok[None, :]
    else:
        mask = row_ok[:, None] & col_ok[None, :]
    return mask


@triton.jit
def _load_tile(X, row0, col0, rows, offs_d, stride_m, stride_d, row_ok, col_ok,
               TMA: tl.constexpr):
    """The tile of ``rows`` = row0 + arange(BLOCK) and columns ``offs_d`` = col0 +
    arange(width) of a ``_rows`` source X: one TMA copy, or pointer loads with zeros
    outside the rows ``row_ok`` and the columns ``col_ok`` (None: all exist)."""
    if TMA:
        tile = X.load([row0, col0])
    elif row_ok is None and col_ok is None:
        tile = tl.load(X + rows[:, None] * stride_m + offs_d[None, :] * stride_d)
    else:
        mask = _tile_mask(row_ok, col_ok)
        tile = tl.load(X + rows[:, None] * stride_m + offs_d[None, :] * stride_d,
                       mask=mask, other=0.0)
    return tile


@triton.jit
def _store_tile(X, value, row0, col0, rows, offs_d, stride_m, stride_d, row_ok, col_ok,
                TMA: tl.constexpr):
    """Write ``value``, cast to X's dtype, to the tile ``_load_tile`` reads."""
    if TMA:
        X.store([row0, col0], value.to(X.dtype))
    else:
        mask = _tile_mask(row_ok, col_ok)
        tl.store(X + rows[:, None] * stride_m + offs_d[None, :] * stride_d,
                 value.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _load_tiles(X, X2, row0, rows, row_ok, offs_d, d_mask, stride_m, stride_d,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                TMA: tl.constexpr):
    """The tile of ``rows`` (see ``_load_tile``) of the ``_rows`` sources (X, X2) as its
    two column pieces: columns ``offs_d`` = [0, BLOCK_D), masked by ``d_mask`` (those
    below HEAD_DIM), and with a split [BLOCK_D, BLOCK_D + BLOCK_D2), masked at HEAD_DIM
    where it passes it (the first piece then lies inside D: no column mask); rows off
    ``row_ok`` (None: none) load zeros. Without a split the second piece is the first
    again, a stand-in that no code reads."""
    if BLOCK_D2 > 0:
        tile = _load_tile(X, row0, 0, rows, offs_d, stride_m, stride_d, row_ok, None, TMA)
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        if BLOCK_D + BLOCK_D2 > HEAD_DIM:
            tile2 = _load_tile(X2, row0, BLOCK_D, rows, offs_d2, stride_m, stride_d,
                               row_ok, offs_d2 < HEAD_DIM, TMA)
        else:
            tile2 = _load_tile(X2, row0, BLOCK_D, rows, offs_d2, stride_m, stride_d,
                               row_ok, None, TMA)
    else:
        tile = _load_tile(X, row0, 0, rows, offs_d, stride_m, stride_d, row_ok, d_mask,
                          TMA)
        tile2 = tile
    return tile, tile2


@triton.jit
def _store_tiles(X, X2, value, value2, row0, rows, row_ok, offs_d, d_mask, stride_m,
                 stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_D2: tl.constexpr, TMA: tl.constexpr):
    """Write the two pieces (value, value2) to the tile ``_load_tiles`` reads (rows
    off ``row_ok`` and columns past HEAD_DIM are not written)."""
    if BLOCK_D2 > 0:
        _store_tile(X, value, row0, 0, rows, offs_d, stride_m, stride_d, row_ok, None,
                    TMA)
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        if BLOCK_D + BLOCK_D2 > HEAD_DIM:
            _store_tile(X2, value2, row0, BLOCK_D, rows, offs_d2, stride_m, stride_d,
                        row_ok, offs_d2 < HEAD_DIM, TMA)
        else:
            _store_tile(X2, value2, row0, BLOCK_D, rows, offs_d2, stride_m, stride_d,
                        row_ok, None, TMA)
    else:
        _store_tile(X, value, row0, 0, rows, offs_d, stride_m, stride_d, row_ok, d_mask,
                    TMA)


# Block ranges. A program of the forward or dQ visits the key blocks starting in
# [start, end), a dK/dV program the query blocks; those starting in [mid_lo, mid_hi) are
# seen in full by every row they meet and run without a mask, those in [start, mid_lo)
# and [mid_hi, end) apply it. Only a left bound makes key blocks before the unmasked ones
# (and query blocks after them), so without one that loop is left out at compile time,
# and the ranges are then computed exactly as before the windows came: ptxas is
# sensitive to them (rewritten as a general split they cost the causal forward 15-40
# more registers per thread on sm_90, and made dK/dV at D = 128 spill). Operands of //
# are >= 0, so it rounds down on GPU and in the interpreter alike.


@triton.jit
def _key_blocks(m0, Tq, Tk, left, right, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(start, mid_lo, mid_hi, end) of the key blocks for the query rows
    [m0, m0 + BLOCK_M), which see keys [i + off - left, i + off + right]."""
    first = m0 + (Tk - Tq)              # the first row's diagonal key
    last = first + BLOCK_M - 1          # the last row's (padding rows count: harmless)
    start = 0
    mid_lo = 0
    mid_hi = Tk // BLOCK_N * BLOCK_N    # the block holding the key tail is masked
    end = Tk
    if HAS_RIGHT:
        mid_hi = tl.minimum(tl.maximum(first + right + 1, 0), Tk) // BLOCK_N * BLOCK_N
        end = tl.minimum(last + right + 1, Tk)
    if HAS_LEFT:
        start = tl.maximum(first - left, 0) // BLOCK_N * BLOCK_N
        mid_lo = (tl.maximum(last - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        # No block seen in full: [start, end) is all masked, split at mid_lo.
        mid_lo = tl.maximum(tl.minimum(mid_lo, end), start)
        mid_hi = tl.maximum(mid_hi, mid_lo)
    return start, mid_lo, mid_hi, end


@triton.jit
def _query_blocks(n0, Tq, Tk, left, right, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(start, mid_lo, mid_hi, end) of the query blocks for the keys [n0, n0 + BLOCK_N),
    which rows [j - off - right, j - off + left] see. Rows past Tq are harmless without
    a mask (see _load_lse2): the unmasked blocks may run into them."""
    first = n0 - (Tk - Tq)              # the row whose diagonal is key n0
    last = first + BLOCK_N - 1          # the row of the block's last key (padding counts)
    start = 0
    mid_lo = 0
    mid_hi = Tq
    end = Tq
    if HAS_RIGHT:
        start = tl.maximum(first - right, 0) // BLOCK_M * BLOCK_M
        mid_lo = (tl.maximum(last - right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    # The block holding the key tail masks its padded keys against every query block.
    mid_lo = tl.minimum(tl.where(n0 + BLOCK_N > Tk, Tq, mid_lo), Tq)
    if HAS_LEFT:
        end = tl.minimum(last + left + 1, Tq)
        padded = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
        mid_hi = tl.minimum(tl.maximum(first + left + 1, 0), padded) // BLOCK_M * BLOCK_M
        # No block seen in full: [start, end) is all masked, split at mid_lo.
        mid_lo = tl.maximum(tl.minimum(mid_lo, end), start)
        mid_hi = tl.maximum(mid_hi, mid_lo)
    return start, mid_lo, mid_hi, end


@triton.jit
def _tanh(x):
    """tanh(x) = 2·sigmoid(2x) − 1, from exp2: no libdevice, so it also runs under the
    interpreter and on every Triton version. exp2 overflows to inf for x < −44, which
    gives −1 exactly."""
    return 2.0 / (1.0 + tl.exp2(-2.8853900817779268 * x)) - 1.0   # 2·log2(e)


@triton.jit
def _scores(qk, rows, cols, off, qk_scale, softcap2, slope2,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scores x in log2 units from the dot products ``qk`` (unmasked), and the soft
    cap's tanh, whose derivative the backward needs (without SOFTCAP ``qk``, unused).
    ``rows``, ``cols``: query and key indices inside the sequence, shaped to broadcast
    against ``qk`` ((M, 1) and (1, N), or transposed)."""
    if SOFTCAP:
        t = _tanh(qk * qk_scale)          # qk_scale = scale / softcap
        x = t * softcap2                  # softcap2 = softcap · log2(e)
    else:
        t = qk
        x = qk * qk_scale                 # qk_scale = scale · log2(e)
    if ALIBI:
        x -= slope2 * tl.abs(rows + off - cols).to(tl.float32)
    return x, t


@triton.jit
def _visible(rows, cols, off, left, right, Tk, HAS_LEFT: tl.constexpr,
             HAS_RIGHT: tl.constexpr):
    """Whether query ``rows`` see keys ``cols`` (broadcast as in ``_scores``): a key
    inside the sequence and the window [i + off − left, i + off + right]."""
    seen = cols < Tk
    if HAS_LEFT:
        seen = seen & (cols >= rows + off - left)
    if HAS_RIGHT:
        seen = seen & (cols <= rows + off + right)
    return seen


@triton.jit
def _dropout_keep(rows, cols, bh, seed, offset, dropout_p):
    """Dropout keep mask of query ``rows`` and keys ``cols`` (broadcast as in
    ``_scores``) for query head bh = b·H + h: the first word of Philox4x32-10 with key
    ``seed`` and counter (j, i, bh, offset), made a uniform float as ``tl.rand`` does,
    kept iff ≥ p. fastattn/ops/_philox.py rebuilds the same mask in torch."""
    zero = rows * 0 + cols * 0                               # int32, the tile's shape
    r, _, _, _ = tl.philox(seed, (cols + zero).to(tl.uint32), (rows + zero).to(tl.uint32),
                           (zero + bh).to(tl.uint32),
                           (zero.to(tl.int64) + offset).to(tl.uint32))
    return tl.uint_to_uniform_float(r) >= dropout_p


# --------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_step(acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, start_n,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   offs_m, offs_n, offs_d, d_mask, Tk, off,
                   qk_scale, softcap2, slope2, left, right,
                   bh, seed, offset, dropout_p,
                   MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                   IEEE: tl.constexpr, DOT_FP32: tl.constexpr, TMA: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Online-softmax update of (acc, l, m) with the key block starting at start_n; acc2
    is the output's second column piece (with a split, else a stand-in)."""
    rows = offs_m[:, None]
    cols = start_n + offs_n
    key_ok = None
    if MASKED:
        key_ok = cols < Tk
    k, k2 = _load_tiles(K, K2, start_n, cols, key_ok, offs_d, d_mask, stride_kn, stride_kd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_N, BLOCK_D)
    s, _ = _scores(_dot_t(q, q2, k, k2, IEEE, DOT_FP32, BLOCK_D2), rows, cols[None, :], off,
                   qk_scale, softcap2, slope2, SOFTCAP, ALIBI)       # (BLOCK_M, BLOCK_N)
    if MASKED:
        s = tl.where(_visible(rows, cols[None, :], off, left, right, Tk, HAS_LEFT,
                              HAS_RIGHT), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key keeps m = -inf; exponentiate against 0 instead,
    # so that exp2(-inf - -inf) = NaN never happens (its p and alpha are then 0).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)                                     # rescales the old sums
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)                                 # before dropout
    if DROPOUT:   # the 1 / (1 - p) is applied to O at the end
        p = tl.where(_dropout_keep(rows, cols[None, :], bh, seed, offset, dropout_p),
                     p, 0.0)
    v, v2 = _load_tiles(V, V2, start_n, cols, key_ok, offs_d, d_mask, stride_vn, stride_vd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_N, BLOCK_D)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, DOT_FP32)
    if BLOCK_D2 > 0:
        acc2 = acc2 * alpha[:, None] + _dot(p.to(v2.dtype), v2, IEEE, DOT_FP32)
    return acc, acc2, l_i, m_new


@triton.jit
def _attn_fwd_inner(acc, acc2, l_i, m_i, q, q2, K, K2, V, V2,  # K, V: see _rows
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, offs_n, offs_d, d_mask, lo, hi, Tk, off,
                    qk_scale, softcap2, slope2, left, right,
                    bh, seed, offset, dropout_p,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                    IEEE: tl.constexpr, DOT_FP32: tl.constexpr, TMA: tl.constexpr,
                    WARP_SPEC: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Online-softmax update of (acc, acc2, l, m) with the key blocks starting in
    [lo, hi). WARP_SPEC runs the loop warp-specialized (a producer warp issues the TMA
    copies, the others compute); the plain loop is kept apart, as Triton versions
    before 3.4 have no ``warp_specialize``."""
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, acc2, l_i, m_i = _attn_fwd_step(
                acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, start_n, stride_kn, stride_kd,
                stride_vn, stride_vd, offs_m, offs_n, offs_d, d_mask, Tk, off, qk_scale,
                softcap2, slope2, left, right, bh, seed, offset, dropout_p, MASKED,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
                HEAD_DIM, BLOCK_D, BLOCK_D2)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, acc2, l_i, m_i = _attn_fwd_step(
                acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, start_n, stride_kn, stride_kd,
                stride_vn, stride_vd, offs_m, offs_n, offs_d, d_mask, Tk, off, qk_scale,
                softcap2, slope2, left, right, bh, seed, offset, dropout_p, MASKED,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
                HEAD_DIM, BLOCK_D, BLOCK_D2)
    return acc, acc2, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,       # (B, H, Tq, D); varlen: (1, H, total_q, D), batch stride 0
    K,       # (B, Hkv, Tk, D); varlen: (1, Hkv, total_k, D)
    V,       # like K
    O,       # like Q, output
    LSE,     # (B, H, Tq); varlen: (1, H, total_q). Output, fp32, natural log
    CU_Q,    # (B + 1,) int32 query row offsets of the sequences (VARLEN), else None
    CU_K,    # (B + 1,) int32 key row offsets (VARLEN), else None
    SLOPES,  # (B, H) fp32 ALiBi slopes (ALIBI), else None
    DESCALE,  # (3, B, Hkv) fp32 factors of q, k, v (FP8), else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    stride_sp, stride_sb,   # DESCALE's strides: q/k/v plane, batch (KV heads: 1)
    H, GROUP,          # query heads; query heads per KV head
    Tq, Tk,            # lengths; with VARLEN the longest ones (they size the grid)
    qk_scale,          # scale · log2(e), or scale / softcap with SOFTCAP
    softcap2,          # softcap · log2(e)
    left, right,       # window: keys [i + off - left, i + off + right]
    dropout_p, seed, offset,
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    TMA: tl.constexpr, WARP_SPEC: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,   # head-dim pieces: head_dim_split
):
    # Query block i sees keys up to i + off + right: with a right bound (causal) the
    # last blocks see the most.
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M, HAS_RIGHT)
    b = pid_bh // H
    h = pid_bh % H
    q_start, Tq = _sequence(CU_Q, b, Tq, VARLEN)
    k_start, Tk = _sequence(CU_K, b, Tk, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= Tq:   # the sequence is shorter than the longest one
            return
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    hk = h // GROUP
    Q, Q2 = _rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, Tq, stride_qm,
                  HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
    K, K2 = _rows(K + b * stride_kb + hk * stride_kh + k_start * stride_kn, Tk, stride_kn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    V, V2 = _rows(V + b * stride_vb + hk * stride_vh + k_start * stride_vn, Tk, stride_vn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    O, O2 = _rows(O + b * stride_ob + h * stride_oh + q_start * stride_om, Tq, stride_om,
                  HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
    LSE += b * stride_lb + h * stride_lh + q_start * stride_lm
    slope2 = _slope(SLOPES, b, h, stride_ab, stride_ah, ALIBI)
    v_descale = 1.0
    if FP8:   # q, k, v hold real / factor: q's and k's factors join the scores' scale
        factors = DESCALE + b * stride_sb + hk
        qk_scale = qk_scale * tl.load(factors) * tl.load(factors + stride_sp)
        v_descale = tl.load(factors + 2 * stride_sp)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    q, q2 = _load_tiles(Q, Q2, m0, offs_m, row_ok, offs_d, d_mask, stride_qm, stride_qd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = acc                      # the second column piece's (a stand-in without one)
    if BLOCK_D2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    off = Tk - Tq
    bh = b * H + h
    start, mid_lo, mid_hi, end = _key_blocks(m0, Tq, Tk, left, right, HAS_LEFT,
                                             HAS_RIGHT, BLOCK_M, BLOCK_N)
    # Masked blocks before the fully visible middle (only a left bound makes them), the
    # middle, masked blocks after it (the diagonal, the key tail).
    if HAS_LEFT:
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, stride_kn, stride_kd, stride_vn,
            stride_vd, offs_m, offs_n, offs_d, d_mask, start, mid_lo, Tk, off, qk_scale,
            softcap2, slope2, left, right, bh, seed, offset, dropout_p,
            True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
            WARP_SPEC, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, stride_kn, stride_kd, stride_vn,
        stride_vd, offs_m, offs_n, offs_d, d_mask, mid_lo, mid_hi, Tk, off, qk_scale,
        softcap2, slope2, left, right, bh, seed, offset, dropout_p,
        False, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
        WARP_SPEC, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, K, K2, V, V2, stride_kn, stride_kd, stride_vn,
        stride_vd, offs_m, offs_n, offs_d, d_mask, mid_hi, end, Tk, off, qk_scale,
        softcap2, slope2, left, right, bh, seed, offset, dropout_p,
        True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
        WARP_SPEC, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)

    # l >= 1 for every row that saw a key (its max contributes exp2(0)); rows that saw
    # none get O = 0 and L = -inf.
    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    o = acc / l_i[:, None]
    if DROPOUT:
        o *= 1.0 / (1.0 - dropout_p)                                 # kept P are scaled up
    o2 = o
    if BLOCK_D2 > 0:
        o2 = acc2 / l_i[:, None]
        if DROPOUT:
            o2 *= 1.0 / (1.0 - dropout_p)
    if FP8:                                                          # v's factor
        o *= v_descale
        if BLOCK_D2 > 0:
            o2 *= v_descale
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453                  # log2 -> natural log
    lse = tl.where(seen, lse, float("-inf"))
    _store_tiles(O, O2, o, o2, m0, offs_m, row_ok, offs_d, d_mask, stride_om, stride_od,
                 HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)
    tl.store(LSE + offs_m * stride_lm, lse, mask=offs_m < Tq)


# -------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(
    O,      # (B, H, Tq, D)
    DO,     # (B, H, Tq, D)
    DELTA,  # (B, H, Tq) output, fp32
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_deb, stride_deh, stride_dem,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Δ_i = dO_i·O_i in fp32, the row term of the softmax VJP. Row by row, so a varlen
    batch runs as one sequence of all its rows."""
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M, False)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    DELTA += b * stride_deb + h * stride_deh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)                 # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)                # (BLOCK_M, BLOCK_D)
    tl.store(DELTA + offs_m * stride_dem, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _load_lse2(LSE, rows, stride_lm, row_ok, ALIBI: tl.constexpr):
    """L of ``rows`` in log2 units. Rows past Tq load q = dO = 0, so their scores are 0
    and P = exp2(0 - L) is harmless (it meets dO = 0) with L = 0; ALiBi gives them a
    bias, which may push P past fp32 (inf · 0 = NaN), so with ALiBi they load L = +inf
    and P = 0. (Not +inf always: on sm_90 it costs dK/dV at D = 256 a spill.)"""
    if ALIBI:
        lse = tl.load(LSE + rows * stride_lm, mask=row_ok, other=float("inf"))
    else:
        lse = tl.load(LSE + rows * stride_lm, mask=row_ok, other=0.0)
    return lse * 1.4426950408889634


@triton.jit
def _attn_bwd_dkdv_inner(dk, dk2, dv, dv2, k, k2, v, v2,
                         Q, Q2, DO, DO2, LSE, DELTA, DQ,  # this sequence's head's
                         stride_qm, stride_qd, stride_dom, stride_dod,
                         stride_lm, stride_dem, stride_dqm, stride_dqd,
                         offs_n, offs_m, offs_d, d_mask, lo, hi, Tq, Tk, off,
                         sm_scale, qk_scale, softcap2, slope2, left, right,
                         bh, seed, offset, dropout_p,
                         MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                         HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                         ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                         DOT_FP32: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Add to (dk, dv) the contributions of the query blocks starting in [lo, hi) (and
    to dk2, dv2, the second column pieces, with a split).

    Works on transposed scores (keys × queries) so that dV = (P∘z)ᵀ·dO and dK = dSᵀ·Q
    are plain dots. Query rows past Tq load q = dO = Δ = 0, which makes their dS and dO
    rows zero (see _load_lse2 for P); they add nothing. dv leaves without the dropout's
    1 / (1 - p), which the caller applies once. With ATOMIC_DQ the same dS also gives
    this key block's share of dQ = scale · dS·K, added to the fp32 DQ with atomics
    (the 5-matmul backward: no second pass recomputes P and dP for dQ)."""
    cols = offs_n[:, None]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        q_mask = _tile_mask(row_ok, d_mask)                          # (BLOCK_M, BLOCK_D)
        q, q2 = _load_tiles(Q, Q2, start_m, rows, row_ok, offs_d, d_mask, stride_qm,
                            stride_qd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)  # (BLOCK_M, BLOCK_D)
        do, do2 = _load_tiles(DO, DO2, start_m, rows, row_ok, offs_d, d_mask, stride_dom,
                              stride_dod, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)
        lse2 = _load_lse2(LSE, rows, stride_lm, row_ok, ALIBI)
        delta = tl.load(DELTA + rows * stride_dem, mask=row_ok, other=0.0)
        s_t, t_t = _scores(_dot_t(k, k2, q, q2, IEEE, DOT_FP32, BLOCK_D2), rows[None, :],
                           cols, off, qk_scale, softcap2, slope2, SOFTCAP,
                           ALIBI)                                    # (BLOCK_N, BLOCK_M)
        log2_p_t = s_t - lse2[None, :]
        if MASKED:
            # Mask the exponent, not x: hidden entries of rows with L = -inf (they see
            # no key) would give -inf - -inf = NaN, and padded keys exp2(0 - L) may
            # overflow.
            log2_p_t = tl.where(_visible(rows[None, :], cols, off, left, right, Tk,
                                         HAS_LEFT, HAS_RIGHT), log2_p_t, float("-inf"))
        p_t = tl.exp2(log2_p_t)
        pz_t = p_t                                                   # P∘z, z without 1/(1-p)
        if DROPOUT:
            keep_t = _dropout_keep(rows[None, :], cols, bh, seed, offset, dropout_p)
            pz_t = tl.where(keep_t, p_t, 0.0)
        dv += _dot(pz_t.to(do.dtype), do, IEEE, DOT_FP32)
        if BLOCK_D2 > 0:
            dv2 += _dot(pz_t.to(do2.dtype), do2, IEEE, DOT_FP32)
        dp_t = _dot_t(v, v2, do, do2, IEEE, DOT_FP32, BLOCK_D2)     # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += _dot(ds_t.to(q.dtype), q, IEEE, DOT_FP32)
        if BLOCK_D2 > 0:
            dk2 += _dot(ds_t.to(q2.dtype), q2, IEEE, DOT_FP32)
        if ATOMIC_DQ:
            ds = tl.trans(ds_t).to(k.dtype)                          # (BLOCK_M, BLOCK_N)
            dq = _dot(ds, k, IEEE, DOT_FP32)                         # (BLOCK_M, BLOCK_D)
            if BLOCK_D2 > 0:   # the first piece lies inside D
                q_mask = row_ok[:, None]
            tl.atomic_add(DQ + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                          dq * sm_scale, mask=q_mask, sem="relaxed")
            if BLOCK_D2 > 0:
                offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
                dq2 = _dot(ds, k2, IEEE, DOT_FP32)                   # (BLOCK_M, BLOCK_D2)
                tl.atomic_add(DQ + rows[:, None] * stride_dqm + offs_d2[None, :] * stride_dqd,
                              dq2 * sm_scale, mask=_tile_mask(row_ok, offs_d2 < HEAD_DIM),
                              sem="relaxed")
    return dk, dk2, dv, dv2


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,       # (B, H, Tq, D); varlen: (1, H, total_q, D), batch stride 0
    K,       # (B, Hkv, Tk, D); varlen: (1, Hkv, total_k, D)
    V,       # like K
    DO,      # like Q
    LSE,     # (B, H, Tq) fp32; varlen (1, H, total_q)
    DELTA,   # like LSE
    DK,      # like K, output
    DV,      # like K, output
    DQ,      # like Q, fp32, zeroed: dQ accumulated with atomics (ATOMIC_DQ), else None
    CU_Q,    # (B + 1,) int32 (VARLEN), else None
    CU_K,    # (B + 1,) int32 (VARLEN), else None
    SLOPES,  # (B, H) fp32 (ALIBI), else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_ab, stride_ah,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hkv, GROUP,        # KV heads; query heads per KV head
    Tq, Tk,            # lengths; with VARLEN the longest ones (they size the grid)
    sm_scale, qk_scale, softcap2, left, right, dropout_p, seed, offset,
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,   # head-dim pieces: head_dim_split
):
    # Key j is seen by rows from j - off - right on: with a right bound (causal) the
    # first key blocks have the most rows; with only a left bound, the last.
    pid_n, pid_bh = _program_ids(Tk, BLOCK_N, HAS_LEFT and not HAS_RIGHT)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    q_start, Tq = _sequence(CU_Q, b, Tq, VARLEN)
    k_start, Tk = _sequence(CU_K, b, Tk, VARLEN)
    n0 = pid_n * BLOCK_N
    if VARLEN:
        if n0 >= Tk:   # the sequence is shorter than the longest one
            return
    b = b.to(tl.int64)
    hk = hk.to(tl.int64)
    K, K2 = _rows(K + b * stride_kb + hk * stride_kh + k_start * stride_kn, Tk, stride_kn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    V, V2 = _rows(V + b * stride_vb + hk * stride_vh + k_start * stride_vn, Tk, stride_vn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    DK, DK2 = _rows(DK + b * stride_dkb + hk * stride_dkh + k_start * stride_dkn, Tk,
                    stride_dkn, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    DV, DV2 = _rows(DV + b * stride_dvb + hk * stride_dvh + k_start * stride_dvn, Tk,
                    stride_dvn, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # Key rows past Tk load zeros and are never stored; what they compute stays in
    # their own rows of dk and dv.
    key_ok = offs_n < Tk
    k, k2 = _load_tiles(K, K2, n0, offs_n, key_ok, offs_d, d_mask, stride_kn, stride_kd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_N, BLOCK_D)
    v, v2 = _load_tiles(V, V2, n0, offs_n, key_ok, offs_d, d_mask, stride_vn, stride_vd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk2, dv2 = dk, dv               # the second column piece's (stand-ins without one)
    if BLOCK_D2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)

    off = Tk - Tq
    start, mid_lo, mid_hi, end = _query_blocks(n0, Tq, Tk, left, right, HAS_LEFT,
                                               HAS_RIGHT, BLOCK_M, BLOCK_N)
    # The sum over the group's query heads happens here, in a fixed order: no atomics
    # (but for dQ with ATOMIC_DQ).
    for g in range(GROUP):
        h = hk * GROUP + g                                           # int64
        Qh, Qh2 = _rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, Tq,
                        stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
        DOh, DOh2 = _rows(DO + b * stride_dob + h * stride_doh + q_start * stride_dom, Tq,
                          stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
        LSEh = LSE + b * stride_lb + h * stride_lh + q_start * stride_lm
        DELTAh = DELTA + b * stride_deb + h * stride_deh + q_start * stride_dem
        DQh = DQ
        if ATOMIC_DQ:
            DQh += b * stride_dqb + h * stride_dqh + q_start * stride_dqm
        slope2 = _slope(SLOPES, b, h, stride_ab, stride_ah, ALIBI)
        bh = b * (Hkv * GROUP) + h
        # Masked query blocks (the window's right edge, the diagonal, the key tail), the
        # unmasked middle, masked blocks past the left edge.
        dk, dk2, dv, dv2 = _attn_bwd_dkdv_inner(
            dk, dk2, dv, dv2, k, k2, v, v2, Qh, Qh2, DOh, DOh2, LSEh, DELTAh, DQh,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dem,
            stride_dqm, stride_dqd, offs_n, offs_m, offs_d, d_mask, start, mid_lo,
            Tq, Tk, off, sm_scale, qk_scale, softcap2, slope2, left, right,
            bh, seed, offset, dropout_p, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
            DROPOUT, IEEE, DOT_FP32, ATOMIC_DQ, TMA, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2)
        dk, dk2, dv, dv2 = _attn_bwd_dkdv_inner(
            dk, dk2, dv, dv2, k, k2, v, v2, Qh, Qh2, DOh, DOh2, LSEh, DELTAh, DQh,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dem,
            stride_dqm, stride_dqd, offs_n, offs_m, offs_d, d_mask, mid_lo, mid_hi,
            Tq, Tk, off, sm_scale, qk_scale, softcap2, slope2, left, right,
            bh, seed, offset, dropout_p, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
            DROPOUT, IEEE, DOT_FP32, ATOMIC_DQ, TMA, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2)
        if HAS_LEFT:   # rows past the key block's window: only a left bound makes them
            dk, dk2, dv, dv2 = _attn_bwd_dkdv_inner(
                dk, dk2, dv, dv2, k, k2, v, v2, Qh, Qh2, DOh, DOh2, LSEh, DELTAh, DQh,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dem,
                stride_dqm, stride_dqd, offs_n, offs_m, offs_d, d_mask, mid_hi, end,
                Tq, Tk, off, sm_scale, qk_scale, softcap2, slope2, left, right,
                bh, seed, offset, dropout_p, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                DROPOUT, IEEE, DOT_FP32, ATOMIC_DQ, TMA, HEAD_DIM, BLOCK_M, BLOCK_D,
                BLOCK_D2)

    dk *= sm_scale
    if DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    if BLOCK_D2 > 0:
        dk2 *= sm_scale
        if DROPOUT:
            dv2 *= 1.0 / (1.0 - dropout_p)
    _store_tiles(DK, DK2, dk, dk2, n0, offs_n, key_ok, offs_d, d_mask, stride_dkn,
                 stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)
    _store_tiles(DV, DV2, dv, dv2, n0, offs_n, key_ok, offs_d, d_mask, stride_dvn,
                 stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)


@triton.jit
def _attn_bwd_dq_inner(dq, dq2, q, q2, do, do2, lse2, delta,
                       K, K2, V, V2,  # this sequence's rows (see _rows)
                       stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_n, offs_d, d_mask, lo, hi, Tk, off,
                       qk_scale, softcap2, slope2, left, right,
                       bh, seed, offset, dropout_p,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                       IEEE: tl.constexpr, DOT_FP32: tl.constexpr, TMA: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Add to dq (and dq2, its second column piece, with a split) the contributions of
    the key blocks starting in [lo, hi)."""
    rows = offs_m[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = None
        if MASKED:
            key_ok = cols < Tk
        k, k2 = _load_tiles(K, K2, start_n, cols, key_ok, offs_d, d_mask, stride_kn,
                            stride_kd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)  # (BLOCK_N, BLOCK_D)
        v, v2 = _load_tiles(V, V2, start_n, cols, key_ok, offs_d, d_mask, stride_vn,
                            stride_vd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)  # (BLOCK_N, BLOCK_D)
        s, t = _scores(_dot_t(q, q2, k, k2, IEEE, DOT_FP32, BLOCK_D2), rows, cols[None, :],
                       off, qk_scale, softcap2, slope2, SOFTCAP, ALIBI)  # (BLOCK_M, BLOCK_N)
        log2_p = s - lse2[:, None]
        if MASKED:
            # Mask the exponent, not x (see _attn_bwd_dkdv_inner).
            log2_p = tl.where(_visible(rows, cols[None, :], off, left, right, Tk,
                                       HAS_LEFT, HAS_RIGHT), log2_p, float("-inf"))
        p = tl.exp2(log2_p)
        dp = _dot_t(do, do2, v, v2, IEEE, DOT_FP32, BLOCK_D2)        # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            dp = tl.where(_dropout_keep(rows, cols[None, :], bh, seed, offset, dropout_p),
                          dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, IEEE, DOT_FP32)
        if BLOCK_D2 > 0:
            dq2 += _dot(ds.to(k2.dtype), k2, IEEE, DOT_FP32)
    return dq, dq2


@triton.jit
def _attn_bwd_dq_kernel(
    Q,       # (B, H, Tq, D); varlen: (1, H, total_q, D), batch stride 0
    K,       # (B, Hkv, Tk, D); varlen: (1, Hkv, total_k, D)
    V,       # like K
    DO,      # like Q
    LSE,     # (B, H, Tq) fp32; varlen (1, H, total_q)
    DELTA,   # like LSE
    DQ,      # like Q, output
    CU_Q,    # (B + 1,) int32 (VARLEN), else None
    CU_K,    # (B + 1,) int32 (VARLEN), else None
    SLOPES,  # (B, H) fp32 (ALIBI), else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_ab, stride_ah,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP,          # query heads; query heads per KV head
    Tq, Tk,            # lengths; with VARLEN the longest ones (they size the grid)
    sm_scale, qk_scale, softcap2, left, right, dropout_p, seed, offset,
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,   # head-dim pieces: head_dim_split
):
    # Query block i sees keys up to i + off + right: with a right bound (causal) the
    # last blocks see the most.
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M, HAS_RIGHT)
    b = pid_bh // H
    h = pid_bh % H
    q_start, Tq = _sequence(CU_Q, b, Tq, VARLEN)
    k_start, Tk = _sequence(CU_K, b, Tk, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= Tq:   # the sequence is shorter than the longest one
            return
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    hk = h // GROUP
    Q, Q2 = _rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, Tq, stride_qm,
                  HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
    K, K2 = _rows(K + b * stride_kb + hk * stride_kh + k_start * stride_kn, Tk, stride_kn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    V, V2 = _rows(V + b * stride_vb + hk * stride_vh + k_start * stride_vn, Tk, stride_vn,
                  HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, TMA)
    DO, DO2 = _rows(DO + b * stride_dob + h * stride_doh + q_start * stride_dom, Tq,
                    stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
    LSE += b * stride_lb + h * stride_lh + q_start * stride_lm
    DELTA += b * stride_deb + h * stride_deh + q_start * stride_dem
    DQ, DQ2 = _rows(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqm, Tq,
                    stride_dqm, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, TMA)
    slope2 = _slope(SLOPES, b, h, stride_ab, stride_ah, ALIBI)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    q, q2 = _load_tiles(Q, Q2, m0, offs_m, row_ok, offs_d, d_mask, stride_qm, stride_qd,
                        HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)            # (BLOCK_M, BLOCK_D)
    do, do2 = _load_tiles(DO, DO2, m0, offs_m, row_ok, offs_d, d_mask, stride_dom,
                          stride_dod, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)
    # Rows past Tq get dO = 0 and Δ = 0 (and L as _load_lse2 says), so their dS is 0.
    lse2 = _load_lse2(LSE, offs_m, stride_lm, row_ok, ALIBI)
    delta = tl.load(DELTA + offs_m * stride_dem, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq2 = dq                        # the second column piece's (a stand-in without one)
    if BLOCK_D2 > 0:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)

    off = Tk - Tq
    bh = b * H + h
    start, mid_lo, mid_hi, end = _key_blocks(m0, Tq, Tk, left, right, HAS_LEFT,
                                             HAS_RIGHT, BLOCK_M, BLOCK_N)
    # Masked, unmasked and masked key blocks, as in the forward.
    if HAS_LEFT:
        dq, dq2 = _attn_bwd_dq_inner(
            dq, dq2, q, q2, do, do2, lse2, delta, K, K2, V, V2, stride_kn, stride_kd,
            stride_vn, stride_vd, offs_m, offs_n, offs_d, d_mask, start, mid_lo, Tk, off,
            qk_scale, softcap2, slope2, left, right, bh, seed, offset, dropout_p,
            True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
            HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)
    dq, dq2 = _attn_bwd_dq_inner(
        dq, dq2, q, q2, do, do2, lse2, delta, K, K2, V, V2, stride_kn, stride_kd,
        stride_vn, stride_vd, offs_m, offs_n, offs_d, d_mask, mid_lo, mid_hi, Tk, off,
        qk_scale, softcap2, slope2, left, right, bh, seed, offset, dropout_p,
        False, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
        HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)
    dq, dq2 = _attn_bwd_dq_inner(
        dq, dq2, q, q2, do, do2, lse2, delta, K, K2, V, V2, stride_kn, stride_kd,
        stride_vn, stride_vd, offs_m, offs_n, offs_d, d_mask, mid_hi, end, Tk, off,
        qk_scale, softcap2, slope2, left, right, bh, seed, offset, dropout_p,
        True, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT, IEEE, DOT_FP32, TMA,
        HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2)
    dq *= sm_scale
    if BLOCK_D2 > 0:
        dq2 *= sm_scale
    _store_tiles(DQ, DQ2, dq, dq2, m0, offs_m, row_ok, offs_d, d_mask, stride_dqm,
                 stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_D2, TMA)


# ------------------------------------------------------------------------- autotune

# Lengths enter the key as powers of two, so a decoding loop whose Tk grows by one
# does not retune at every step. The variant flags enter because they change the work
# per row (a window) or the registers a tile needs (soft cap, ALiBi, dropout); the
# window's width and VARLEN do not (the key stays a handful of bools and ints).
_AUTOTUNE_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP",
                 "ALIBI", "DROPOUT", "TMA"]


def _configs(tiles):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# First tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, keyed by
# (operand bits, head-dim band); the band is the head dim rounded up to a power of two
# (64 also serves D < 64), also for a head dim split in two pieces (``head_dim_split``:
# 80 and 96 take the 128 band, 160 and 192 the 256 one: with these tiles their pieces
# use fewer registers on sm_90 than the padded tile did, while the first piece's band,
# 64 or 128, spills; on sm_80 a few plain first tiles spill 8-48 B per thread with a
# split, dK/dV at 80, 96, 192, dQ at 96, the forward at 192, so there only the forward
# below 128 splits: ``arch_paths``). The first tile is the one FASTATTN_AUTOTUNE=0
# launches and the autotuner never prunes: it fits the shared memory of sm_80 (166,912 B per block),
# sm_90 (232,448 B) and sm_86/89 (101,376 B), and in 16 bits it does not spill
# registers on sm_90. `fastattn check-kernels` compiles every tile (tests/
# test_check_kernels.py holds the first ones to this).
# - 16 bits: a warpgroup (4 warps) holding a 128 x 128 fp32 accumulator spills, so the
#   forward's 128-row tiles at D = 128 take 8 warps. sm_90 runs a dot as wgmma when each
#   warpgroup owns >= 64 of its rows: BLOCK_M in the forward and dQ, BLOCK_N in dK/dV.
#   dK/dV at D = 256 holds two (BLOCK_N, 256) fp32 accumulators plus the K and V tiles:
#   with BLOCK_N = 64 (wgmma) only 16-row query blocks, 8 warps and 2 stages fit without
#   spilling on sm_90 (TMA: 243 registers; 32 rows spill 56 B, one stage 176 B, 16
#   warps cap a thread at 128 registers), and the old 32 x 32 mma.sync tile spills
#   1344 B once its loads go through TMA.
# - fp32: twice the bytes per tile and true-fp32 (ieee) dots, which run on FMA units,
#   not tensor cores, and hold their operands in registers: 16- and 32-row tiles,
#   2 stages.
_FWD_FIRST = {
    (16, 64): (128, 64, 8, 3), (16, 128): (128, 64, 8, 3), (16, 256): (64, 32, 8, 2),
    (32, 64): (32, 32, 4, 2), (32, 128): (32, 16, 4, 2), (32, 256): (16, 32, 4, 2),
}
_DKDV_FIRST = {
    (16, 64): (32, 128, 8, 2), (16, 128): (64, 64, 8, 2), (16, 256): (16, 64, 8, 2),
    (32, 64): (16, 32, 4, 2), (32, 128): (16, 16, 4, 2), (32, 256): (16, 32, 8, 2),
}
_DQ_FIRST = {
    (16, 64): (64, 64, 4, 2), (16, 128): (64, 64, 4, 2), (16, 256): (64, 16, 8, 2),
    (32, 64): (32, 32, 4, 2), (32, 128): (32, 16, 4, 2), (32, 256): (16, 32, 4, 2),
}


def _space(blocks_m, blocks_n, warps, stages) -> list[tuple[int, int, int, int]]:
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) of the given values."""
    return [(m, n, w, s) for m in blocks_m for n in blocks_n for w in warps for s in stages]


# The autotuner's search after the first tile, the same for every head-dim band (what
# cannot fit a device's shared memory or is larger than the problem is pruned before
# benchmarking: ``_prune``). 16 bits: the Triton tutorial's space. The forward and dQ
# own BLOCK_M query rows and stream BLOCK_N keys; dK/dV owns BLOCK_N keys (>= 64 for
# wgmma) and streams BLOCK_M queries, carrying two (BLOCK_N, D) fp32 accumulators where
# the others carry one, so its streamed block is a power of two smaller (16 rows are
# also what its variant and D = 256 first tiles need). fp32: 16- and 32-row tiles (its
# dots hold their operands in registers). The lists' earlier hand-picked tiles outside
# these spaces all spilled (48-1344 B per thread, sm_80 or sm_90).
_SPACE_16 = {"fwd": _space((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
             "dkdv": _space((16, 32, 64), (64, 128), (4, 8), (2, 3, 4)),
             "dq": _space((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))}
_SPACE_32 = _space((16, 32), (16, 32), (4, 8), (2, 3))


def _search(firsts: dict, kernel: str) -> dict:
    """Tile lists per (operand bits, head-dim band): the first tile, then the kernel's
    search space without it."""
    return {key: [first, *(t for t in (_SPACE_16[kernel] if key[0] == 16 else _SPACE_32)
                           if t != first)]
            for key, first in firsts.items()}


_FWD_TILES = _search(_FWD_FIRST, "fwd")
_DKDV_TILES = _search(_DKDV_FIRST, "dkdv")
_DQ_TILES = _search(_DQ_FIRST, "dq")

# First tiles with a soft cap, ALiBi or dropout ("scored" in ``_tile_key``). Each score then
# also carries the tanh (kept for the backward's derivative), the bias or the Philox
# words, and the plain first tiles spill: bf16, D = 128, every variant on, 360 B per
# thread in dK/dV and 152 B in dQ on sm_90, 16 to 544 B per kernel on sm_80. These
# compile spill-free on sm_80 and sm_90 with every variant on (varlen, a causal
# window, soft cap, ALiBi, dropout); the autotuner tries each before its plain list.
# In 16 bits they keep >= 64-row wgmma tiles (dQ at D = 256: 64 x 16, 203 registers
# through TMA), except dK/dV at D = 256, which spills through TMA in every tile tried
# and so runs this 32 x 32 tile on the pointer path (mma.sync, no spill). In fp32 the
# plain first tiles spill up to 9.5 kB on sm_90 at D = 256 (ptxas gives up at 32
# registers); these (16 or 32 rows, 8 warps where 4 spill) do not.
_FWD_VARIANT_FIRST = {
    (16, 64): (128, 64, 8, 3), (16, 128): (64, 64, 8, 3), (16, 256): (64, 16, 8, 2),
    (32, 64): (32, 32, 8, 2), (32, 128): (16, 16, 8, 2), (32, 256): (16, 16, 4, 2),
}
_DKDV_VARIANT_FIRST = {
    (16, 64): (16, 128, 8, 2), (16, 128): (16, 64, 8, 2), (16, 256): (32, 32, 8, 2),
    (32, 64): (16, 32, 8, 2), (32, 128): (16, 16, 4, 2), (32, 256): (16, 32, 8, 2),
}
_DQ_VARIANT_FIRST = {
    (16, 64): (64, 32, 8, 2), (16, 128): (64, 32, 4, 2), (16, 256): (64, 16, 8, 2),
    (32, 64): (32, 32, 4, 2), (32, 128): (16, 16, 4, 2), (32, 256): (16, 16, 4, 2),
}
# First dK/dV tiles of the atomic-dQ backward (deterministic=False), with or without the
# variants: its extra dot (dS·K, BLOCK_M × D in fp32) and atomic adds spill the plain
# first tiles (bf16, D = 128: 88 B on sm_90; D = 256: 16 B on sm_80). 16-row query
# blocks compile spill-free on sm_80 and sm_90, every variant on or none, in 16 bits
# and fp32 (8 warps from D = 128 on); that dot then runs mma.sync beside the wgmma of
# the other three on sm_90.
_DKDV_ATOMIC_FIRST = {
    (16, 64): (16, 128, 8, 2), (16, 128): (16, 64, 8, 2), (16, 256): (16, 32, 8, 2),
    (32, 64): (16, 16, 4, 2), (32, 128): (16, 16, 8, 2), (32, 256): (16, 16, 8, 2),
}


def _with_firsts(tiles: dict, firsts: dict) -> dict:
    """Tile lists keyed by (operand bits, head-dim band, kind): "plain" the plain lists,
    every kind in ``firsts`` (kind -> first tile per band) its own list, led by that
    first tile and followed by the plain ones."""
    lists = {(*key, "plain"): t for key, t in tiles.items()}
    for kind, first_tiles in firsts.items():
        for key, t in tiles.items():
            first = first_tiles[key]
            lists[(*key, kind)] = [first, *(x for x in t if x != first)]
    return lists


FWD_TILES = _with_firsts(_FWD_TILES, {"scored": _FWD_VARIANT_FIRST})
DKDV_TILES = _with_firsts(_DKDV_TILES, {"scored": _DKDV_VARIANT_FIRST,
                                        "atomic": _DKDV_ATOMIC_FIRST})
DQ_TILES = _with_firsts(_DQ_TILES, {"scored": _DQ_VARIANT_FIRST})

# One small fixed tile under the interpreter, so the tests run on CPU in seconds.
_INTERPRET_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
_DELTA_BLOCK_M = 16 if INTERPRET else 64


# FASTATTN_AUTOTUNE=0: the first config of each list only, nothing benchmarked (a test
# suite that compiles many shapes once each; the numbers come from tuned runs).
_AUTOTUNE = os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def _tile_key(dtype: torch.dtype, head_dim: int, flags: dict) -> tuple[int, int, str]:
    """Key of the tile lists: (operand bits, the padded head dim max(64, next power of
    two) whether or not it splits (see ``_FWD_FIRST``), kind), the kind
    "atomic" for the atomic-dQ dK/dV pass, "scored" with a soft cap, ALiBi or dropout,
    else "plain"."""
    kind = "plain"
    if flags["SOFTCAP"] or flags["ALIBI"] or flags["DROPOUT"]:
        kind = "scored"
    if flags.get("ATOMIC_DQ", False):
        kind = "atomic"
    bits = 32 if dtype.itemsize == 4 else 16          # fp8 takes the 16-bit tiles
    return bits, max(64, next_pow2(head_dim)), kind


# Shared memory besides the tiles: cross-warp reductions, mbarriers, alignment (the
# remainder was at most 2,048 B over the compiled kernels, sm_80 and sm_90).
_SMEM_SLACK = 2048


def _smem_estimate(kernel: str, block_m: int, block_n: int, block_d: int,
                   num_stages: int, elem: int, wgmma: bool, scored: bool = False,
                   atomic: bool = False) -> int:
    """Shared memory, in bytes, that a config of ``kernel`` ("fwd", "dkdv" or "dq")
    needs; ``elem`` bytes per q/k/v element, M, N, D the tiles (D = BLOCK_D + BLOCK_D2):

        buffers · stage + resident + layout + 2048  (+ M·D·4 for the atomic dQ)

    - stage, what the loop streams per iteration: the K and V blocks, 2·N·D·elem (fwd,
      dq), or the Q and dO blocks and the rows of L and Δ, 2·M·D·elem + 2·M·4 (dkdv);
    - buffers, the copies in flight: num_stages where the loop feeds wgmma (``wgmma``:
      16 bits on sm_90+), else max(num_stages − 1, 1) (mma.sync, fp32's FMA dots);
    - resident, the tiles loaded once that feed dots from shared memory: Q, M·D·elem
      (fwd), Q and dO, 2·M·D·elem (dq), K and V, 2·N·D·elem (dkdv);
    - layout, an (M, N) tile changing layout through shared memory: P or dS, M·N·elem,
      without wgmma; with it none, but M·N bytes with a soft cap, ALiBi or dropout
      (``scored``);
    - 2048: ``_SMEM_SLACK``;
    - M·D·4 (dkdv with ``atomic``, the ATOMIC_DQ pass): its fp32 dQ tile changing
      layout for the atomic adds.

    Against the compiled kernels (Triton 3.9, sm_80 and sm_90) it is exact or above
    for every config, up to the whole layout (and M·D·4) term when no layout change
    goes through shared memory. Too low would cost a compile that fails (the autotuner
    skips it); too high, a config not tried."""
    buffers = num_stages if wgmma else max(num_stages - 1, 1)
    if kernel == "dkdv":
        stage = 2 * block_m * block_d * elem + 2 * block_m * 4
        resident = 2 * block_n * block_d * elem
    else:
        stage = 2 * block_n * block_d * elem
        resident = (1 if kernel == "fwd" else 2) * block_m * block_d * elem
    if wgmma:
        layout = block_m * block_n if scored else 0
    else:
        layout = block_m * block_n * elem
    dq_tile = block_m * block_d * 4 if atomic else 0
    return buffers * stage + resident + layout + dq_tile + _SMEM_SLACK


def _prune(configs: list, args: dict, kernel: str, smem_limit: int, hopper: bool) -> list:
    """The configs worth benchmarking for one launch (``args``: the kernel's arguments
    by name): the first always (the FASTATTN_AUTOTUNE=0 one, checked by `fastattn
    check-kernels`), every other whose ``_smem_estimate`` fits ``smem_limit`` and
    whose tiles are no larger than the problem, i.e. BLOCK_M at most TQ_KEY (the
    query length's power of two) and BLOCK_N at most TK_KEY, or the smallest BLOCK_M
    (BLOCK_N) offered when that is larger. Depends only on the configs and the key's
    arguments, in order, so every launch with one autotune key gets the same list.
    ``hopper``: the device is sm_90+ (16-bit loops then feed wgmma)."""
    elem = args["Q"].element_size()
    wgmma = hopper and elem == 2
    scored = bool(args["SOFTCAP"] or args["ALIBI"] or args["DROPOUT"])
    atomic = args.get("ATOMIC_DQ", False)
    block_d = args["BLOCK_D"] + args.get("BLOCK_D2", 0)     # both head-dim pieces
    min_m = min(c.kwargs["BLOCK_M"] for c in configs)
    min_n = min(c.kwargs["BLOCK_N"] for c in configs)
    max_m, max_n = max(args["TQ_KEY"], min_m), max(args["TK_KEY"], min_n)

    def keep(c) -> bool:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        need = _smem_estimate(kernel, m, n, block_d, c.num_stages, elem, wgmma, scored,
                              atomic)
        return m <= max_m and n <= max_n and need <= smem_limit

    return [configs[0], *(c for c in configs[1:] if keep(c))]


_DEVICE_SMEM: dict[int, tuple[int, bool]] = {}


def _device_smem(device: torch.device) -> tuple[int, bool]:
    """(shared memory one block may opt in to, in bytes; whether it is sm_90+) of a
    CUDA device, cached per device."""
    index = torch.cuda.current_device() if device.index is None else device.index
    found = _DEVICE_SMEM.get(index)
    if found is None:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        major, _ = torch.cuda.get_device_capability(index)
        found = _DEVICE_SMEM[index] = (props["max_shared_mem"], major >= 9)
    return found


def _pruner(kernel: str):
    """``early_config_prune`` of ``kernel``'s autotuner: ``_prune`` with the limit of
    the device that q is on (the autotuner calls it on GPUs only)."""
    def prune(configs, named_args, **kwargs):
        smem_limit, hopper = _device_smem(named_args["Q"].device)
        return _prune(configs, {**named_args, **kwargs}, kernel, smem_limit, hopper)
    return prune


def _autotuned(kernel, tiles: dict, name: str, key: list = _AUTOTUNE_KEY,
               reset_to_zero=None):
    """Kernel to launch for (dtype, head dim, the variant's flags): autotuned over its
    list in ``tiles``, pruned per launch by ``_pruner(name)`` (only the first tile under
    FASTATTN_AUTOTUNE=0); under the interpreter the plain kernel, which the launchers
    give ``_INTERPRET_TILES``. ``reset_to_zero``: outputs accumulated with atomics,
    zeroed before each benchmark run and after the last."""
    if INTERPRET:
        return lambda dtype, head_dim, flags: kernel
    tuned = {k: triton.autotune(configs=_configs(t if _AUTOTUNE else t[:1]), key=key,
                                prune_configs_by={"early_config_prune": _pruner(name)},
                                reset_to_zero=reset_to_zero)(kernel)
             for k, t in tiles.items()}
    return lambda dtype, head_dim, flags: tuned[_tile_key(dtype, head_dim, flags)]


_attn_fwd = _autotuned(_attn_fwd_kernel, FWD_TILES, "fwd")
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, DKDV_TILES, "dkdv",
                            [*_AUTOTUNE_KEY, "ATOMIC_DQ"], reset_to_zero=["DQ"])
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, DQ_TILES, "dq")
_TILES = _INTERPRET_TILES if INTERPRET else {}


# ------------------------------------------------------------------------ launchers


class _Shape(NamedTuple):
    """Sizes of one call. Dense: B, Tq, Tk from the (B, H, T, D) tensors. Varlen: B
    sequences, Tq and Tk the longest lengths (max_seqlen_q/k), which size the grid."""
    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    varlen: bool


class _Variant(NamedTuple):
    """What the kernels need of the call's options, computed once per launcher call."""
    cu_q: torch.Tensor | None   # (B + 1,) int32, varlen only
    cu_k: torch.Tensor | None
    slopes: torch.Tensor | None  # (B, H) fp32 ALiBi slopes
    slope_strides: tuple
    scalars: tuple              # qk_scale, softcap2, left, right, dropout_p, seed, offset
    flags: dict                 # the constexprs


def _shape(q: torch.Tensor, k: torch.Tensor, cu_q, cu_k, max_q: int, max_k: int) -> _Shape:
    if cu_q is None and cu_k is None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q, k must be (B, H, T, D) without cu_seqlens, got shapes "
                             f"{tuple(q.shape)}, {tuple(k.shape)}")
        B, H, Tq, D = q.shape
        return _Shape(B, H, k.shape[1], Tq, k.shape[2], D, False)
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor (given with the other "
                             f"cu_seqlens), got {cu if cu is None else (cu.dtype, cu.dim())}")
    if cu_q.numel() != cu_k.numel() or cu_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have B + 1 >= 1 entries "
                         f"alike, got {cu_q.numel()} and {cu_k.numel()}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"varlen q, k must be (total, H, D), got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    for name, m, x in (("max_seqlen_q", max_q, q), ("max_seqlen_k", max_k, k)):
        if not isinstance(m, int) or m < 0 or (m == 0 and x.shape[0] > 0):
            raise ValueError(f"{name} must be an int >= the longest sequence (>= 1 when "
                             f"there are rows), got {m!r}")
    return _Shape(cu_q.numel() - 1, q.shape[1], k.shape[1], max_q, max_k, q.shape[2], True)


def _strides(x: torch.Tensor, varlen: bool) -> tuple:
    """(batch, head, row, dim) strides of a (B, H, T, D) tensor, or of a varlen
    (total, H, D) one with batch stride 0 (the kernels add the sequence's start)."""
    return (0, x.stride(1), x.stride(0), x.stride(2)) if varlen else x.stride()


def _row_strides(x: torch.Tensor, varlen: bool) -> tuple:
    """(batch, head, row) strides of lse or Δ: (B, H, Tq), or varlen (H, total_q)."""
    return (0, *x.stride()) if varlen else x.stride()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: _Shape,
                  **others: torch.Tensor) -> None:
    """Safety net for what the kernels cannot serve (the ops layer validates first);
    ``others`` are further operands laid out like q whose strides are checked too."""
    if not MIN_HEAD_DIM <= shape.D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
                         f"got {shape.D}")
    if q.dtype not in ALLOWED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {ALLOWED_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if shape.H % shape.Hkv:
        raise ValueError(f"query heads ({shape.H}) must be a multiple of KV heads "
                         f"({shape.Hkv})")
    for name, t in {"q": q, "k": k, "v": v, **others}.items():
        _, _, stride_t, stride_d = _strides(t, shape.varlen)
        rows = shape.Tk if name in ("k", "v") else shape.Tq
        span = max(rows - 1, 0) * stride_t + (shape.D - 1) * stride_d
        if span >= 2 ** 31:
            raise ValueError(f"{name}: one sequence's head spans {span} elements; the "
                             f"kernels index inside it with int32 (< 2**31)")


def head_dim_split(head_dim: int, min_width: int = 16) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dim's tiles along D. Triton's tile shapes are
    powers of two, while the tensor cores take any K and N that are multiples of 16
    (8): so D runs as two column pieces, BLOCK_D the largest power of two <= D and
    BLOCK_D2 the next power of two of the rest, at least 16 (``tl.dot`` needs K >= 16),
    where those two are narrower than the one padded tile max(16, next_pow2(D)); else
    (that padded width, 0): no split.

        80 -> (64, 16)   96 -> (64, 32)   40, 48 -> (32, 16)   160 -> (128, 32)
        192 -> (128, 64)                  24 -> (32, 0)   112 -> (128, 0)   64 -> (64, 0)

    (112 would be 64 + 64: as wide as 128, so nothing is gained.) ``min_width``: the
    narrowest piece, 16, or 32 for fp8 dots (80 -> (64, 32))."""
    padded = max(min_width, next_pow2(head_dim))
    first = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - first
    second = max(min_width, next_pow2(rest)) if rest else 0
    if rest and first >= min_width and first + second < padded:
        return first, second
    return padded, 0


def _variant(q: torch.Tensor, shape: _Shape, causal: bool, scale: float, window,
             softcap: float, alibi, dropout_p: float, seed: int, offset: int,
             cu_q, cu_k) -> _Variant:
    """The kernels' view of the options: causal folded into the window (right = 0),
    the scale with log2(e) or the soft cap folded in, ALiBi slopes as (B, H)."""
    left, right = window
    if not (isinstance(left, int) and isinstance(right, int) and left >= -1
            and right >= -1):
        raise ValueError(f"window must be two ints >= -1 (-1: unbounded), got {window!r}")
    if causal:
        right = 0
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and not (0 <= seed < 2 ** 63 and 0 <= offset < 2 ** 32):
        raise ValueError(f"dropout seed must be in [0, 2**63) and offset in [0, 2**32), "
                         f"got {seed!r}, {offset!r}")
    slope_strides = (0, 0)
    if alibi is not None:
        if alibi.dtype != torch.float32 or alibi.device != q.device:
            raise ValueError(f"alibi must be float32 on {q.device}, got {alibi.dtype} on "
                             f"{alibi.device}")
        if tuple(alibi.shape) not in ((shape.H,), (shape.B, shape.H)):
            raise ValueError(f"alibi must be ({shape.H},) or ({shape.B}, {shape.H}), got "
                             f"{tuple(alibi.shape)}")
        alibi = alibi.expand(shape.B, shape.H)          # (H,): the same for every batch
        slope_strides = alibi.stride()
    dot_fp32 = INTERPRET and q.dtype == torch.bfloat16
    flags = dict(HEAD_DIM=shape.D, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                 SOFTCAP=softcap > 0, ALIBI=alibi is not None, DROPOUT=dropout_p > 0,
                 VARLEN=shape.varlen, DOT_FP32=dot_fp32,
                 IEEE=q.dtype == torch.float32 or dot_fp32, **_TILES)
    qk_scale = scale / softcap if softcap > 0 else scale * LOG2E
    scalars = (qk_scale, softcap * LOG2E, max(left, 0), max(right, 0), float(dropout_p),
               seed, offset)
    return _Variant(cu_q, cu_k, alibi, slope_strides, scalars, flags)


# Tensor descriptors (TMA) are built on the device, per program (``_rows``), not on the
# host: their bounds are then the program's own sequence (varlen tails load zeros and
# stores stop at the sequence's end, not at the packed tensor's), their tile shape is
# the config's (the autotuner needs no pre-hook, which torch.compile's wrap_triton
# refuses), and a call builds no Python descriptor objects. Triton asks its allocator
# for the descriptors' global scratch at each launch (inductor sets one; see
# ``_ensure_allocator``). Warp specialization (``tl.range(..., warp_specialize=True)``)
# is applied by Triton 3.6-3.9 on sm_100+ only: on sm_90 the flag compiles to the same
# PTX as the plain loop, so it is asked for from sm_100 on.
_HAS_TMA = hasattr(tl, "make_tensor_descriptor")
_HAS_WARP_SPEC = "warp_specialize" in inspect.signature(tl.range).parameters
_TMA_ENABLED = os.environ.get("FASTATTN_TMA", "1") != "0"     # FASTATTN_TMA=0: pointers
_DEVICE_PATHS: dict[tuple[str, int], tuple[bool, bool]] = {}


class Paths(NamedTuple):
    """What the kernels may use on a device: TMA, warp specialization, and the head-dim
    split (``head_dim_split``) in every kernel, not only the forward below D = 128."""
    tma: bool
    warp_spec: bool
    split_all: bool
    fp8_dot: bool       # e4m3 tiles and their tensor-core dots (sm_89+; per major: 9+)


def _device_paths(device: torch.device) -> Paths:
    """``Paths`` of ``device``: TMA on CUDA sm_90+ with a Triton that has tensor
    descriptors, warp specialization on sm_100+ with one that has ``warp_specialize``;
    neither elsewhere (the interpreter, older GPUs) or with FASTATTN_TMA=0. The split in
    every kernel on sm_90+ and under the interpreter (so the tests run every split).
    Cached per device."""
    if device.type != "cuda":
        return Paths(False, False, True, True)
    index = torch.cuda.current_device() if device.index is None else device.index
    paths = _DEVICE_PATHS.get((device.type, index))
    if paths is None:
        major, _ = torch.cuda.get_device_capability(index)
        paths = _DEVICE_PATHS[(device.type, index)] = arch_paths(major)
    return paths


def arch_paths(major: int) -> Paths:
    """``Paths`` on a CUDA GPU of compute capability ``major``.x (see ``_device_paths``;
    `fastattn check-kernels` compiles what each arch would get). Before sm_90 a split
    head dim's first tiles spill 8-48 B per thread (bf16, sm_80: dK/dV at 80, 96 and
    192, dQ at 96, the forward at 192) where the padded ones spill nothing, so there
    only the forward below D = 128 (80, 96, 40, 48: spill-free, fewer registers than
    padded) splits. fp8 (e4m3) attention from sm_90 on (sm_89 could too; the rule goes
    by major version, as check-kernels compiles)."""
    tma = major >= 9 and _HAS_TMA and _TMA_ENABLED
    return Paths(tma, tma and major >= 10 and _HAS_WARP_SPEC, major >= 9, major >= 9)


def _tma_ok(varlen: bool, *tensors: torch.Tensor) -> bool:
    """Whether TMA moves the tiles of these (B, H, T, D) (or varlen (total, H, D))
    tensors: fp16/bf16, unit stride along D, and the base and every other stride a
    multiple of 16 bytes (the copy engine's rule for global addresses and strides; the
    sequence starts and heads the kernels add keep that alignment), rows apart
    (stride > 0). Not fp32: its ieee dots run on FMA units from registers, and with
    TMA tiles every sm_90 first config spills (0.3-4 kB per thread). Not bf16 under the
    interpreter, whose bf16 descriptors load wrong values (Triton 3.6-3.9)."""
    dtype = tensors[0].dtype
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return False
    for x in tensors:
        size = x.element_size()
        stride_b, stride_h, stride_m, stride_d = _strides(x, varlen)
        if (stride_d != 1 or stride_m <= 0 or x.data_ptr() % 16
                or (stride_b * size) % 16 or (stride_h * size) % 16
                or (stride_m * size) % 16):
            return False
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch if it has none (by
    default it has none: launching a TMA kernel would fail). A caller's own allocator,
    and inductor's under torch.compile, are kept."""
    if torch.compiler.is_compiling():
        return
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _paths(device: torch.device, varlen: bool, head_dim: int, forward: bool,
           *tensors: torch.Tensor) -> dict:
    """The TMA, WARP_SPEC and head-dim constexprs of one launch: TMA where the device has
    it and every tensor qualifies (``_tma_ok``), else the pointer path; the head dim
    split where the device's ``Paths`` allow it for this kernel, else padded."""
    paths = _device_paths(device)
    tma = paths.tma and _tma_ok(varlen, *tensors)
    if tma and device.type == "cuda":
        _ensure_allocator()
    fp8 = tensors[0].dtype == FP8
    width = 32 if fp8 else 16                   # an fp8 dot needs K >= 32, others 16
    block_d, block_d2 = head_dim_split(head_dim, width)
    if block_d2 and not (paths.split_all or (forward and head_dim < 128)):
        block_d, block_d2 = max(width, next_pow2(head_dim)), 0
    if fp8 and not paths.fp8_dot:
        raise ValueError(f"float8 attention needs fp8 tensor cores (sm_90+; Triton takes "
                         f"no e4m3 tensor before sm_89), got {device}")
    return {"TMA": tma, "WARP_SPEC": tma and paths.warp_spec, "BLOCK_D": block_d,
            "BLOCK_D2": block_d2}


def _flat_grid(T: int, block: str, heads: int):
    """Grid of ``_program_ids``: cdiv(T, meta[block]) blocks for each of ``heads``
    (batch × heads) on axis 0."""
    return lambda meta: (triton.cdiv(T, meta[block]) * heads,)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             scale: float, *, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
             alibi: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0,
             offset: int = 0, cu_seqlens_q: torch.Tensor | None = None,
             cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
             max_seqlen_k: int = 0, descale: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward.

    Dense: q (B, H, Tq, D); k, v (B, Hkv, Tk, D). Varlen (cu_seqlens_q/k given, int32
    (B + 1,), cumulative from 0): q (total_q, H, D), k, v (total_k, Hkv, D), sequence b
    owning rows cu_seqlens[b]:cu_seqlens[b + 1]; max_seqlen_q/k bound the lengths. Any
    strides; H % Hkv == 0; fp16, bf16 or fp32 (all alike); D in [1, 256].

    window (left, right), -1 unbounded, and causal (right = 0) pick the visible keys;
    softcap > 0 caps the scores at ±softcap by tanh; alibi (B, H) or (H,) fp32 slopes
    subtract slope·|i + Tk − Tq − j|; dropout_p > 0 drops P with the Philox stream
    (seed, offset). See the module docstring for the exact formulas.

    FP8 (q, k, v in float8_e4m3fn, dense, forward only): ``descale`` (3, B, Hkv) fp32
    holds the factors that make q, k, v the values they stand for (q · descale[0]...):
    q's and k's join the scores' scale, v's scales the output; P is cast to fp8 for the
    P·V dot. ``out_dtype`` (fp16 or bf16) is o's dtype.

    Returns o, contiguous, q.dtype (FP8: out_dtype), shaped like q, and lse float32,
    the natural-log log-sum-exp of each row's scores (-inf for rows that see no key):
    (B, H, Tq), or (H, total_q) in varlen.
    """
    shape = _shape(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    fp8 = q.dtype == FP8
    _check_inputs(q, k, v, shape)
    if fp8 != (descale is not None) or (fp8 and (
            shape.varlen or descale.dtype != torch.float32
            or tuple(descale.shape) != (3, shape.B, shape.Hkv) or descale.stride(2) != 1
            or out_dtype not in (torch.float16, torch.bfloat16))):
        raise ValueError(f"fp8 q, k, v (dense) need descale (3, B, Hkv) fp32 with unit "
                         f"stride along Hkv and out_dtype fp16/bf16; got q {q.dtype}, "
                         f"descale {None if descale is None else tuple(descale.shape)}, "
                         f"out_dtype {out_dtype}")
    var = _variant(q, shape, causal, scale, window, softcap, alibi, dropout_p, seed,
                   offset, cu_seqlens_q, cu_seqlens_k)
    o = _empty(q.shape, out_dtype if fp8 else q.dtype, q.device)
    lse = _empty((shape.H, q.shape[0]) if shape.varlen else q.shape[:3], torch.float32,
                 q.device)
    vl = shape.varlen
    flags = {**var.flags, **_paths(q.device, vl, shape.D, True, q, k, v, o), "FP8": fp8}
    grid = _flat_grid(shape.Tq, "BLOCK_M", shape.B * shape.H)
    launch(_attn_fwd(q.dtype, shape.D, flags))[grid](
        q, k, v, o, lse, var.cu_q, var.cu_k, var.slopes, descale,
        *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(o, vl),
        *_row_strides(lse, vl), *var.slope_strides,
        *((descale.stride(0), descale.stride(1)) if fp8 else (0, 0)),
        shape.H, shape.H // shape.Hkv, shape.Tq, shape.Tk, *var.scalars,
        next_pow2(shape.Tq), next_pow2(shape.Tk), **flags)
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, *,
             window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
             alibi: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0,
             offset: int = 0, cu_seqlens_q: torch.Tensor | None = None,
             cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
             max_seqlen_k: int = 0, deterministic: bool = True,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward.

    do, o: shaped like q, any strides; q, k, v and the keywords as for ``attn_fwd``
    (the same values: dropout replays its mask from seed and offset); lse as returned by
    ``attn_fwd``. Returns dq shaped like q and dk, dv shaped like k, contiguous, in the
    input dtype.

    deterministic=True (the default): 7 matmuls per tile, in two passes (dK/dV, then
    dQ), every output written by one program, without atomics: bitwise reproducible.
    deterministic=False: 5 matmuls per tile, one pass; the dK/dV programs also add
    each tile's dQ share to an fp32 buffer with atomics, converted to q's dtype at the
    end. The order of those adds varies, so dq may differ in its last bits from run to
    run (flash-attn's meaning of the flag); dk and dv stay reproducible.
    """
    shape = _shape(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.dtype == FP8:
        raise ValueError("fp8 attention is forward only: no backward kernels for float8")
    _check_inputs(q, k, v, shape, do=do, o=o)
    var = _variant(q, shape, causal, scale, window, softcap, alibi, dropout_p, seed,
                   offset, cu_seqlens_q, cu_seqlens_k)
    vl = shape.varlen
    delta = _empty(lse.shape, torch.float32, q.device)
    # The atomic path accumulates into zeros; fp32, so the adds do not round to q.dtype.
    dq = (_empty(q.shape, q.dtype, q.device) if deterministic
          else torch.zeros(q.shape, dtype=torch.float32, device=q.device))
    dk = _empty(k.shape, q.dtype, q.device)
    dv = _empty(k.shape, q.dtype, q.device)

    # Δ is row by row: a varlen batch is one sequence of total_q rows.
    rows, batch = (q.shape[0], 1) if vl else (shape.Tq, shape.B)
    launch(_attn_bwd_delta_kernel)[_flat_grid(rows, "BLOCK_M", batch * shape.H)](
        o, do, delta, *_strides(o, vl), *_strides(do, vl), *_row_strides(delta, vl),
        shape.H, rows, HEAD_DIM=shape.D, BLOCK_M=_DELTA_BLOCK_M,
        BLOCK_D=max(16, next_pow2(shape.D)))     # a row reduction: the padded width

    operands = (q, k, v, do, lse, delta)
    pointers = (var.cu_q, var.cu_k, var.slopes)
    strides = (*_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(do, vl),
               *_row_strides(lse, vl), *_row_strides(delta, vl), *var.slope_strides)
    scalars = (shape.Tq, shape.Tk, scale, *var.scalars, next_pow2(shape.Tq),
               next_pow2(shape.Tk))
    group = shape.H // shape.Hkv
    # dQ of the atomic path is an fp32 buffer added to with pointer atomics.
    paths = _paths(q.device, vl, shape.D, False, q, k, v, do, dk, dv,
                   *((dq,) if deterministic else ()))
    flags = {**var.flags, "TMA": paths["TMA"], "BLOCK_D": paths["BLOCK_D"],
             "BLOCK_D2": paths["BLOCK_D2"]}
    # The atomic dK/dV, and the one with a soft cap, ALiBi or dropout, spill on sm_90
    # through TMA at D > 128 in every tile tried (152-1432 B per thread): there they
    # keep the pointer path, which compiles spill-free.
    plain = deterministic and _tile_key(q.dtype, shape.D, var.flags)[2] == "plain"
    dkdv_flags = {**flags, "ATOMIC_DQ": not deterministic,
                  "TMA": paths["TMA"] and (plain or shape.D <= 128)}
    launch(_attn_bwd_dkdv(q.dtype, shape.D, dkdv_flags))[
        _flat_grid(shape.Tk, "BLOCK_N", shape.B * shape.Hkv)](
        *operands, dk, dv, None if deterministic else dq, *pointers, *strides,
        *_strides(dk, vl), *_strides(dv, vl),
        *((0, 0, 0, 0) if deterministic else _strides(dq, vl)),
        shape.Hkv, group, *scalars, **dkdv_flags)
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    grid = _flat_grid(shape.Tq, "BLOCK_M", shape.B * shape.H)
    launch(_attn_bwd_dq(q.dtype, shape.D, flags))[grid](
        *operands, dq, *pointers, *strides, *_strides(dq, vl),
        shape.H, group, *scalars, **flags)
    return dq, dk, dv
