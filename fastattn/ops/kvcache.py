"""``flash_attn_with_kvcache``: attention against a KV cache (decoding), flash-attn's API.

The call appends the new keys and values (after rotary, if given) to the cache in place,
with plain torch indexing, then runs ``fastattn::kvcache_fwd``: split-K flash decoding
(kernels/flash_decode.py) on the ``triton`` backend, or a torch implementation that
gathers each sequence's visible keys (the default on CPU). Both read contiguous and
paged caches. The op is inference-only, as in flash-attn: it has no backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops import _attention_torch, registry
from fastattn.ops._custom_op import kernel_op
from fastattn.ops.flash_attention import _model_shape

OP = "kvcache"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLITS = 128


def _triton_kernels():
    from fastattn.kernels import flash_decode  # imports triton: only when used
    return flash_decode


@kernel_op("fastattn::kvcache_fwd")
def _fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_end: Tensor,
         key_start: Optional[Tensor], block_table: Optional[Tensor],
         cache_row: Optional[Tensor], alibi: Optional[Tensor], scale: float,
         window_left: int, window_right: int, softcap: float, num_splits: int,
         backend: str) -> tuple[Tensor, Tensor]:
    window = (window_left, window_right)
    if backend == "triton":
        return _triton_kernels().decode_fwd(q, k_cache, v_cache, key_end, key_start,
                                            block_table, cache_row, alibi, scale, window,
                                            softcap, num_splits)
    return _decode_torch(q, k_cache, v_cache, key_end, key_start, block_table, cache_row,
                         alibi, scale, window, softcap)


@_fwd.register_fake
def _(q, k_cache, v_cache, key_end, key_start, block_table, cache_row, alibi, scale,
      window_left, window_right, softcap, num_splits, backend):
    b, tq, h, d = q.shape
    return q.new_empty(b, tq, h, d), q.new_empty(b, h, tq, dtype=torch.float32)


# --------------------------------------------------------------------- torch backend


def _sequence_kv(cache: Tensor, b: int, start: int, end: int, block_table: Tensor | None,
                 cache_row: Tensor | None) -> Tensor:
    """Cache positions [start, end) of sequence b: (end − start, Hkv, D), a view of a
    contiguous cache, a copy of only the pages it touches of a paged one."""
    if block_table is None:
        return cache[b if cache_row is None else int(cache_row[b]), start:end]
    page = cache.shape[1]
    pages = block_table[b, start // page:-(-end // page)].long()
    first = start // page * page
    return cache[pages].flatten(0, 1)[start - first:end - first]


def _decode_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_end: Tensor,
                  key_start: Tensor | None, block_table: Tensor | None,
                  cache_row: Tensor | None, alibi: Tensor | None, scale: float,
                  window: tuple[int, int], softcap: float) -> tuple[Tensor, Tensor]:
    """The torch backend: flash attention's torch backend per sequence, on the keys it
    attends (never B × the longest length; a paged cache copies only those pages)."""
    b_size, tq, h, d = q.shape
    ends = key_end.tolist()
    starts = key_start.tolist() if key_start is not None else [0] * b_size
    o = q.new_zeros(b_size, tq, h, d)
    lse = q.new_full((b_size, h, tq), float("-inf"), dtype=torch.float32)
    for b, (start, end) in enumerate(zip(starts, ends)):
        if end <= start:
            continue                     # no key: output 0, lse -inf
        k = _sequence_kv(k_cache, b, start, end, block_table, cache_row)
        v = _sequence_kv(v_cache, b, start, end, block_table, cache_row)
        o_b, lse_b = _attention_torch.attn_fwd(
            q[b:b + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
            False, scale, window=window, softcap=softcap,
            alibi=None if alibi is None else alibi[b:b + 1])
        o[b], lse[b] = o_b[0].transpose(0, 1), lse_b[0]
    return o, lse


# ------------------------------------------------------------------ rotary and append


def _rotary(x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first 2·cos.shape[1] dims of x (B, T, heads, D) by the angles of
    positions pos (B, T): pairs (2i, 2i+1) if interleaved, else (i, i + r/2)."""
    r = 2 * cos.shape[1]
    c = cos[pos].float()[:, :, None]                                 # (B, T, 1, r/2)
    s = sin[pos].float()[:, :, None]
    xr = x[..., :r].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y.to(x.dtype), x[..., r:]), dim=-1)


