"""flash-attn's public functions on fastattn's kernels, for code written for flash-attn.

    from fastattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Each function has flash-attn's signature, layouts and semantics (bottom-right causal
alignment, ``-1`` for an unbounded window side, ``causal`` meaning the window
``(left, 0)``), and runs on a GPU through the Triton kernels and on a CPU through the
``torch`` backend, both memory-efficient. Differences from flash-attn:

* ``deterministic`` defaults to None, not False: fastattn's backward stays
  deterministic (every gradient element written by one program, no atomics) unless
  ``deterministic=False`` is passed, which on the Triton kernels picks the one-pass
  backward that adds dQ with atomics (flash-attn's meaning of False).
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` where ``S_dmask``
  is built on request, in float32, by materialising the (B, H, Tq, Tk) probabilities
  (it is a testing aid, as in flash-attn): the probabilities, negated where dropout
  dropped them. For the varlen functions it is (B, H, max_seqlen_q, max_seqlen_k),
  zero past each sequence's lengths.
* The dropout mask is fastattn's own (Philox from torch's default generator), so it
  differs from flash-attn's for the same seed.
* ``flash_attn_varlen_func``'s ``block_table`` (paged K/V for varlen) is not served;
  ``flash_attn_with_kvcache`` takes paged caches.
* ``flash_attn_func`` also takes flash-attn 3's fp8 form: q, k, v in
  ``torch.float8_e4m3fn`` with ``q_descale``, ``k_descale``, ``v_descale`` (float32, one
  factor or (B, Hkv)), forward only, output in bfloat16 (``fastattn.flash_attention_fp8``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import reference
from fastattn.ops import _philox
from fastattn.ops.flash_attention import draw_rng, flash_attention, flash_attention_varlen
from fastattn.ops.flash_attention_fp8 import FP8, flash_attention_fp8
from fastattn.ops.kvcache import flash_attn_with_kvcache


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             deterministic, fn):
    """The fastattn keywords of a flash-attn call (dropout's (seed, offset) drawn here,
    so that ``S_dmask`` can rebuild the mask the kernels used)."""
    if not isinstance(window_size, (tuple, list)):
        raise ValueError(f"{fn}: window_size must be a pair (left, right), got "
                         f"{window_size!r}")
    rng = draw_rng() if dropout_p > 0 else None
    return dict(causal=causal, scale=softmax_scale, window=tuple(window_size),
                softcap=softcap, alibi=alibi_slopes, dropout_p=dropout_p, rng=rng,
                deterministic=deterministic is not False)


def _check_rank(fn: str, layout: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != layout.count(",") + 1:
            raise ValueError(f"{fn}: {name} must have shape {layout}, got {tuple(t.shape)}")


def _unpack(fn: str, name: str, packed: Tensor, dim: int, parts: str, layout: str
            ) -> tuple[Tensor, ...]:
    """The views ``packed.unbind(dim)`` of a packed tensor (read in place by the kernels;
    the gradient comes back packed), after checking its rank and its ``dim`` size: one
    slice per letter of ``parts`` ("qkv" or "kv")."""
    _check_rank(fn, layout, **{name: packed})
    if packed.shape[dim] != len(parts):
        raise ValueError(f"{fn}: {name} dim {dim} must be {len(parts)} "
                         f"({', '.join(parts)}), got shape {tuple(packed.shape)}")
    return packed.unbind(dim=dim)


def _probs(q: Tensor, k: Tensor, lse: Tensor, options: dict, sequence: int = 0) -> Tensor:
    """S_dmask of one dense (B, H, Tq, D) batch: softmax probabilities in float32,
    negated where dropout dropped them. ``sequence`` is the batch index of q's first
    row (varlen calls pass one sequence at a time)."""
    scale = q.shape[-1] ** -0.5 if options["scale"] is None else options["scale"]
    alibi = options["alibi"]
    if alibi is not None and alibi.dim() == 2:
        alibi = alibi[sequence:sequence + q.shape[0]]
    scores, _ = reference.masked_scores(q.float(), k.float(), k.float(), options["causal"],
                                        scale, options["window"], options["softcap"], alibi)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(finite, torch.exp(scores - torch.where(finite, lse[..., None], 0.0)), 0.0)
    if options["dropout_p"] > 0:
        b, h, tq, tk = p.shape
        seed, offset = options["rng"]
        bh = ((torch.arange(b) + sequence)[:, None] * h + torch.arange(h))[:, :, None, None]
        keep = _philox.keep_mask(seed, offset, bh.to(p.device),
                                 torch.arange(tq, device=p.device)[:, None],
                                 torch.arange(tk, device=p.device)[None, :],
                                 options["dropout_p"])
        p = torch.where(keep, p, -p)
    return p


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool | None = None,
                    return_attn_probs: bool = False, *, q_descale: Tensor | None = None,
                    k_descale: Tensor | None = None, v_descale: Tensor | None = None):
    """flash-attn's ``flash_attn_func``. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D), Hkv
    dividing H; any head dim up to 256. Returns a contiguous (B, Tq, H, D) tensor, and
    with ``return_attn_probs`` also the log-sum-exp (B, H, Tq) and ``S_dmask``. With
    float8_e4m3fn q, k, v and the ``*_descale`` factors: the fp8 forward (flash-attn 3's
    form), bfloat16 out, no dropout, ALiBi or attention probabilities."""
    _check_rank("flash_attn_func", "(batch, seqlen, nheads, headdim)", q=q, k=k, v=v)
    descales = (q_descale, k_descale, v_descale)
    if q.dtype == FP8 or any(d is not None for d in descales):
        if dropout_p or alibi_slopes is not None or return_attn_probs:
            raise ValueError("flash_attn_func: fp8 inputs take no dropout_p, alibi_slopes "
                             "or return_attn_probs (forward-only inference path)")
        out = flash_attention_fp8(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  *descales, causal=causal, scale=softmax_scale,
                                  window=tuple(window_size), softcap=softcap)
        return out.transpose(1, 2).contiguous()
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                       deterministic, "flash_attn_func")
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)                     # (B, H, T, D) views
    out, lse = flash_attention(qt, kt, v.transpose(1, 2), return_lse=True, **options)
    out = out.transpose(1, 2).contiguous()                            # (B, Tq, H, D)
    if not return_attn_probs:
        return out
    return out, lse, _probs(qt, kt, lse, options)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0,
                              softmax_scale: float | None = None, causal: bool = False,
                              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Tensor | None = None, deterministic: bool | None = None,
                              return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (B, T, 3, H, D), read in place
    (the kernels take the three strided slices); the gradient comes back packed."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", "qkv", qkv, 2, "qkv",
                      "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Tensor | None = None, deterministic: bool | None = None,
                             return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_kvpacked_func``: q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D)
    read in place."""
    k, v = _unpack("flash_attn_kvpacked_func", "kv", kv, 2, "kv",
                   "(batch, seqlen, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                           deterministic: bool | None = None, return_attn_probs: bool = False,
                           block_table: Tensor | None = None):
    """flash-attn's ``flash_attn_varlen_func``: q (total_q, H, D), k, v (total_k, Hkv, D),
    ``cu_seqlens_q/k`` int32 (B + 1,). Returns (total_q, H, D), and with
    ``return_attn_probs`` also the log-sum-exp (H, total_q) and ``S_dmask``."""
    if block_table is not None:
        raise NotImplementedError("flash_attn_varlen_func: block_table (paged K/V) is not "
                                  "served here; use flash_attn_with_kvcache for paged caches")
    _check_rank("flash_attn_varlen_func", "(total, nheads, headdim)", q=q, k=k, v=v)
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                       deterministic, "flash_attn_varlen_func")
    out, lse = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                      int(max_seqlen_k), return_lse=True, **options)
    if not return_attn_probs:
        return out
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    s_dmask = q.new_zeros(len(cq) - 1, q.shape[1], max_seqlen_q, max_seqlen_k,
                          dtype=torch.float32)
    for b in range(len(cq) - 1):
        tq, tk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if tq and tk:
            seq = lambda x, c: x[c[b]:c[b + 1]].transpose(0, 1)[None]  # noqa: E731
            s_dmask[b, :, :tq, :tk] = _probs(seq(q, cq), seq(k, ck),
                                             lse[None, :, cq[b]:cq[b + 1]], options, b)[0]
    return out, lse, s_dmask


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                                     deterministic: bool | None = None,
                                     return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D)."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", "qkv", qkv, 1, "qkv",
                      "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                                    deterministic: bool | None = None,
                                    return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, H, D),
    kv (total_k, 2, Hkv, D)."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", "kv", kv, 1, "kv",
                   "(total, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
