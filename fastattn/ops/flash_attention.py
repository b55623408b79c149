"""``fastattn::flash_attention_fwd`` / ``_bwd``: the attention custom ops and their API.

``flash_attention(q, k, v, causal, scale)`` validates its inputs once, picks a backend
(``triton`` on CUDA, ``torch`` on CPU, or the one forced by ``use_backend``), and calls
the forward op, whose registered autograd formula calls the backward op. Both ops have
fake implementations, so they work under ``torch.compile`` and ``torch.library.opcheck``.
The backend name is an argument of the op, so a compiled graph records which one ran.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn import backends
from fastattn.ops import _attention_torch
from fastattn.ops._registry import kernel_op

OP = "flash_attention"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
HEAD_DIMS = "a multiple of 8 from 16 to 256"


def _triton_kernels():
    from fastattn.kernels import flash_attention  # imports triton: only when used
    return flash_attention


@kernel_op("fastattn::flash_attention_fwd")
def _fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
         backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return _triton_kernels().attn_fwd(q, k, v, causal, scale)
    return _attention_torch.attn_fwd(q, k, v, causal, scale)


@_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    b, h, tq, d = q.shape
    return q.new_empty(b, h, tq, d), q.new_empty(b, h, tq, dtype=torch.float32)


@kernel_op("fastattn::flash_attention_bwd")
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
         scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton_kernels().attn_bwd(do, q, k, v, o, lse, causal, scale)
    return _attention_torch.attn_bwd(do, q, k, v, o, lse, causal, scale)


@_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    o, lse = output
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, do, dlse):
    # The log-sum-exp is returned for inspection only: it carries no gradient
    # (``flash_attention`` hands it out detached).
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.backend)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def validate(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq_len, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype must be one of float16, bfloat16, float32, "
                            f"got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension "
                             "must be at least 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, "
                         f"v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch size must equal q batch size {q.shape[0]}, "
                         f"got {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head dim must equal q head dim {q.shape[3]}, got {k.shape[3]}")
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv != 0:
        raise ValueError(f"k/v heads must divide q heads {h} (grouped-query attention), "
                         f"got {hkv}")
    d = q.shape[3]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"head dim must be {HEAD_DIMS}, got {d}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale · q kᵀ) v`` without materialising the T×T matrix.

    Args:
        q: (B, H, Tq, D) queries; float16, bfloat16 or float32. Any strides.
        k, v: (B, Hkv, Tk, D) keys and values, same dtype and device; Hkv must divide H
            (grouped-query / multi-query attention).
        causal: mask keys in the future. With Tq != Tk the mask is aligned to the
            bottom-right, as in flash-attn: query i sees key j iff j <= i + Tk - Tq, so a
            query block appended to a KV cache attends to the whole cache. Rows that see
            no key (Tq > Tk) output 0.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp (B, H, Tq) in float32 (natural log,
            ``-inf`` for rows that see no key). It is detached: no gradient flows into it.

    D must be a multiple of 8 from 16 to 256. Returns (B, H, Tq, D) in q's dtype,
    contiguous.
    """
    validate(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backends.resolve(OP, q.device, BACKENDS)
    o, lse = _fwd(q, k, v, bool(causal), scale, backend)
    return (o, lse.detach()) if return_lse else o