def _append(cache: Tensor, new: Tensor, pos: Tensor, block_table: Tensor | None,
            cache_row: Tensor | None) -> None:
    """cache[row of b, pos[b, t]] = new[b, t], in place; pos (B, Tnew) int64."""
    if block_table is not None:
        page = cache.shape[1]
        rows, pos = block_table.long().gather(1, pos // page), pos % page
    else:
        rows = (torch.arange(new.shape[0], device=new.device) if cache_row is None
                else cache_row.long())[:, None].expand_as(pos)
    cache[rows, pos] = new


# ------------------------------------------------------------------------ validation


def _int32_vector(name: str, t: object, b: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or tuple(t.shape) != (b,):
        raise ValueError(f"{name} must be an int32 tensor of shape ({b},) (batch), got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _check_tensor(name: str, t: object, shape: tuple, what: str, q: Tensor) -> None:
    """A 4-D q/cache/new-key tensor; ``shape`` entries of None are free."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {what} = ({want}), got {tuple(t.shape)}")
    if t.dtype != q.dtype or t.device != q.device:
        raise ValueError(f"{name} must have q's dtype {q.dtype} and device {q.device}, got "
                         f"{t.dtype} on {t.device}")


def validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
             cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
             window_size, softcap, alibi_slopes, num_splits) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed.
    Values inside index tensors (lengths, pages, rows) are checked when they are on the
    CPU; on a GPU that would cost a sync per call, and they are trusted, as in flash-attn."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch, seqlen, heads, head_dim), got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q dtype must be one of float16, bfloat16, float32, got {q.dtype}")
    b, tq, h, d = q.shape
    if q.numel() == 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"q shape must have batch, seqlen, heads >= 1 and head_dim in "
                         f"1..{MAX_HEAD_DIM}, got {tuple(q.shape)}")
    paged = block_table is not None
    cache_what = "(num_blocks, page_block_size, nheads_k, head_dim)" if paged else \
        "(batch_size_cache, seqlen_cache, nheads_k, head_dim)"
    _check_tensor("k_cache", k_cache, (None, None, None, d), cache_what, q)
    _check_tensor("v_cache", v_cache, tuple(k_cache.shape), cache_what, q)
    hkv = k_cache.shape[2]
    if k_cache.numel() == 0 or h % hkv:
        raise ValueError(f"k_cache heads ({hkv}) must divide q heads ({h}) and every cache "
                         f"dim be >= 1, got k_cache shape {tuple(k_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values), got only "
                         f"{'k' if v is None else 'v'}")
    if k is not None:
        _check_tensor("k", k, (b, None, hkv, d), "(batch, seqlen_new, nheads_k, head_dim)", q)
        _check_tensor("v", v, tuple(k.shape), "(batch, seqlen_new, nheads_k, head_dim)", q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k and v (they rotate q and "
                             "the new keys), got k=None")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if (not isinstance(t, Tensor) or t.dim() != 2 or t.shape != rotary_cos.shape
                    or not 1 <= 2 * t.shape[1] <= d or t.dtype not in DTYPES):
                raise ValueError(f"{name} must be a float tensor (seqlen_ro, rotary_dim / 2) "
                                 f"with rotary_dim <= head_dim {d}, the shape of rotary_cos, "
                                 f"got {getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if paged:
        _check_paged(block_table, cache_batch_idx, b, q.device)
    elif k_cache.shape[0] != b and cache_batch_idx is None:
        raise ValueError(f"k_cache batch ({k_cache.shape[0]}) must equal q batch ({b}) "
                         "unless cache_batch_idx maps batch rows to cache rows")
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _int32_vector(name, t, b, q.device)
    if isinstance(cache_seqlens, Tensor):
        _int32_vector("cache_seqlens", cache_seqlens, b, q.device)
    elif cache_seqlens is not None and (isinstance(cache_seqlens, bool)
                                        or not isinstance(cache_seqlens, int)):
        raise TypeError(f"cache_seqlens must be None, an int or an int32 tensor (batch,), "
                        f"got {type(cache_seqlens).__name__}")
    _check_options(softmax_scale, window_size, softcap, alibi_slopes, num_splits, b, h, q)
    _check_values(q, k_cache, k, rotary_cos, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, causal or tuple(window_size) != (-1, -1))


def _check_paged(block_table, cache_batch_idx, b: int, device: torch.device) -> None:
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 \
            or block_table.dim() != 2 or block_table.shape[0] != b or block_table.shape[1] < 1:
        raise ValueError(f"block_table must be an int32 tensor (batch={b}, "
                         f"max_num_blocks_per_seq), got {getattr(block_table, 'dtype', '')} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
    if cache_batch_idx is not None:
        raise ValueError("cache_batch_idx cannot be used with block_table (the block table "
                         "already maps each sequence to its pages)")


def _check_options(scale, window, softcap, alibi, num_splits, b, h, q) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {scale!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
        raise ValueError(f"window_size must be (left, right) ints >= -1 (-1: unbounded), "
                         f"got {window!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if alibi is not None and (not isinstance(alibi, Tensor) or alibi.dtype != torch.float32
                              or tuple(alibi.shape) not in ((h,), (b, h))
                              or alibi.device != q.device):
        raise ValueError(f"alibi_slopes must be a float32 tensor of shape ({h},) or ({b}, {h}) "
                         f"on {q.device}, got {getattr(alibi, 'dtype', type(alibi).__name__)} "
                         f"{tuple(getattr(alibi, 'shape', ()))}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) \
            or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 0..{MAX_SPLITS} (0: chosen from the "
                         f"shapes, 1: no split), got {num_splits!r}")


def _check_values(q, k_cache, k, rotary_cos, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, local: bool) -> None:
    """Lengths, pages and rows against the cache; tensors only when they are on the CPU."""
    def host(t):
        return t if isinstance(t, Tensor) and t.device.type == "cpu" else None

    b = q.shape[0]
    capacity = _capacity(k_cache, block_table)
    seqlens = (torch.full((b,), capacity if cache_seqlens is None else cache_seqlens,
                          dtype=torch.int64) if not isinstance(cache_seqlens, Tensor)
               else host(cache_seqlens))
    if seqlens is None:
        return
    seqlens = seqlens.long()
    t_new = 0 if k is None else k.shape[1]
    if bool((seqlens < 0).any()) or bool((seqlens + t_new > capacity).any()):
        raise ValueError(f"cache_seqlens + seqlen_new ({t_new}) must lie in 0..{capacity} "
                         f"(the cache's length), got cache_seqlens {seqlens.tolist()}")
    leftpad = host(cache_leftpad)
    if leftpad is not None and bool(((leftpad < 0) | (leftpad > seqlens)).any()):
        raise ValueError(f"cache_leftpad must lie in 0..cache_seqlens, got {leftpad.tolist()} "
                         f"with cache_seqlens {seqlens.tolist()}")
    rows = host(cache_batch_idx)
    if rows is not None and bool(((rows < 0) | (rows >= k_cache.shape[0])).any()):
        raise ValueError(f"cache_batch_idx must lie in 0..{k_cache.shape[0] - 1} (k_cache "
                         f"batch), got {rows.tolist()}")
    table = host(block_table)
    if table is not None:
        used = torch.arange(table.shape[1]) < -(-(seqlens + t_new) // k_cache.shape[1])[:, None]
        if bool((used & ((table < 0) | (table >= k_cache.shape[0]))).any()):
            raise ValueError(f"block_table entries in use must lie in 0..{k_cache.shape[0] - 1} "
                             f"(k_cache num_blocks), got {table.tolist()}")
    if rotary_cos is not None:
        need = int((seqlens + max(t_new, q.shape[1] if local else 1)).max())
        if rotary_cos.shape[0] < need:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; "
                             f"this call rotates positions up to {need - 1}")


def _capacity(k_cache: Tensor, block_table: Tensor | None) -> int:
    """Positions one sequence's cache holds."""
    return k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])


# ---------------------------------------------------------------------- public function


def flash_attn_with_kvcache(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
        v: Tensor | None = None, rotary_cos: Tensor | None = None,
        rotary_sin: Tensor | None = None, cache_seqlens: int | Tensor | None = None,
        cache_batch_idx: Tensor | None = None, cache_leftpad: Tensor | None = None,
        block_table: Tensor | None = None, softmax_scale: float | None = None,
        causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
        rotary_interleaved: bool = True, alibi_slopes: Tensor | None = None,
        num_splits: int = 0, return_softmax_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """flash-attn's ``flash_attn_with_kvcache``: attention of q against a KV cache, after
    appending the new keys and values to it in place. Inference only: there is no
    backward (as in flash-attn), and a call that would need one raises.

    Args:
        q: (B, Tq, H, D) queries; float16, bfloat16 or float32; D in 1..256.
        k_cache, v_cache: (B_cache, T_cache, Hkv, D), or with ``block_table`` pages
            (num_blocks, page_block_size, Hkv, D) of any page size; Hkv divides H.
        k, v: optional (B, Tnew, Hkv, D) new keys and values, written into the cache at
            positions ``cache_seqlens .. cache_seqlens + Tnew - 1`` before attending.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2): rotate the first
            rotary_dim dims of the new keys at their positions, and of q at positions
            ``cache_seqlens + i`` (causal or windowed) or ``cache_seqlens`` (otherwise).
            Pairs dims (2i, 2i+1) if ``rotary_interleaved``, else (i, i + rotary_dim/2).
        cache_seqlens: int or (B,) int32, the cache positions filled before this call
            (default: the whole cache).
        cache_batch_idx: (B,) int32 cache row of each batch row (contiguous cache only).
        cache_leftpad: (B,) int32 first cache position of each sequence; earlier
            positions are not attended.
        block_table: (B, max_num_blocks_per_seq) int32; position p of sequence b is row
            ``p % page_block_size`` of page ``block_table[b, p // page_block_size]``.
        softmax_scale, causal, window_size, softcap, alibi_slopes ((H,) or (B, H)
            float32): as in ``flash_attn_func``. Sequence b's keys are the positions
            ``[cache_leftpad, cache_seqlens + Tnew)``, and masks align to their end.
        num_splits: key splits of the Triton kernel; 0 chooses, 1 is a single pass.
        return_softmax_lse: also return the (B, H, Tq) float32 log-sum-exp.

    Returns out (B, Tq, H, D) in q's dtype, and lse if asked for.
    """
    validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
             cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_size,
             softcap, alibi_slopes, num_splits)
    tensors = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, alibi_slopes)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError("flash_attn_with_kvcache is inference-only (no backward, as in "
                           "flash-attn), but an input requires grad: call it under "
                           "torch.no_grad() or torch.inference_mode()")
    b, tq, h, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = window_size
    if causal:
        right = 0                      # flash-attn's rule: causal is the window (left, 0)
    if not isinstance(cache_seqlens, Tensor):
        fill = _capacity(k_cache, block_table) if cache_seqlens is None else cache_seqlens
        cache_seqlens = torch.full((b,), fill, dtype=torch.int32, device=q.device)
    t_new = 0
    if k is not None:
        t_new = k.shape[1]
        start = cache_seqlens.long()[:, None]
        pos_k = start + torch.arange(t_new, device=q.device)
        if rotary_cos is not None:
            local = causal or tuple(window_size) != (-1, -1)
            pos_q = start + torch.arange(tq, device=q.device) if local else start.expand(b, tq)
            q = _rotary(q, rotary_cos, rotary_sin, pos_q, rotary_interleaved)
            k = _rotary(k, rotary_cos, rotary_sin, pos_k, rotary_interleaved)
        _append(k_cache, k, pos_k, block_table, cache_batch_idx)
        _append(v_cache, v, pos_k, block_table, cache_batch_idx)
    key_end = cache_seqlens + t_new if t_new else cache_seqlens
    alibi = alibi_slopes.expand(b, h) if alibi_slopes is not None else None
    backend = backends.resolve(OP, q.device, BACKENDS)
    out, lse = _fwd(q, k_cache, v_cache, key_end, cache_leftpad, block_table,
                    cache_batch_idx, alibi, scale, left, right, float(softcap), num_splits,
                    backend)
    return (out, lse) if return_softmax_lse else out


