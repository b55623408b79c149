"""Rotary position embedding (RoPE) of q and k in one launch, forward and backward.

Position t turns each pair (x1, x2) of a head's first R dims (the rotary dims) by its
own angle θ_ti (i < R/2), and the other D − R dims pass through (partial rotary)::

    o1 = x1 · cos θ − x2 · sin θ
    o2 = x2 · cos θ + x1 · sin θ

The pairs are (i, i + R/2) in the GPT-NeoX layout (transformers' ``rotate_half``:
Llama, Mistral, Qwen) and (2i, 2i + 1) in the GPT-J layout (``interleaved``). The map is
a rotation, linear in x, so its Jacobian is the rotation matrix and the backward applies
its transpose, the rotation by −θ: the same kernel with sin θ negated (``INVERSE``). It
needs nothing from the forward but cos and sin.

Every program handles one head of q or k (the heads of q, then those of k, in one
grid) over BLOCK_T positions: it loads the (BLOCK_T, R/2) tiles of cos and sin, both
halves of the pairs, and writes both halves; out of place it also copies the
pass-through dims. In place (output pointers equal to the input ones) each element is
read and then written by the same program, so nothing races.

Limits: q (B, H, T, D), k (B, Hkv, T, D) with any strides (views of a fused projection
are read as they are); cos, sin (B or 1, T, R/2) with any strides, stride 0 over a
broadcast batch. R even, 2 ≤ R ≤ D ≤ 512. fp16, bf16, fp32 q and k (one dtype); cos and
sin in any float dtype. The rotation runs in fp32 and rounds once to q's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import ROW_TILE, launch, next_pow2

MAX_HEAD_DIM = 512


def _empty_like(x: Tensor) -> Tensor:
    """Output allocation (x's strides when x is dense); tests poison it by patching."""
    return torch.empty_like(x)


def _config(T: int, half: int, copied: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_HALF, BLOCK_PASS, num_warps) for ``half`` pairs and ``copied``
    pass-through dims a row: about ROW_TILE / 4 pairs and copied dims a program (four
    fp32 (BLOCK_T, BLOCK_HALF) tiles live at once: x1, x2, cos, sin; the copy adds one)."""
    block_half = next_pow2(half)
    block_pass = next_pow2(copied) if copied else 1
    width = next_pow2(block_half + (block_pass if copied else 0))
    block_t = max(1, min(ROW_TILE // 4 // width, next_pow2(max(T, 1))))
    return block_t, block_half, block_pass, 4 if block_t * block_half >= 1024 else 2


@triton.jit
def _rotate_head(
    X, O,  # one head of the input and output: (T, D) at these base pointers
    stride_xt, stride_xd, stride_ot, stride_od,
    t64, t_mask, i, i_mask, c, s, D,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    if INTERLEAVED:
        d1, d2 = 2 * i, 2 * i + 1
    else:
        d1, d2 = i, i + HALF
    mask = t_mask[:, None] & i_mask[None, :]
    xrow, orow = t64[:, None] * stride_xt, t64[:, None] * stride_ot
    x1 = tl.load(X + xrow + d1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xrow + d2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    tl.store(O + orow + d1[None, :] * stride_od, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(O + orow + d2[None, :] * stride_od, o2.to(O.dtype.element_ty), mask=mask)
    if COPY_PASS:  # dims 2·HALF..D, out of place only
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = t_mask[:, None] & (p < D)[None, :]
        v = tl.load(X + xrow + p[None, :] * stride_xd, mask=pmask, other=0.0)
        tl.store(O + orow + p[None, :] * stride_od, v, mask=pmask)


@triton.jit
def _rope_kernel(
    Q, K,    # (B, H, T, D), (B, HKV, T, D) inputs
    QO, KO,  # outputs, shaped as Q and K in Q's dtype (the inputs themselves in place)
    COS, SIN,  # (B or 1, T, HALF); stride 0 over a broadcast batch
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_qob, stride_qoh, stride_qot, stride_qod,
    stride_kob, stride_koh, stride_kot, stride_kod,
    stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
    T, H, HKV, D,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # One flat grid over (batch, head of q or k, block of positions), positions fastest.
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(T, BLOCK_T)
    bh = pid // t_blocks
    b = (bh // (H + HKV)).to(tl.int64)
    h = bh % (H + HKV)
    t = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    t64 = t.to(tl.int64)                   # t · stride can pass 2**31
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    mask = t_mask[:, None] & i_mask[None, :]
    c = tl.load(COS + b * stride_cb + t64[:, None] * stride_ct + i[None, :] * stride_cd,
                mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * stride_sb + t64[:, None] * stride_st + i[None, :] * stride_sd,
                mask=mask, other=0.0).to(tl.float32)
    if INVERSE:      # the backward: rotate by −θ
        s = -s
    if h < H:
        h64 = h.to(tl.int64)
        _rotate_head(Q + b * stride_qb + h64 * stride_qh, QO + b * stride_qob + h64 * stride_qoh,
                     stride_qt, stride_qd, stride_qot, stride_qod, t64, t_mask, i, i_mask,
                     c, s, D, HALF, INTERLEAVED, COPY_PASS, BLOCK_PASS)
    else:
        h64 = (h - H).to(tl.int64)
        _rotate_head(K + b * stride_kb + h64 * stride_kh, KO + b * stride_kob + h64 * stride_koh,
                     stride_kt, stride_kd, stride_kot, stride_kod, t64, t_mask, i, i_mask,
                     c, s, D, HALF, INTERLEAVED, COPY_PASS, BLOCK_PASS)


def rope(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
         inverse: bool = False, inplace: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) (or None) by the angles of cos, sin
    (B or 1, T, R/2): one launch for both. ``inverse`` rotates by −θ (the backward);
    ``inplace`` writes into q and k. Returns the rotated (q, k): new tensors with q's and
    k's strides when they are dense (``torch.empty_like``), or q and k themselves."""
    B, H, T, D = q.shape
    hkv = 0 if k is None else k.shape[1]
    half = cos.shape[-1]
    qo = q if inplace else _empty_like(q)
    ko = None if k is None else (k if inplace else _empty_like(k))
    if B == 0 or T == 0 or H + hkv == 0:
        return qo, ko
    copy_pass = not inplace and D > 2 * half
    block_t, block_half, block_pass, num_warps = _config(T, half, D - 2 * half if copy_pass else 0)
    # Without k, q stands in for its pointers and strides; no program reads them.
    k_, ko_ = (q, qo) if k is None else (k, ko)
    cb, sb = (cos.stride(0) if cos.shape[0] > 1 else 0), (sin.stride(0) if sin.shape[0] > 1 else 0)
    grid = (B * (H + hkv) * triton.cdiv(T, block_t),)
    launch(_rope_kernel)[grid](
        q, k_, qo, ko_, cos, sin, *q.stride(), *k_.stride(), *qo.stride(), *ko_.stride(),
        cb, cos.stride(1), cos.stride(2), sb, sin.stride(1), sin.stride(2),
        T, H, hkv, D,
        HALF=half, INTERLEAVED=interleaved, INVERSE=inverse, COPY_PASS=copy_pass,
        BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=num_warps)
    return qo, ko
