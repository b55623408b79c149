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
from fastattn import reference
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op

OP = "flash_attention"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
HEAD_DIMS = "a multiple of 8 from 16 to 256"     # the head dims the kernels take


def head_dim_supported(d: int) -> bool:
    """Whether the attention kernels take head dim ``d`` (``HEAD_DIMS``)."""
    return MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0


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
    if not head_dim_supported(d):
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


# ------------------------------------------------------------------ registry entry


def _shape(size: int, device: torch.device, batch: int | None = None, heads: int | None = None,
           head_dim: int | None = None) -> dict:
    gpu = device.type == "cuda"
    # On GPU keep B·T at 16k tokens, so every size does comparable work.
    return {"B": batch or (max(1, 16384 // size) if gpu else 1), "H": heads or (16 if gpu else 8),
            "T": size, "D": head_dim or (128 if gpu else 64)}


def _model_shape(batch: int, seq: int, d_model: int, n_head: int, n_kv_head: int,
                 mlp: int) -> dict:
    return {"B": batch, "H": n_head, "H_kv": n_kv_head, "T": seq, "D": d_model // n_head}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device).manual_seed(seed)
    b, h, t, d = shape["B"], shape["H"], shape["T"], shape["D"]
    hkv = shape.get("H_kv", h)
    q = registry.randn((b, h, t, d), dtype, device, g, grad=True)
    k, v = (registry.randn((b, hkv, t, d), dtype, device, g, grad=True) for _ in range(2))
    return (q, k, v), registry.randn((b, h, t, d), dtype, device, g)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def _launch_kernels(head_dim: int, dtype: torch.dtype, causal: bool) -> None:
    fa = _triton_kernels()
    q = torch.empty(1, 2, 1024, head_dim, dtype=dtype)             # (B, H, T, D)
    k, v, do = (torch.empty_like(q) for _ in range(3))
    o, lse = fa.attn_fwd(q, k, v, causal, head_dim ** -0.5)
    fa.attn_bwd(do, q, k, v, o, lse, causal, head_dim ** -0.5)


registry.register(registry.OpSpec(
    name=OP, family=OP, summary="exact attention on (B, H, T, D), never the T×T matrix",
    backends=BACKENDS, dtypes=DTYPES,
    custom_ops=("fastattn::flash_attention_fwd", "fastattn::flash_attention_bwd"),
    x="T", sizes={"cuda": (1024, 2048, 4096, 8192, 16384), "cpu": (1024, 2048, 4096)},
    shape=_shape, model_shape=_model_shape, inputs=_inputs,
    fast=lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
    naive=lambda q, k, v, causal: reference.naive_attention(q, k, v, causal),
    builtin=("sdpa", _sdpa),
    reference=lambda q, k, v, causal: reference.attention(q, k, v, causal)[0],
    work=lambda shape, dtype, mode, causal: registry.attention_flops(
        shape["B"], shape["H"], shape["T"], shape["T"], shape["D"], causal, mode),
    unit="flops", options={"causal": True}, launch_kernels=_launch_kernels, launch_dim="D",
    launch_sizes=(16, 64, 80, 128, 256)))