def attend_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_end: Tensor,
                 key_start: Tensor | None = None) -> Tensor:
    """Causal attention of q (B, Tq, H, D) over cache positions [key_start, key_end)
    (int32 (B,) tensors) of contiguous (B, T, Hkv, D) caches, default scale; no append and
    no checks on the host, so a compiled decoding step traces it in one graph. For
    callers that keep their own caches consistent (``fastattn.nn.KVCache``)."""
    backend = backends.resolve(OP, q.device, BACKENDS)
    if backend == "triton":
        return _fwd(q, k_cache, v_cache, key_end, key_start, None, None, None,
                    q.shape[-1] ** -0.5, -1, 0, 0.0, 0, backend)[0]
    # The torch backend's per-sequence loop reads the lengths on the host, which a graph
    # cannot; here each query row masks the whole cache instead (Tq × T_cache booleans;
    # Tq is 1 when decoding) and PyTorch's attention reads it once.
    tq, t = q.shape[1], k_cache.shape[1]
    cols = torch.arange(t, device=q.device)
    last = key_end[:, None].long() - tq + torch.arange(tq, device=q.device)    # (B, Tq)
    visible = cols <= last[:, :, None]                                          # (B, Tq, T)
    if key_start is not None:
        visible &= cols >= key_start[:, None, None].long()
    gqa = {"enable_gqa": True} if k_cache.shape[2] != q.shape[2] else {}
    out = F.scaled_dot_product_attention(*_heads_first(q, k_cache, v_cache),
                                         attn_mask=visible[:, None], **gqa)
    return out.transpose(1, 2)


