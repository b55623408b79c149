"""``fastattn::flash_attention_fwd`` / ``_bwd``: the attention custom ops and their API.

``flash_attention(q, k, v, causal, scale, ...)`` (dense (B, H, T, D) batches) and
``flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)`` (packed
(total, H, D) sequences of different lengths) validate their inputs once, pick a backend
(``triton`` on CUDA, ``torch`` on CPU, or the one forced by ``use_backend``), and call
the forward op, whose registered autograd formula calls the backward op. One pair of
ops serves every variant: sliding windows, logit softcap, ALiBi, dropout, variable
lengths. Both ops have fake implementations, so they work under ``torch.compile`` and
``torch.library.opcheck``. The backend name is an argument of the op, so a compiled
graph records which one ran.

Dropout draws a 64-bit Philox seed and a 32-bit offset from torch's default generator
(``torch.manual_seed`` makes it reproducible); the backward replays the same mask from
them, so it is never stored.
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
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
HEAD_DIMS = "any size from 1 to 256"     # the head dims the kernels take


def head_dim_supported(d: int) -> bool:
    """Whether the attention kernels take head dim ``d`` (``HEAD_DIMS``)."""
    return MIN_HEAD_DIM <= d <= MAX_HEAD_DIM


def _triton_kernels():
    from fastattn.kernels import flash_attention  # imports triton: only when used
    return flash_attention


def _backend(name: str):
    return _triton_kernels() if name == "triton" else _attention_torch


@kernel_op("fastattn::flash_attention_fwd")
def _fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None,
         cu_seqlens_k: Tensor | None, alibi: Tensor | None, max_seqlen_q: int,
         max_seqlen_k: int, causal: bool, window_left: int, window_right: int,
         softcap: float, dropout_p: float, seed: int, offset: int, scale: float,
         backend: str, deterministic: bool) -> tuple[Tensor, Tensor]:
    # deterministic only chooses the backward's algorithm; it travels with the
    # forward's arguments to the autograd formula.
    return _backend(backend).attn_fwd(
        q, k, v, causal, scale, window=(window_left, window_right), softcap=softcap,
        alibi=alibi, dropout_p=dropout_p, seed=seed, offset=offset,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k)


@_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, max_seqlen_q, max_seqlen_k, causal,
      window_left, window_right, softcap, dropout_p, seed, offset, scale, backend,
      deterministic):
    if cu_seqlens_q is not None:                                  # (total, H, D)
        total, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty(h, total, dtype=torch.float32)
    b, h, tq, d = q.shape
    return q.new_empty(b, h, tq, d), q.new_empty(b, h, tq, dtype=torch.float32)


@kernel_op("fastattn::flash_attention_bwd")
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
         cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, alibi: Tensor | None,
         max_seqlen_q: int, max_seqlen_k: int, causal: bool, window_left: int,
         window_right: int, softcap: float, dropout_p: float, seed: int, offset: int,
         scale: float, backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backend(backend).attn_bwd(
        do, q, k, v, o, lse, causal, scale, window=(window_left, window_right),
        softcap=softcap, alibi=alibi, dropout_p=dropout_p, seed=seed, offset=offset,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, deterministic=deterministic)


@_bwd.register_fake
def _(do, q, k, v, o, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, alibi = inputs[:6]
    o, lse = output
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, alibi)
    ctx.params = inputs[6:]                  # max lengths, mask, softcap, dropout, scale


def _backward(ctx, do, dlse):
    # The log-sum-exp is returned for inspection only: it carries no gradient
    # (the API hands it out detached).
    q, k, v, o, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, cu_q, cu_k, alibi, *ctx.params)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            *(None,) * 15)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------- validation


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dims: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions {layout}, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype must be one of float16, bfloat16, float32, "
                            f"got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, "
                         f"v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim must equal q head dim {q.shape[-1]}, got {k.shape[-1]}")
    h, hkv = q.shape[1], k.shape[1]            # (B, H, T, D) and (total, H, D) alike
    if h % hkv != 0:
        raise ValueError(f"k/v heads must divide q heads {h} (grouped-query attention), "
                         f"got {hkv}")
    if not head_dim_supported(q.shape[-1]):
        raise ValueError(f"head dim must be {HEAD_DIMS}, got {q.shape[-1]}")


def _check_variants(q: Tensor, heads: int, batch: int, scale, window, softcap, alibi,
                    dropout_p, deterministic) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window)):
        raise ValueError(f"window must be a pair (left, right) of ints >= -1 (-1: unbounded "
                         f"on that side), got {window!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: no softcap), "
                         f"got {softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if alibi is not None:
        if not isinstance(alibi, Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, "
                            f"got {type(alibi).__name__}")
        if tuple(alibi.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes shape must be ({heads},) or ({batch}, {heads}) "
                             f"(nheads,) or (batch, nheads), got {tuple(alibi.shape)}")
        if alibi.dtype != torch.float32:
            raise TypeError(f"alibi_slopes dtype must be float32, got {alibi.dtype}")
        if alibi.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device {q.device}, "
                             f"got {alibi.device}")


def _everyday(q, k, v) -> bool:
    """Whether (q, k, v) is a well-formed plain call, in a few operations: the common
    case skips ``validate``, whose checks (and messages) serve everything else."""
    qs, ks = getattr(q, "shape", ()), getattr(k, "shape", ())
    return (len(qs) == 4 and len(ks) == 4 and ks == getattr(v, "shape", ())
            and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device and qs[0] == ks[0] and qs[3] == ks[3]
            and 0 < qs[3] <= MAX_HEAD_DIM and 0 < ks[1] and qs[1] % ks[1] == 0
            and qs[0] > 0 and qs[2] > 0 and ks[2] > 0
            and isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor))


def validate(q: Tensor, k: Tensor, v: Tensor, scale: float | None,
             window=(-1, -1), softcap: float = 0.0, alibi: Tensor | None = None,
             dropout_p: float = 0.0, deterministic: bool = True) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    _check_qkv(q, k, v, 4, "(batch, heads, seq_len, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension "
                             "must be at least 1")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch size must equal q batch size {q.shape[0]}, "
                         f"got {k.shape[0]}")
    _check_variants(q, q.shape[1], q.shape[0], scale, window, softcap, alibi, dropout_p,
                    deterministic)


def _check_cu_seqlens(name: str, cu: Tensor, q: Tensor, total: int) -> None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or len(cu) < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 cumulative lengths, "
                         f"got {cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} "
                         f"of shape {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu.device.type == "cpu":     # on a GPU reading it back would stall the stream
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total or any(
                b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0, never decrease and end at the "
                             f"{total} rows it indexes, got {values}")


def validate_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    scale: float | None, window=(-1, -1), softcap: float = 0.0,
                    alibi: Tensor | None = None, dropout_p: float = 0.0,
                    deterministic: bool = True) -> None:
    """``validate`` for packed (total, H, D) sequences with cumulative lengths."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q, q.shape[0])
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q, k.shape[0])
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe one batch, got "
                         f"{len(cu_seqlens_q) - 1} and {len(cu_seqlens_k) - 1} sequences")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0 (the longest sequence), got {n!r}")
    if cu_seqlens_q.device.type == "cpu":
        for name, cu, n in (("max_seqlen_q", cu_seqlens_q, max_seqlen_q),
                            ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
            longest = int((cu[1:] - cu[:-1]).max())
            if longest > n:
                raise ValueError(f"{name}={n} is below the longest sequence, {longest}")
    _check_variants(q, q.shape[1], len(cu_seqlens_q) - 1, scale, window, softcap, alibi,
                    dropout_p, deterministic)


# ----------------------------------------------------------------------------- API


@torch.compiler.disable
def draw_rng() -> tuple[int, int]:
    """(seed, offset) for one dropout call from torch's default generator. Outside any
    compiled graph, so a compiled model draws a fresh mask at every call."""
    seed, offset = torch.randint(0, 2 ** 62, (2,)).tolist()
    return seed, offset % 2 ** 32


def _window(causal: bool, window) -> tuple[int, int]:
    """flash-attn's rule: a causal mask is the window (left, 0)."""
    left, right = window
    return (left, 0) if causal else (left, right)


def _alibi(alibi: Tensor | None, batch: int) -> Tensor | None:
    """ALiBi slopes as (B, H) (a stride-0 view of (H,) slopes)."""
    return alibi if alibi is None or alibi.dim() == 2 else alibi.expand(batch, -1)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False, *,
                    window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi: Tensor | None = None, dropout_p: float = 0.0,
                    rng: tuple[int, int] | None = None, deterministic: bool = True
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale · q kᵀ) v`` without materialising the T×T matrix.

    Args:
        q: (B, H, Tq, D) queries; float16, bfloat16 or float32. Any strides.
        k, v: (B, Hkv, Tk, D) keys and values, same dtype and device; Hkv must divide H
            (grouped-query / multi-query attention).
        causal: mask keys in the future. With Tq != Tk the mask is aligned to the
            bottom-right, as in flash-attn: query i sees key j iff j <= i + Tk - Tq, so a
            query block appended to a KV cache attends to the whole cache. Rows that see
            no key output 0.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp (B, H, Tq) in float32 (natural log,
            ``-inf`` for rows that see no key). It is detached: no gradient flows into it.
        window: sliding window ``(left, right)``: query i sees keys
            ``i + Tk - Tq - left .. i + Tk - Tq + right``; ``-1`` leaves a side unbounded.
            ``causal`` sets ``right = 0``. Key blocks outside the window are skipped, so
            the cost grows with T·window.
        softcap: if > 0, scores become ``softcap · tanh(score / softcap)`` (Gemma 2).
        alibi: ALiBi slopes, float32 (H,) or (B, H): ``-slope · |i + Tk - Tq - j|`` is
            added to each score (after the softcap).
        dropout_p: attention dropout probability (applied to the probabilities, scaled by
            ``1 / (1 - dropout_p)``; pass 0 in evaluation). The mask comes from Philox on
            ``rng = (seed, offset)``, drawn from torch's default generator when None.
        deterministic: True (default): the backward writes every gradient element from
            one program, so gradients are bitwise reproducible. False: on the Triton
            kernels, a one-pass backward (5 matmuls per tile instead of 7) that adds dQ
            with atomics, so dq may differ in its last bits between runs (flash-attn's
            meaning of the flag). The torch backend is deterministic either way.

    D may be any size from 1 to 256. Returns (B, H, Tq, D) in q's dtype, contiguous.
    """
    if not (scale is None and alibi is None and window == (-1, -1) and not softcap
            and not dropout_p and deterministic is True and _everyday(q, k, v)):
        validate(q, k, v, scale, window, softcap, alibi, dropout_p, deterministic)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backends.resolve(OP, q.device, BACKENDS)
    seed, offset = (rng or draw_rng()) if dropout_p > 0 else (0, 0)
    left, right = _window(causal, window)
    o, lse = _fwd(q, k, v, None, None, _alibi(alibi, q.shape[0]), 0, 0, bool(causal), left,
                  right, float(softcap), float(dropout_p), seed, offset, scale, backend,
                  deterministic)
    return (o, lse.detach()) if return_lse else o


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, scale: float | None = None,
                           return_lse: bool = False, *, window: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi: Tensor | None = None,
                           dropout_p: float = 0.0, rng: tuple[int, int] | None = None,
                           deterministic: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """``flash_attention`` over a packed batch of sequences of different lengths.

    q: (total_q, H, D); k, v: (total_k, Hkv, D); any strides. Sequence b owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``
    of k and v (int32, batch + 1 entries; empty sequences allowed). ``max_seqlen_q`` /
    ``max_seqlen_k`` bound the lengths (they size the launch grid; nothing is read back
    from the GPU). Every option means what it means for ``flash_attention``, per
    sequence (the causal mask and window are aligned to each sequence's bottom-right).

    Returns (total_q, H, D) contiguous, and with ``return_lse`` the log-sum-exp
    (H, total_q) in float32, flash-attn's varlen layout.
    """
    validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    window, softcap, alibi, dropout_p, deterministic)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backends.resolve(OP, q.device, BACKENDS)
    seed, offset = (rng or draw_rng()) if dropout_p > 0 else (0, 0)
    left, right = _window(causal, window)
    o, lse = _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                  _alibi(alibi, len(cu_seqlens_q) - 1), max_seqlen_q, max_seqlen_k,
                  bool(causal), left, right, float(softcap), float(dropout_p), seed, offset,
                  scale, backend, deterministic)
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
    fa.attn_bwd(do, q, k, v, o, lse, causal, head_dim ** -0.5, deterministic=False)
    # every variant at once, on packed sequences: the kernels' other constexpr paths
    q, k, v, do = (x[0].transpose(0, 1) for x in (q, k, v, do))       # (total, H, D)
    cu = torch.tensor([0, 1024], dtype=torch.int32)
    variants = dict(window=(256, 0), softcap=30.0, alibi=torch.ones(1, 2), dropout_p=0.1,
                    seed=1, offset=0, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1024,
                    max_seqlen_k=1024)
    o, lse = fa.attn_fwd(q, k, v, causal, head_dim ** -0.5, **variants)
    fa.attn_bwd(do, q, k, v, o, lse, causal, head_dim ** -0.5, **variants)


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
