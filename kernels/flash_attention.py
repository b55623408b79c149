"""Flash attention in Triton: forward, backward and their launchers.

What is computed
----------------
For one (batch, head), with query rows q_i, key rows k_j and value rows v_j:

    s_ij = scale · q_i·k_j                  scores; -inf where the mask hides key j
    L_i  = log Σ_j exp(s_ij)                row log-sum-exp (natural log)
    P_ij = exp(s_ij − L_i)                  softmax, never stored
    O_i  = Σ_j P_ij v_j

Causal masking is aligned to the bottom-right, as in flash-attn: query i sees key j
iff j ≤ i + (Tk − Tq). With Tq = 1 (decoding) the query sees every key; with Tq > Tk the
first Tq − Tk rows see no key, and for them O_i = 0, L_i = -inf and no gradient flows.

Forward: online softmax. A program owns BLOCK_M query rows and streams over key blocks
of BLOCK_N rows. Per row it keeps the running max m, the running sum l = Σ exp(s − m)
and the unnormalised output acc = Σ exp(s − m)·v. When a key block raises the max to
m', everything summed so far was scaled by exp(−m) and must now be scaled by exp(−m'),
so the old sums are multiplied by α = exp(m − m'):

    l   ← α·l   + Σ_j exp(s_ij − m')
    acc ← α·acc + Σ_j exp(s_ij − m')·v_j

At the end O = acc / l and L = m + log l. Subtracting the max keeps every exponent ≤ 0,
so scores of ±1e4 stay finite. The exponentials use exp2 with log2(e) folded into the
scale (s₂ = s·log2 e, exp(s) = 2^s₂): one multiply per score fewer. A row that has seen
no key yet has m = -inf; it is exponentiated against 0 instead, which avoids
-inf − (-inf) = NaN. The forward writes O and L only: the Tq×Tk matrix never exists.

Backward keeps L and recomputes P from Q and K. With dO the gradient of O:

    dV_j  = Σ_i P_ij dO_i
    dP_ij = dO_i·v_j
    dS_ij = P_ij (dP_ij − Δ_i),   Δ_i = Σ_j P_ij dP_ij = dO_i·O_i    (softmax VJP)
    dQ_i  = scale · Σ_j dS_ij k_j
    dK_j  = scale · Σ_i dS_ij q_i

Three kernels: Δ (preprocessing), dK/dV (a program per key block; it loops over the
query heads of its KV group and over the query blocks) and dQ (a program per query
block; it loops over the key blocks). Every output element is written by exactly one
program, with no atomics, so the backward is bitwise reproducible.

Masking: tiles entirely visible to every row they meet run without a mask. Only tiles
that straddle the causal diagonal or hold the key tail (Tk not a multiple of BLOCK_N)
apply one; causal tiles entirely above the diagonal are skipped. Lanes outside the
tensors (the query tail, the head-dim padding) load zeros, which add nothing to any
dot product, and are never stored.

Limits
------
- Head dim D: a multiple of 8 in [16, 256]; padded to BLOCK_D = next power of two
  with masked loads and stores.
- dtypes: fp16, bf16, fp32 (q, k, v alike); accumulation in fp32. fp32 dots use
  ``input_precision="ieee"`` (true fp32, no TF32).
- Lengths: any Tq, Tk ≥ 1. GQA/MQA: H % Hkv == 0, query head h reads KV head
  h // (H // Hkv).
- Any strides (views, transposes, packed QKV slices, stride-0 expands). Offsets
  across batch and heads are int64; inside one head they are int32, so each head's
  rows must span fewer than 2**31 elements (the launchers check).
- Under TRITON_INTERPRET=1, ``tl.dot`` on bf16 operands gives wrong results
  (triton#11584); the launchers then set DOT_FP32 and the tiles are cast to fp32
  before each dot.

Sources: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023);
Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, launch, next_pow2
from ._utils import empty as _empty

LOG2E = math.log2(math.e)
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


# --------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
    """``a @ b`` accumulated in fp32; true-fp32 products when IEEE (fp32 inputs)."""
    if DOT_FP32:  # interpreter with bf16 inputs: triton#11584
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _program_ids(T, BLOCK: tl.constexpr):
    """(block index along T, batch·head index) of this program. The grid is flat, one
    program per (block, head) pair with the block fastest (so programs that share K/V
    run together): CUDA caps grid axes 1 and 2 at 65,535, which batched decoding
    (e.g. batch 2048 × 32 heads) exceeds; axis 0 takes 2**31 − 1."""
    n_blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _key_range(m0, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks for the query block starting at row m0: those starting in
    [0, n_fast) need no mask, those in [n_fast, n_end) do."""
    if CAUSAL:
        # Row m0, the block's first, sees keys [0, m0 + 1 + Tk - Tq): so do all rows
        # below it. The last row sees keys [0, m0 + BLOCK_M + Tk - Tq).
        full = tl.minimum(tl.maximum(m0 + 1 + Tk - Tq, 0), Tk)
        n_end = tl.minimum(m0 + BLOCK_M + Tk - Tq, Tk)
    else:
        full = Tk
        n_end = Tk
    # Clamped to >= 0 above, so // rounds down on GPU and in the interpreter alike.
    n_fast = full // BLOCK_N * BLOCK_N
    return n_fast, n_end