# ------------------------------------------------------------------ registry entry


def _shape(size: int, device: torch.device, batch: int | None = None,
           heads: int | None = None, head_dim: int | None = None) -> dict:
    gpu = device.type == "cuda"
    heads = heads or (32 if gpu else 8)
    # On GPU keep B·T at 256k cached tokens, so every size moves comparable bytes.
    return {"B": batch or (max(1, 262144 // size) if gpu else 1), "H": heads,
            "H_kv": max(1, heads // 4), "T": size, "D": head_dim or (128 if gpu else 64)}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """One query token (B, 1, H, D) against a full cache (B, T, Hkv, D)."""
    g = torch.Generator(device).manual_seed(seed)
    b, h, t, d = shape["B"], shape["H"], shape["T"], shape["D"]
    hkv = shape.get("H_kv", h)
    q = registry.randn((b, 1, h, d), dtype, device, g)
    k_cache, v_cache = (registry.randn((b, t, hkv, d), dtype, device, g) for _ in range(2))
    return (q, k_cache, v_cache), registry.randn((b, 1, h, d), dtype, device, g)


def _heads_first(*xs: Tensor) -> list[Tensor]:
    return [x.transpose(1, 2) for x in xs]                         # (B, H, T, D) views


def _sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    gqa = {"enable_gqa": True} if k_cache.shape[2] != q.shape[2] else {}
    return F.scaled_dot_product_attention(*_heads_first(q, k_cache, v_cache),
                                          **gqa).transpose(1, 2)


def _work(shape: dict, dtype: torch.dtype, mode: str) -> float:
    """Bytes of K and V read (decoding is bound by them)."""
    if mode != "fwd":
        raise ValueError(f"{OP} is inference-only: mode must be 'fwd', got {mode!r}")
    return 2.0 * shape["B"] * shape["T"] * shape["H_kv"] * shape["D"] * dtype.itemsize


def _launch_kernels(head_dim: int, dtype: torch.dtype) -> None:
    """Decoding against a paged cache (pages of 256) in 4 splits: the forward and the
    combine kernel."""
    q = torch.empty(2, 1, 8, head_dim, dtype=dtype)               # (B, Tq, H, D)
    k_cache, v_cache = (torch.empty(16, 256, 2, head_dim, dtype=dtype) for _ in range(2))
    block_table = torch.zeros(2, 8, dtype=torch.int32)
    key_end = torch.full((2,), 2048, dtype=torch.int32)
    _triton_kernels().decode_fwd(q, k_cache, v_cache, key_end, None, block_table, None,
                                 None, head_dim ** -0.5, (-1, -1), 0.0, 4)


registry.register(registry.OpSpec(
    name="kv_decode", family="flash_attention",
    summary="one query token against a KV cache (flash_attn_with_kvcache), split-K",
    backends=BACKENDS, dtypes=DTYPES, custom_ops=("fastattn::kvcache_fwd",),
    x="T", sizes={"cuda": (1024, 4096, 16384, 65536), "cpu": (256, 1024, 4096)},
    shape=_shape, model_shape=_model_shape, inputs=_inputs,
    fast=lambda q, k_cache, v_cache: flash_attn_with_kvcache(q, k_cache, v_cache),
    naive=lambda q, k_cache, v_cache: reference.naive_attention(
        *_heads_first(q, k_cache, v_cache), causal=False).transpose(1, 2),
    builtin=("sdpa", _sdpa),
    reference=lambda q, k_cache, v_cache: reference.attention(
        *_heads_first(q, k_cache, v_cache))[0].transpose(1, 2),
    work=_work, unit="bytes", modes=("fwd",), launch_kernels=_launch_kernels, launch_dim="D",
    launch_sizes=(16, 64, 80, 128, 256)))
