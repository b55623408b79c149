"""Cross-entropy over the rows of a logits chunk, and the gradient of its logits.

The fused linear cross-entropy (``fastattn/ops/linear_cross_entropy.py``) walks the
tokens in chunks of R rows: a torch matmul forms one chunk of logits ``z = x·Wᵀ + b``
(R, V), these kernels turn it into per-row losses and, in place, into ``∂loss/∂z``, and
two more matmuls give that chunk's ``dx`` and its share of ``dW``. The (tokens × V)
logits never exist at once. The matmuls stay in torch (cuBLAS on a GPU): they carry
nearly all the FLOPs (6·N·K·V for N tokens of width K) and a hand-written Triton GEMM
would at best match them; the part worth fusing is the softmax, loss and gradient,
which eager torch spreads over several passes and R·V temporaries.

Per row, with V classes, target t, label smoothing ε, z-loss coefficient λ and an
optional soft cap c (``l_j = c·tanh(z_j / c)``; ``l = z`` without one)::

    lse  = log Σ_j exp(l_j)                             (online: running max m, sum s)
    loss = (1 − ε)(lse − l_t) + ε(lse − Σ_j l_j / V) + λ·lse²
         = lse − (1 − ε)·l_t − (ε/V)·Σ_j l_j + λ·lse²
    ∂loss/∂l_j = p_j·(1 + 2λ·lse) − ε/V − (1 − ε)·[j = t],     p_j = exp(l_j − lse)
    ∂loss/∂z_j = ∂loss/∂l_j · (1 − tanh²(z_j / c))              (with a soft cap)

which is PyTorch's ``cross_entropy`` with ``label_smoothing`` plus the z-loss of PaLM
(λ·log²Z, added per token). A row whose target is ``ignore_index`` has loss 0 and
gradient 0; a row whose target is neither that nor in [0, V) gets NaN loss and NaN
gradient (checking the range on the host would cost a device sync per call).

``lce_fwd`` makes two passes over each row: the first for m, s and Σ l_j; the second,
when asked, writes ``∂loss/∂z`` over the logits (the gradient of the summed loss: the
caller scales it once the incoming gradient is known). ``lce_bwd`` skips the first pass,
reading the stored lse instead, and scales each row by its incoming gradient: the path
for ``reduction="none"``, where the gradient is recomputed in backward.

tanh is built from ``e = exp(−2|u|)`` (Triton 3.6 and 3.9 share no tanh intrinsic),
``1 − tanh² = 4e / (1 + e)²`` so that it keeps its digits where tanh ≈ ±1.

Limits: logits (R, V) with unit column stride, fp16, bf16 or fp32, computed in fp32 and
the gradient rounded once to the logits' dtype; targets (R,) int64 (any stride); any V
(the rows are walked in ``BLOCK_V`` tiles, the tail masked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import INTERPRET, launch, next_pow2
from ._utils import empty as _empty

# The interpreter's cost is per tile step, so it gets wider tiles; on a GPU 4096 fp32
# values over 8 warps are 16 registers per thread per live tile.
_MAX_BLOCK_V = 1024 if INTERPRET else 4096


def _config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V classes."""
    block_v = min(next_pow2(V), _MAX_BLOCK_V)
    return block_v, max(1, min(8, block_v // 512))


@triton.jit
def _cap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap·tanh(z / softcap) for fp32 z (z itself without a cap)."""
    if HAS_SOFTCAP:
        u = z / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0.0, -t, t) * softcap
    else:
        return z


@triton.jit
def _cap_grad(z, softcap):
    """d/dz of softcap·tanh(z / softcap) = 1 − tanh²(z / softcap)."""
    e = tl.exp(-2.0 * tl.abs(z / softcap))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _write_grad(row_ptr, t, lse, scale, V, smoothing, z_loss, softcap,
                HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with scale · ∂loss/∂z (scale: 0 for an ignored row,
    NaN for a bad target, else the row's incoming gradient)."""
    p_factor = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(_cap(z, softcap, HAS_SOFTCAP) - lse)
        d = p * p_factor - smoothing / V - tl.where(cols == t, 1.0 - smoothing, 0.0)
        if HAS_SOFTCAP:
            d = d * _cap_grad(z, softcap)
        tl.store(row_ptr + cols, (d * scale).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_scale(t, g, ignore_index, V):
    """The factor of a row's gradient: 0 if ignored, NaN for a target outside [0, V)."""
    valid = (t >= 0) & (t < V)
    return tl.where(t == ignore_index, 0.0, tl.where(valid, g, float("nan")))


@triton.jit
def _lce_fwd_kernel(
    LOGITS,  # (R, V) row stride stride_lr, unit column stride; the gradient if WRITE_GRAD
    TARGET,  # (R,) int64, stride stride_t
    LOSS,    # (R,) fp32
    LSE,     # (R,) fp32
    stride_lr, stride_t,
    V, ignore_index, smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)       # row · stride can pass 2**31
    row_ptr = LOGITS + row * stride_lr
    t = tl.load(TARGET + row * stride_t)
    # Pass 1: running max m and Σ exp(l − m) (rescaled when m grows), and Σ l.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    sum_l = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # Masked after the cap: a cap would turn a -inf filler into -softcap.
        l = tl.where(mask, _cap(z, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(l, 0))   # finite: every tile has a lane < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new), 0)
        sum_l += tl.sum(tl.where(mask, l, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = (t >= 0) & (t < V)
    z_t = tl.load(row_ptr + tl.where(valid, t, 0)).to(tl.float32)
    l_t = _cap(z_t, softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - smoothing) * l_t - smoothing / V * sum_l + z_loss * lse * lse
    scale = _row_scale(t, 1.0, ignore_index, V)
    tl.store(LOSS + row, tl.where(t == ignore_index, 0.0, loss * scale))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        _write_grad(row_ptr, t, lse, scale, V, smoothing, z_loss, softcap, HAS_SOFTCAP,
                    BLOCK_V)


@triton.jit
def _lce_bwd_kernel(
    LOGITS,  # (R, V) row stride stride_lr, unit column stride; overwritten by the gradient
    TARGET,  # (R,) int64, stride stride_t
    LSE,     # (R,) fp32, from the forward
    DLOSS,   # (R,) incoming gradient of each row's loss, stride stride_g
    stride_lr, stride_t, stride_g,
    V, ignore_index, smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGET + row * stride_t)
    g = tl.load(DLOSS + row * stride_g).to(tl.float32)
    lse = tl.load(LSE + row)
    _write_grad(LOGITS + row * stride_lr, t, lse, _row_scale(t, g, ignore_index, V), V,
                smoothing, z_loss, softcap, HAS_SOFTCAP, BLOCK_V)


def lce_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
            z_loss: float, softcap: float, write_grad: bool) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp of ``logits`` (R, V) (unit column stride) against
    ``target`` (R,) int64; both (R,) fp32. With ``write_grad`` the logits are overwritten,
    in their dtype, by the gradient of the summed loss w.r.t. them."""
    R, V = logits.shape
    loss = _empty((R,), torch.float32, logits.device)
    lse = _empty((R,), torch.float32, logits.device)
    if R > 0:
        block_v, num_warps = _config(V)
        launch(_lce_fwd_kernel)[(R,)](
            logits, target, loss, lse, logits.stride(0), target.stride(0),
            V, ignore_index, label_smoothing, z_loss, softcap,
            HAS_SOFTCAP=softcap > 0, WRITE_GRAD=write_grad, BLOCK_V=block_v,
            num_warps=num_warps)
    return loss, lse


def lce_bwd(logits: Tensor, target: Tensor, lse: Tensor, dloss: Tensor, ignore_index: int,
            label_smoothing: float, z_loss: float, softcap: float) -> None:
    """Overwrite ``logits`` (R, V) with ``dloss[r]`` · ∂loss_r/∂logits[r], from the
    forward's ``lse`` (R,) fp32; target (R,) int64, dloss (R,) any float dtype."""
    R, V = logits.shape
    if R > 0:
        block_v, num_warps = _config(V)
        launch(_lce_bwd_kernel)[(R,)](
            logits, target, lse, dloss, logits.stride(0), target.stride(0), dloss.stride(0),
            V, ignore_index, label_smoothing, z_loss, softcap,
            HAS_SOFTCAP=softcap > 0, BLOCK_V=block_v, num_warps=num_warps)