@triton.jit
def _query_range(n0, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Query blocks for the key block starting at n0: those starting in
    [m_start, m_fast) need a mask, those in [m_fast, Tq) do not."""
    if CAUSAL:
        # Row i sees key j iff i >= j - (Tk - Tq): the first row to see key n0, and
        # the first to see the block's last key n0 + BLOCK_N - 1.
        m_start = tl.maximum(n0 - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        first_full = tl.maximum(n0 + BLOCK_N - 1 - (Tk - Tq), 0)
        m_fast = (first_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_start = 0
        m_fast = 0
    # The block holding the tail of Tk masks its padded keys against every query block.
    m_fast = tl.where(n0 + BLOCK_N > Tk, Tq, m_fast)
    return m_start, m_fast


# --------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V,  # K, V: this head's (Tk, D) rows
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, offs_n, offs_d, d_mask, lo, hi, Tq, Tk, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l, m) with the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols < Tk)[:, None] & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)                         # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE, DOT_FP32) * qk_scale          # (BLOCK_M, BLOCK_N), log2
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key keeps m = -inf; exponentiate against 0 instead,
        # so that exp2(-inf - -inf) = NaN never happens (its p and alpha are then 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)                                 # rescales the old sums
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)                         # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, DOT_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,    # (B, H, Tq, D)
    K,    # (B, Hkv, Tk, D)
    V,    # (B, Hkv, Tk, D)
    O,    # (B, H, Tq, D)   output
    LSE,  # (B, H, Tq)      output, fp32, natural log
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, GROUP,          # query heads; query heads per KV head
    Tq, Tk,
    qk_scale,          # scale * log2(e)
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += b * stride_lb + h * stride_lh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m < Tq)[:, None] & d_mask[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)                              # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_fast, n_end = _key_range(m0, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_n, offs_d, d_mask, 0, n_fast,
                                    Tq, Tk, qk_scale, False, CAUSAL, IEEE, DOT_FP32,
                                    BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_n, offs_d, d_mask, n_fast, n_end,
                                    Tq, Tk, qk_scale, True, CAUSAL, IEEE, DOT_FP32,
                                    BLOCK_N)

    # l >= 1 for every row that saw a key (its max contributes exp2(0)); rows that saw
    # none get O = 0 and L = -inf.
    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453                  # log2 -> natural log
    lse = tl.where(seen, lse, float("-inf"))
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=q_mask)
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
    """Δ_i = dO_i·O_i in fp32, the row term of the softmax VJP."""
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M)
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
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA,  # this head's rows
                         stride_qm, stride_qd, stride_dom, stride_dod,
                         stride_lm, stride_dem,
                         offs_n, offs_m, offs_d, d_mask, lo, hi, Tq, Tk, qk_scale,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                         DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add to (dk, dv) the contributions of the query blocks starting in [lo, hi).

    Works on transposed scores (keys × queries) so that dV = Pᵀ·dO and dK = dSᵀ·Q
    are plain dots. Query rows past Tq load q = dO = L = Δ = 0, which makes their
    dS and dO rows zero; they add nothing."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        q_mask = row_ok[:, None] & d_mask[None, :]
        q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)                          # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=q_mask, other=0.0)                         # (BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE + rows * stride_lm, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows * stride_dem, mask=row_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), IEEE, DOT_FP32) * qk_scale       # (BLOCK_N, BLOCK_M)
        log2_p_t = s_t - lse2[None, :]
        if MASKED:
            # Mask the exponent, not P: hidden entries of rows with L = -inf (they see
            # no key) would give exp2(+inf), and padded keys exp2(0 - L) may overflow.
            visible = offs_n[:, None] < Tk
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= rows[None, :] + (Tk - Tq))
            log2_p_t = tl.where(visible, log2_p_t, float("-inf"))
        p_t = tl.exp2(log2_p_t)
        dv += _dot(p_t.to(do.dtype), do, IEEE, DOT_FP32)
        dp_t = _dot(v, tl.trans(do), IEEE, DOT_FP32)                 # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE, DOT_FP32)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,      # (B, H, Tq, D)
    K,      # (B, Hkv, Tk, D)
    V,      # (B, Hkv, Tk, D)
    DO,     # (B, H, Tq, D)
    LSE,    # (B, H, Tq) fp32
    DELTA,  # (B, H, Tq) fp32
    DK,     # (B, Hkv, Tk, D) output
    DV,     # (B, Hkv, Tk, D) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hkv, GROUP,        # KV heads; query heads per KV head
    Tq, Tk,
    sm_scale, qk_scale,
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, pid_bh = _program_ids(Tk, BLOCK_N)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DK += b * stride_dkb + hk * stride_dkh
    DV += b * stride_dvb + hk * stride_dvh

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # Key rows past Tk load zeros, are masked out of P, and are never stored.
    kv_mask = (offs_n < Tk)[:, None] & d_mask[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)                             # (BLOCK_N, BLOCK_D)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)                             # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    m_start, m_fast = _query_range(n0, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    # The sum over the group's query heads happens here, in a fixed order: no atomics.
    for g in range(GROUP):
        h = hk * GROUP + g                                           # int64
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        LSEh = LSE + b * stride_lb + h * stride_lh
        DELTAh = DELTA + b * stride_deb + h * stride_deh
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh,
                                      stride_qm, stride_qd, stride_dom, stride_dod,
                                      stride_lm, stride_dem,
                                      offs_n, offs_m, offs_d, d_mask,
                                      m_start, tl.minimum(m_fast, Tq), Tq, Tk, qk_scale,
                                      True, CAUSAL, IEEE, DOT_FP32, BLOCK_M)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh,
                                      stride_qm, stride_qd, stride_dom, stride_dod,
                                      stride_lm, stride_dem,
                                      offs_n, offs_m, offs_d, d_mask,
                                      m_fast, Tq, Tq, Tk, qk_scale,
                                      False, CAUSAL, IEEE, DOT_FP32, BLOCK_M)

    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V,  # K, V: this head's (Tk, D) rows
                       stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_n, offs_d, d_mask, lo, hi, Tq, Tk, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                       DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add to dq the contributions of the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols < Tk)[:, None] & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)                         # (BLOCK_N, BLOCK_D)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)                         # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE, DOT_FP32) * qk_scale          # (BLOCK_M, BLOCK_N)
        log2_p = s - lse2[:, None]
        if MASKED:
            # Mask the exponent, not P: hidden entries of rows with L = -inf (they see
            # no key) would give exp2(+inf), and padded keys exp2(0 - L) may overflow.
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
            log2_p = tl.where(visible, log2_p, float("-inf"))
        p = tl.exp2(log2_p)
        dp = _dot(do, tl.trans(v), IEEE, DOT_FP32)                   # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE, DOT_FP32)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,      # (B, H, Tq, D)
    K,      # (B, Hkv, Tk, D)
    V,      # (B, Hkv, Tk, D)
    DO,     # (B, H, Tq, D)
    LSE,    # (B, H, Tq) fp32
    DELTA,  # (B, H, Tq) fp32
    DQ,     # (B, H, Tq, D) output
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP,          # query heads; query heads per KV head
    Tq, Tk,
    sm_scale, qk_scale,
    TQ_KEY, TK_KEY,    # next powers of two of Tq, Tk: autotune key only
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = _program_ids(Tq, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += b * stride_lb + h * stride_lh
    DELTA += b * stride_deb + h * stride_deh
    DQ += b * stride_dqb + h * stride_dqh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)                              # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)                             # (BLOCK_M, BLOCK_D)
    # Rows past Tq get L = Δ = 0 and dO = 0, so their dS is 0.
    lse2 = tl.load(LSE + offs_m * stride_lm, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m * stride_dem, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_fast, n_end = _key_range(m0, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V,
                            stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, offs_n, offs_d, d_mask, 0, n_fast, Tq, Tk, qk_scale,
                            False, CAUSAL, IEEE, DOT_FP32, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V,
                            stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, offs_n, offs_d, d_mask, n_fast, n_end, Tq, Tk,
                            qk_scale, True, CAUSAL, IEEE, DOT_FP32, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------- autotune

# Lengths enter the key as powers of two, so a decoding loop whose Tk grows by one
# does not retune at every step.
_AUTOTUNE_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL"]


def _configs(tiles):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, keyed by (operand bits,
# head-dim band); the band is BLOCK_D, the head dim rounded up to a power of two (64
# also serves D < 64). The first tile of each list is the one FASTATTN_AUTOTUNE=0
# launches: it fits the shared memory of sm_80 (166,912 B per block), sm_90 (232,448 B)
# and sm_86/89 (101,376 B), and in 16 bits it does not spill registers on sm_90.
# `fastattn check-kernels` compiles every tile (tests/test_check_kernels.py holds the
# first ones to this); the autotuner skips a tile that does not fit its device.
# - 16 bits: a warpgroup (4 warps) holding a 128 x 128 fp32 accumulator spills, so the
#   forward's 128-row tiles at D = 128 take 8 warps. sm_90 runs a dot as wgmma when each
#   warpgroup owns >= 64 of its rows: BLOCK_M in the forward and dQ, BLOCK_N in dK/dV.
#   dK/dV at D = 256 is the exception: its two (BLOCK_N, 256) fp32 accumulators plus the
#   K and V tiles spill with BLOCK_N = 64 however the warps split them (8 warps: 24 B
#   and more; 16 warps cap a thread at 128 registers), so its first tile has
#   BLOCK_N = 32 and runs mma.sync; the wgmma tiles after it may still win on an H100.
# - fp32: twice the bytes per tile and true-fp32 (ieee) dots, which run on FMA units,
#   not tensor cores, and hold their operands in registers: 16- and 32-row tiles,
#   2 stages.
_FWD_TILES = {
    (16, 64): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3),
               (64, 128, 4, 4)],
    (16, 128): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3),
                (128, 128, 8, 2)],
    (16, 256): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2),
                (128, 32, 8, 2)],
    (32, 64): [(32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 4, 2)],
    (32, 128): [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    (32, 256): [(16, 32, 4, 2), (32, 16, 4, 2)],
}
_DKDV_TILES = {
    (16, 64): [(32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2)],
    (16, 128): [(64, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2)],
    (16, 256): [(32, 32, 8, 2), (64, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2)],
    (32, 64): [(16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2)],
    (32, 128): [(16, 16, 4, 2), (16, 32, 8, 2), (32, 16, 4, 2)],
    (32, 256): [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
}
_DQ_TILES = {
    (16, 64): [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2)],
    (16, 128): [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2)],
    (16, 256): [(64, 16, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 1)],
    (32, 64): [(32, 32, 4, 2), (32, 64, 4, 2)],
    (32, 128): [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    (32, 256): [(16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
}

# One small fixed tile under the interpreter, so the tests run on CPU in seconds.
_INTERPRET_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
_DELTA_BLOCK_M = 16 if INTERPRET else 64


# FASTATTN_AUTOTUNE=0: the first config of each list only, nothing benchmarked (a test
# suite that compiles many shapes once each; the numbers come from tuned runs).
_AUTOTUNE = os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def _tile_key(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """Key of the tile tables: (operand bits, BLOCK_D but at least 64)."""
    return dtype.itemsize * 8, max(64, next_pow2(head_dim))


def _autotuned(kernel, tiles: dict):
    """Kernel to launch for (dtype, head dim): autotuned over its list in ``tiles`` (only
    the first tile under FASTATTN_AUTOTUNE=0); under the interpreter the plain kernel,
    which the launchers give ``_INTERPRET_TILES``."""
    if INTERPRET:
        return lambda dtype, head_dim: kernel
    tuned = {key: triton.autotune(configs=_configs(t if _AUTOTUNE else t[:1]),
                                  key=_AUTOTUNE_KEY)(kernel)
             for key, t in tiles.items()}
    return lambda dtype, head_dim: tuned[_tile_key(dtype, head_dim)]


_attn_fwd = _autotuned(_attn_fwd_kernel, _FWD_TILES)
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_TILES)
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, _DQ_TILES)
_TILES = _INTERPRET_TILES if INTERPRET else {}


# ------------------------------------------------------------------------ launchers


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  **others: torch.Tensor) -> None:
    """Safety net for what the kernels cannot serve (the ops layer validates first);
    ``others`` are further (B, H, T, D) operands whose strides are checked too."""
    d = q.shape[-1]
    if d % 8 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be a multiple of 8 in [{MIN_HEAD_DIM}, "
                         f"{MAX_HEAD_DIM}], got {d}")
    if q.dtype not in ALLOWED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {ALLOWED_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k.shape[1]})")
    for name, t in {"q": q, "k": k, "v": v, **others}.items():
        span = (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)
        if span >= 2 ** 31:
            raise ValueError(f"{name}: one head's rows span {span} elements; the "
                             f"kernels index inside a head with int32 (< 2**31)")


def _flat_grid(T: int, block: str, heads: int):
    """Grid of ``_program_ids``: cdiv(T, meta[block]) blocks for each of ``heads``
    (batch × heads) on axis 0."""
    return lambda meta: (triton.cdiv(T, meta[block]) * heads,)


def _flags(q: torch.Tensor, head_dim: int, causal: bool) -> dict:
    """Constexpr arguments shared by the attention kernels."""
    dot_fp32 = INTERPRET and q.dtype == torch.bfloat16
    return dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), DOT_FP32=dot_fp32,
                IEEE=q.dtype == torch.float32 or dot_fp32,
                BLOCK_D=next_pow2(head_dim), **_TILES)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), H % Hkv == 0; any strides; fp16, bf16 or
    fp32 (all alike). Returns o (B, H, Tq, D), contiguous, q.dtype, and lse
    (B, H, Tq), float32, the natural-log log-sum-exp of each row's scaled scores
    (-inf for rows that see no key).
    """
    _check_inputs(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = _empty((B, H, Tq, D), q.dtype, q.device)
    lse = _empty((B, H, Tq), torch.float32, q.device)
    launch(_attn_fwd(q.dtype, D))[_flat_grid(Tq, "BLOCK_M", B * H)](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
        H, H // Hkv, Tq, Tk, scale * LOG2E, next_pow2(Tq), next_pow2(Tk),
        **_flags(q, D, causal))
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward.

    do, o: (B, H, Tq, D), any strides; q, k, v as for ``attn_fwd``; lse as returned
    by ``attn_fwd``. Returns dq (B, H, Tq, D) and dk, dv (B, Hkv, Tk, D), contiguous,
    in the input dtype. Deterministic: dk/dv sum the query heads of each KV group
    inside one program, without atomics.
    """
    _check_inputs(q, k, v, do=do, o=o)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    delta = _empty((B, H, Tq), torch.float32, q.device)
    dq = _empty((B, H, Tq, D), q.dtype, q.device)
    dk = _empty((B, Hkv, Tk, D), q.dtype, q.device)
    dv = _empty((B, Hkv, Tk, D), q.dtype, q.device)
    flags = _flags(q, D, causal)

    launch(_attn_bwd_delta_kernel)[_flat_grid(Tq, "BLOCK_M", B * H)](
        o, do, delta, *o.stride(), *do.stride(), *delta.stride(), H, Tq,
        HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=flags["BLOCK_D"])

    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(),
               *delta.stride())
    lengths = (Tq, Tk, scale, scale * LOG2E, next_pow2(Tq), next_pow2(Tk))
    launch(_attn_bwd_dkdv(q.dtype, D))[_flat_grid(Tk, "BLOCK_N", B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
        Hkv, H // Hkv, *lengths, **flags)
    launch(_attn_bwd_dq(q.dtype, D))[_flat_grid(Tq, "BLOCK_M", B * H)](
        q, k, v, do, lse, delta, dq, *strides, *dq.stride(),
        H, H // Hkv, *lengths, **flags)
    return dq, dk, dv
