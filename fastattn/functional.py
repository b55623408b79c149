"""Drop-in attention functions with the signatures of the functions they replace.

* ``scaled_dot_product_attention``: exactly ``torch.nn.functional.scaled_dot_product_attention``.
* ``flash_attn_func``: exactly flash-attn's ``flash_attn_func``, (B, T, H, D) layout.

Both run fastattn's kernels through ``flash_attention``. What they cannot serve is
handled as documented on each, never silently wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn._warnings import warn_fallback
from fastattn.ops import registry
from fastattn.ops.flash_attention import DTYPES, HEAD_DIMS, flash_attention, head_dim_supported


def _sdpa_unsupported(query: Tensor, key: Tensor, value: Tensor, attn_mask, dropout_p: float,
                      is_causal: bool, enable_gqa: bool) -> str | None:
    """Why the fast path cannot serve this call, or None if it can."""
    if attn_mask is not None:
        return "attn_mask is not supported by the fast path (only is_causal)"
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p} is not supported (fastattn has no attention dropout)"
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        return (f"inputs with {query.dim()}/{key.dim()}/{value.dim()} dimensions "
                "(the fast path takes 3-D (B, T, E) or 4-D (B, H, T, E))")
    if query.numel() == 0 or key.numel() == 0:
        return "empty inputs"
    if value.shape[-1] != query.shape[-1]:
        return f"a value head dim {value.shape[-1]} != query head dim {query.shape[-1]}"
    d = query.shape[-1]
    if not head_dim_supported(d):
        return f"head dim {d} (the fast path takes {HEAD_DIMS})"
    if query.dtype not in DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}"
    if is_causal and query.shape[-2] != key.shape[-2]:
        # torch aligns is_causal to the top-left when L != S; fastattn to the bottom-right.
        return "is_causal with query length != key length (torch aligns that mask top-left)"
    if query.dim() == 4 and query.shape[1] != key.shape[1]:
        if not enable_gqa or query.shape[1] % key.shape[1] != 0:
            return "query heads != key heads without enable_gqa=True"
    return None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels.

    Same signature, same semantics. The fast path serves 3-D (B, L, E) and 4-D
    (B, H, L, E) inputs with equal query/value head dims (a multiple of 8 from 16 to 256),
    no ``attn_mask``, ``dropout_p == 0``, and ``is_causal`` only when L == S (torch's
    causal mask is aligned top-left for L != S). Other calls are handed to torch's own
    function with a one-time ``FallbackWarning`` naming the reason. With
    ``enable_gqa=True`` key/value may have fewer heads than query, as in torch.
    """
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        warn_fallback("fastattn.scaled_dot_product_attention", reason)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, **kwargs)
    if query.dim() == 3:
        out = flash_attention(query[:, None], key[:, None], value[:, None],
                              causal=is_causal, scale=scale)
        return out[:, 0]
    return flash_attention(query, key, value, causal=is_causal, scale=scale)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_func`` on fastattn's kernels, for code written for flash-attn.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Hkv dividing H. Returns a contiguous
    (B, Tq, H, D) tensor, as flash-attn does (code written for it calls ``.view`` on
    the result); that costs one copy of the output, O(T·H·D) next to the kernel's
    O(T²·H·D). The causal mask is aligned
    bottom-right, as in flash-attn. ``deterministic`` is accepted: fastattn's backward is
    always deterministic. With ``return_attn_probs=True`` returns
    ``(out, softmax_lse, None)``: the log-sum-exp (B, H, Tq) in float32, and no dropout
    mask (fastattn has no dropout).

    Not supported (``NotImplementedError`` naming the argument): ``dropout_p > 0``,
    ``window_size`` other than (-1, -1), ``softcap != 0``, ``alibi_slopes``.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"flash_attn_func: dropout_p={dropout_p} is not supported "
                                  "(fastattn has no attention dropout); use 0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"flash_attn_func: window_size={tuple(window_size)} (local "
                                  "attention) is not supported; use (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"flash_attn_func: softcap={softcap} is not supported; use 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn_func: alibi_slopes is not supported; use None")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), "
                             f"got shape {tuple(t.shape)}")
    out, lse = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               causal=causal, scale=softmax_scale, return_lse=True)
    out = out.transpose(1, 2).contiguous()                          # (B, Tq, H, D)
    return (out, lse, None) if return_attn_probs else out


# F.scaled_dot_product_attention is this builtin; the drop-in falls back itself (warning).
registry.replaces_function("flash_attention", torch._C._nn.scaled_dot_product_attention,
                           scaled_dot_product_attention)
