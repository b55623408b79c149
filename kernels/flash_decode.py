"""Split-K flash decoding in Triton: attention of a few query rows against a KV cache.

What is computed
----------------
Sequence b attends to the cache positions [start_b, end_b): its keys j = 0 .. Tk − 1,
Tk = end_b − start_b, are the cache rows start_b + j, read straight from the cache:
from row ``cache_row[b]`` of a contiguous cache (B_cache, T_cache, Hkv, D), or through
``block_table[b]`` from a paged one (n_pages, PAGE, Hkv, D), where position p lives in
page ``block_table[b, p // PAGE]`` at row p % PAGE. Nothing is gathered or copied.

For query row i (of Tq) and query head h, with off = Tk − Tq (bottom-right alignment):

    x_ij = scale · q_i·k_j;  softcap > 0:  x_ij = softcap · tanh(x_ij / softcap)
    alibi:  x_ij −= slope_bh · |i + off − j|
    key j visible iff  (left < 0 or j ≥ i + off − left) and (right < 0 or j ≤ i + off + right)
    L_i = log Σ_j exp(x_ij),  O_i = Σ_j exp(x_ij − L_i) v_j

(the rules of fastattn's attention kernels; causal is the window's right = 0). A row that
sees no key gets O = 0 and L = -inf.

Split-K. With one query token a head has one row of work, so a grid over query blocks
alone leaves most SMs idle at small batch. The keys are therefore cut into S splits,
and each program runs the online softmax (see kernels/flash_attention.py) over its
split only, writing a partial output and log-sum-exp in fp32:

    O_s = Σ_{j∈s} exp(x_j − L_s) v_j,   L_s = log Σ_{j∈s} exp(x_j)

A second kernel combines them exactly: L = log Σ_s exp(L_s), O = Σ_s exp(L_s − L) O_s
(an empty split has L_s = -inf and weight 0). With S = 1 the first kernel writes O and
L itself.

GQA packing. The G = H / Hkv query heads that share a KV head, times the Tq query rows,
are packed into the M dimension of one tile (row r = i·G + g), so each K/V tile is read
once per KV head instead of once per query head, and a decoding step with G ≥ 16 fills
a 16-row tile without padding.

Limits
------
- Head dim D: any integer 1..256, padded to BLOCK_D = max(16, next power of two).
- dtypes fp16, bf16, fp32 (q and the caches alike); fp32 accumulation; fp32 dots in
  true fp32 (``input_precision="ieee"``).
- Any strides for q, the caches, the block table and the ALiBi slopes (a stride-0
  expand of (H,) is fine). Cache offsets are int64.
- Inference only: there is no backward.
- Under TRITON_INTERPRET=1, ``tl.dot`` on bf16 gives wrong results (triton#11584): the
  launcher then sets DOT_FP32 and the tiles are cast to fp32 before each dot.

Sources: Dao et al., "Flash-Decoding for long-context inference" (2023); Milakov &
Gimelshein, "Online normalizer calculation for softmax" (2018).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, launch, next_pow2, program_slots
from .flash_attention import _dot, _tanh     # shared jit helpers
from ._utils import empty as _empty

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLITS = 128
# A split streams at least this many key blocks, so that its partial's write and the
# combine stay small next to the keys it reads.
MIN_BLOCKS_PER_SPLIT = 4


# --------------------------------------------------------------------------- helpers


@triton.jit
def _packed_rows(r, GROUP, hk):
    """Query row i and query head h of packed tile rows r = i·GROUP + g (int64)."""
    r = r.to(tl.int64)
    return r // GROUP, hk * GROUP + r % GROUP


@triton.jit
def _key_span(r0, M, Tq, Tk, GROUP, left, right, BLOCK_M: tl.constexpr):
    """Keys [lo, hi) that some row of the tile starting at packed row r0 may see."""
    i_first = r0 // GROUP
    i_last = (tl.minimum(r0 + BLOCK_M, M) - 1) // GROUP
    lo = tl.where(left >= 0, tl.maximum(i_first + Tk - Tq - left, 0), 0)
    hi = tl.where(right >= 0, tl.minimum(i_last + Tk - Tq + right + 1, Tk), Tk)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _cache_rows(BLOCK_TABLE, stride_btb, stride_btp, b, row, pos, ok, page_size,
                PAGED: tl.constexpr):
    """(cache row, row offset) of positions ``pos`` of sequence b, both int64: page
    ``block_table[b, pos // page_size]`` at pos % page_size, or ``row`` at pos."""
    if PAGED:
        page = tl.load(BLOCK_TABLE + b * stride_btb + (pos // page_size) * stride_btp,
                       mask=ok, other=0)
        rows = page.to(tl.int64)
        slots = (pos % page_size).to(tl.int64)
    else:
        rows = row
        slots = pos.to(tl.int64)
    return rows, slots


# --------------------------------------------------------------------------- forward


@triton.jit
def _decode_inner(acc, l_i, m_i, q, K, V, BLOCK_TABLE,
                  stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                  stride_btb, stride_btp, b, row, start, lo, hi, page_size,
                  diag, slope, left, right, score_scale, softcap2,
                  offs_n, offs_d, d_mask,
                  PAGED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  IEEE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l, m) with keys [lo, hi) of sequence b; ``diag``
    (BLOCK_M,) is each row's i + off, ``slope`` its ALiBi slope in log2 units."""
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + offs_n                                              # keys of the sequence
        ok = j < hi
        rows, slots = _cache_rows(BLOCK_TABLE, stride_btb, stride_btp, b, row, start + j,
                                  ok, page_size, PAGED)
        kv_mask = ok[:, None] & d_mask[None, :]
        k = tl.load(K + (rows * stride_kb + slots * stride_kt)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE, DOT_FP32)                     # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            s = softcap2 * _tanh(s * score_scale)                    # log2 units
        else:
            s = s * score_scale
        dist = diag[:, None] - j[None, :]                            # i + off − j
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(dist).to(tl.float32)
        visible = ok[None, :] & ((left < 0) | (dist <= left)) & ((right < 0) | (-dist <= right))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key keeps m = -inf; exponentiate against 0 instead,
        # so that exp2(-inf - -inf) = NaN never happens (its p and alpha are then 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (rows * stride_vb + slots * stride_vt)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, DOT_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_fwd_kernel(
    Q,            # (B, Tq, H, D)
    K,            # (B_cache, T_cache, Hkv, D), or pages (n_pages, PAGE, Hkv, D) if PAGED
    V,            # as K
    BLOCK_TABLE,  # (B, max_pages) int32, PAGED only
    CACHE_ROW,    # (B,) int32 cache row of each sequence, HAS_CACHE_ROW only (else b)
    KEY_START,    # (B,) int32 first position attended, HAS_KEY_START only (else 0)
    KEY_END,      # (B,) int32 one past the last position attended
    ALIBI,        # (B, H) fp32 slopes, HAS_ALIBI only
    O,            # SPLIT: (B·Hkv, S, M, D) fp32 partials; else (B, Tq, H, D) output
    LSE,          # SPLIT: (B·Hkv, S, M) fp32 partials, log2; else (B, H, Tq) fp32, natural log
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btp, stride_ab, stride_ah,
    stride_o0, stride_o1, stride_o2, stride_od,   # SPLIT: (bh, s, r); else (b, t, h)
    stride_l0, stride_l1, stride_l2,              # SPLIT: (bh, s, r); else (b, h, t)
    Hkv, GROUP, Tq, n_splits, page_size,
    left, right,        # window, -1 = unbounded (causal: right = 0)
    score_scale,        # scale·log2(e), or scale / softcap with SOFTCAP
    softcap2,           # softcap·log2(e)
    HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, HAS_CACHE_ROW: tl.constexpr,
    HAS_KEY_START: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid axis (axes 1 and 2 stop at 65,535): split fastest, then the packed
    # row block, then (batch, KV head).
    M = Tq * GROUP
    n_mblocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_s = pid % n_splits
    pid_m = (pid // n_splits) % n_mblocks
    pid_bh = pid // (n_splits * n_mblocks)
    b = pid_bh // Hkv
    hk = (pid_bh % Hkv).to(tl.int64)

    start = 0
    if HAS_KEY_START:
        start = tl.load(KEY_START + b)
    Tk = tl.load(KEY_END + b) - start
    row = b.to(tl.int64)
    if HAS_CACHE_ROW:
        row = tl.load(CACHE_ROW + b).to(tl.int64)
    K += hk * stride_kh
    V += hk * stride_vh

    r0 = pid_m * BLOCK_M
    r = r0 + tl.arange(0, BLOCK_M)
    row_ok = r < M
    i, h = _packed_rows(r, GROUP, hk)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (i * stride_qt + h * stride_qh)[:, None]
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)
        slope = slope * 1.4426950408889634                          # log2 units

    # This split's share of the keys the tile can see, in whole key blocks.
    lo, hi = _key_span(r0, M, Tq, Tk, GROUP, left, right, BLOCK_M)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), n_splits) * BLOCK_N
    lo = lo + pid_s * per_split
    hi = tl.minimum(hi, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K, V, BLOCK_TABLE,
                                  stride_kb, stride_kt, stride_kd,
                                  stride_vb, stride_vt, stride_vd, stride_btb, stride_btp,
                                  b, row, start, lo, hi, page_size,
                                  i + Tk - Tq, slope, left, right, score_scale, softcap2,
                                  offs_n, offs_d, d_mask, PAGED, SOFTCAP, HAS_ALIBI,
                                  IEEE, DOT_FP32, BLOCK_N)

    # l >= 1 for every row that saw a key (its max contributes exp2(0)); rows that saw
    # none get O = 0 and L = -inf.
    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    o = acc * (1.0 / l_i)[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_i), float("-inf"))
    if SPLIT:
        bh, split, r = pid_bh.to(tl.int64), pid_s.to(tl.int64), r.to(tl.int64)
        o_rows = bh * stride_o0 + split * stride_o1 + r * stride_o2
        l_rows = bh * stride_l0 + split * stride_l1 + r * stride_l2
        tl.store(LSE + l_rows, lse2, mask=row_ok)
    else:
        o_rows = b.to(tl.int64) * stride_o0 + i * stride_o1 + h * stride_o2
        l_rows = b.to(tl.int64) * stride_l0 + h * stride_l1 + i * stride_l2
        tl.store(LSE + l_rows, lse2 * 0.6931471805599453, mask=row_ok)   # natural log
    tl.store(O + o_rows[:, None] + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_combine_kernel(
    OP,    # (B·Hkv, S, M, D) fp32 partial outputs
    LP,    # (B·Hkv, S, M) fp32 partial log-sum-exps, log2
    O,     # (B, Tq, H, D) output
    LSE,   # (B, H, Tq) fp32 output, natural log
    stride_op0, stride_op1, stride_op2, stride_opd,
    stride_lp0, stride_lp1, stride_lp2,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    Hkv, GROUP, Tq, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O = Σ_s exp2(L_s − L) O_s with L = log2 Σ_s exp2(L_s), as one more online softmax
    over the splits."""
    M = Tq * GROUP
    n_mblocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = (pid // n_mblocks).to(tl.int64)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    r = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = r < M
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    OP += pid_bh * stride_op0
    LP += pid_bh * stride_lp0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_splits):
        lse_s = tl.load(LP + s * stride_lp1 + r * stride_lp2, mask=row_ok,
                        other=float("-inf"))
        o_s = tl.load(OP + s * stride_op1 + r[:, None] * stride_op2
                      + offs_d[None, :] * stride_opd, mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)         # as in the forward
        alpha = tl.exp2(m_i - m_ref)
        w = tl.exp2(lse_s - m_ref)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new

    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
    # One reciprocal per row: a division per element called ptxas's slow-path
    # subroutine, which spilled a register on sm_90 at D = 80.
    o = acc * (1.0 / l_i)[:, None]
    i, h = _packed_rows(r, GROUP, hk)
    tl.store(LSE + b * stride_lb + h * stride_lh + i * stride_lt, lse, mask=row_ok)
    tl.store(O + b * stride_ob + (i * stride_ot + h * stride_oh)[:, None]
             + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------ launchers


def tiles(dtype: torch.dtype, head_dim: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward for ``rows`` packed query
    rows (Tq·G). Measured with ``fastattn check-kernels`` on sm_80/sm_90: none spills.

    - 16 bits: BLOCK_M covers the rows, at least 16 (the smallest ``tl.dot``; a decoding
      step) and at most 64 (32 at D = 256); K/V tiles of 64 keys (32 at D = 256). Tiles
      of more than 16 rows (prefill chunks, wide GQA groups) take 8 warps: at D = 128 a
      64-row tile needs 255 registers with 4.
    - fp32: true-fp32 dots run on FMA units and hold their operands in registers; 16 x 32
      tiles over 8 warps (32 rows spill at D >= 128, and so do 4 warps at D = 128).
    """
    block_d = max(16, next_pow2(head_dim))
    if INTERPRET:   # the interpreter's cost is per program and op: small fixed tiles
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 16, 32, 8, 2
    block_m = max(16, min(next_pow2(rows), 32 if block_d == 256 else 64))
    return block_m, 32 if block_d == 256 else 64, 4 if block_m == 16 else 8, 2


def choose_splits(batch_heads: int, row_blocks: int, keys: int, block_n: int,
                  device: torch.device) -> int:
    """Splits for ``num_splits=0``: enough programs to fill the device about twice
    (``program_slots``), but at least ``MIN_BLOCKS_PER_SPLIT`` key blocks per split of
    ``keys`` (an upper bound of the keys a row block sees), and at most ``MAX_SPLITS``."""
    programs = batch_heads * row_blocks
    want = triton.cdiv(program_slots(device), programs)
    most = triton.cdiv(triton.cdiv(max(keys, 1), block_n), MIN_BLOCKS_PER_SPLIT)
    return max(1, min(want, most, MAX_SPLITS))


def decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               key_end: torch.Tensor, key_start: torch.Tensor | None,
               block_table: torch.Tensor | None, cache_row: torch.Tensor | None,
               alibi: torch.Tensor | None, scale: float, window: tuple[int, int],
               softcap: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against cache positions [key_start[b], key_end[b]) of each sequence.

    q: (B, Tq, H, D). k_cache, v_cache: (B_cache, T_cache, Hkv, D) read at row
    ``cache_row[b]`` (default b), or with ``block_table`` (B, max_pages) int32 pages
    (n_pages, PAGE, Hkv, D). key_end, key_start, cache_row: (B,) int32. alibi: (B, H)
    fp32. window: (left, right) with causal already folded in (right = 0). num_splits:
    0 chooses (``choose_splits``), 1 is a single pass. Any strides; the ops layer has
    validated everything. Returns o (B, Tq, H, D) contiguous in q.dtype and lse
    (B, H, Tq) fp32, natural log.
    """
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    group, rows = H // Hkv, Tq * (H // Hkv)
    block_m, block_n, warps, stages = tiles(q.dtype, D, rows)
    row_blocks = triton.cdiv(rows, block_m)
    paged = block_table is not None
    page_size = k_cache.shape[1]
    keys = block_table.shape[1] * page_size if paged else page_size
    if window[0] >= 0:   # a row block sees at most left + its rows + right keys
        keys = min(keys, window[0] + Tq + max(window[1], 0))
    splits = num_splits or choose_splits(B * Hkv, row_blocks, keys, block_n, q.device)
    o = _empty((B, Tq, H, D), q.dtype, q.device)
    lse = _empty((B, H, Tq), torch.float32, q.device)
    if splits > 1:
        o_part = _empty((B * Hkv, splits, rows, D), torch.float32, q.device)
        lse_part = _empty((B * Hkv, splits, rows), torch.float32, q.device)
    else:
        o_part, lse_part = o, lse
    dot_fp32 = INTERPRET and q.dtype == torch.bfloat16
    dummy = key_end                  # stands in for the optional tensors a flag turns off
    bt = block_table if paged else dummy
    slopes = alibi if alibi is not None else dummy
    score_scale = scale / softcap if softcap > 0 else scale * LOG2E
    launch(_decode_fwd_kernel)[(splits * row_blocks * B * Hkv,)](
        q, k_cache, v_cache, bt, dummy if cache_row is None else cache_row,
        dummy if key_start is None else key_start, key_end, slopes, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *(bt.stride() if paged else (0, 0)), *(slopes.stride() if alibi is not None else (0, 0)),
        *o_part.stride(), *lse_part.stride(),
        Hkv, group, Tq, splits, page_size, window[0], window[1],
        score_scale, softcap * LOG2E,
        HEAD_DIM=D, PAGED=paged, HAS_CACHE_ROW=cache_row is not None,
        HAS_KEY_START=key_start is not None, HAS_ALIBI=alibi is not None,
        SOFTCAP=softcap > 0, SPLIT=splits > 1, IEEE=q.dtype == torch.float32 or dot_fp32,
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(D)), num_warps=warps, num_stages=stages)
    if splits > 1:
        launch(_decode_combine_kernel)[(row_blocks * B * Hkv,)](
            o_part, lse_part, o, lse, *o_part.stride(), *lse_part.stride(),
            *o.stride(), *lse.stride(), Hkv, group, Tq, splits,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=max(16, next_pow2(D)), num_warps=warps,
            num_stages=1)
    return o, lse
