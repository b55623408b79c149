"""Drop-in attention functions with the signatures of the functions they replace.

* ``scaled_dot_product_attention``: exactly ``torch.nn.functional.scaled_dot_product_attention``.
* ``flash_attn_func`` and the rest of flash-attn's functions live in
  ``fastattn.flash_attn_interface`` (re-exported here and from ``fastattn``).

Both run fastattn's kernels. What they cannot serve is handled as documented on each,
never silently wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn._warnings import warn_fallback
from fastattn.flash_attn_interface import flash_attn_func  # noqa: F401  (re-export)
from fastattn.ops import registry
from fastattn.ops.flash_attention import (DTYPES, HEAD_DIMS, flash_attention,
                                          flash_attention_varlen, head_dim_supported)


def _key_padding(attn_mask: Tensor, query: Tensor, key: Tensor) -> Tensor | None:
    """The (B, S) keep-mask of a key-padding ``attn_mask`` — one that is the same for every
    head and query row: boolean (True = attend) or additive with only 0 and -inf — or
    None for any other mask. Reads an additive mask's values (one device sync)."""
    b, s = query.shape[0], key.shape[-2]
    rank = query.dim()                             # the mask broadcasts to (B, [H,] L, S)
    if attn_mask.dim() > rank or attn_mask.shape[-1] != s:
        return None
    shape = (1,) * (rank - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[0] not in (1, b) or any(n != 1 for n in shape[1:-1]):
        return None
    keep = attn_mask.reshape(shape[0], s)
    if keep.dtype != torch.bool:
        if not keep.dtype.is_floating_point:
            return None
        zero, hidden = keep == 0, keep == float("-inf")
        if not bool((zero | hidden).all()):
            return None                                   # a general additive bias
        keep = zero
    return keep.expand(b, s)


def _sdpa_unsupported(query: Tensor, key: Tensor, value: Tensor, attn_mask, is_causal: bool,
                      enable_gqa: bool, keep: Tensor | None) -> str | None:
    """Why the fast path cannot serve this call, or None if it can. ``keep``: the
    key-padding form of ``attn_mask`` (``_key_padding``)."""
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
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal (torch raises for it)"
        if keep is None:
            return (f"an attn_mask of shape {tuple(attn_mask.shape)} that is not a key-padding "
                    "mask (fastattn serves masks equal for every head and query: boolean, or "
                    "additive with only 0 and -inf)")
    if is_causal and query.shape[-2] != key.shape[-2]:
        # torch aligns is_causal to the top-left when L != S; fastattn to the bottom-right.
        return "is_causal with query length != key length (torch aligns that mask top-left)"
    if query.dim() == 4 and query.shape[1] != key.shape[1]:
        if not enable_gqa or query.shape[1] % key.shape[1] != 0:
            return "query heads != key heads without enable_gqa=True"
    return None


def _padded_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor,
                      dropout_p: float, scale: float | None) -> Tensor:
    """Attention of (B, H, L, E) queries over the keys ``keep`` (B, S) marks: the kept keys
    are packed into one varlen batch (no S×L mask is built, pad keys are never read)."""
    b, h, length, e = query.shape
    counts = keep.sum(dim=1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=query.device)
    k = key.transpose(1, 2)[keep]                                    # (total_k, Hkv, E)
    v = value.transpose(1, 2)[keep]
    q = query.transpose(1, 2).reshape(b * length, h, e)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, length, key.shape[-2], scale=scale,
                                 dropout_p=dropout_p)
    return out.view(b, length, h, e).transpose(1, 2)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels.

    Same signature, same semantics. The fast path serves 3-D (B, L, E) and 4-D
    (B, H, L, E) inputs with equal query/value head dims up to 256, ``dropout_p`` (in
    the kernel, with fastattn's own random mask), ``is_causal`` when L == S (torch's
    causal mask is aligned top-left for L != S), and key-padding masks: an ``attn_mask``
    that is the same for every head and query row, boolean or additive with only 0 and
    ``-inf`` (the kept keys go through the varlen kernel; a row with no key gives 0, as
    torch does). Other calls (general masks and biases, other dtypes) are handed to
    torch's own function with a one-time ``FallbackWarning`` naming the reason. With
    ``enable_gqa=True`` key/value may have fewer heads than query, as in torch.
    """
    keep = None
    if attn_mask is not None and query.dim() in (3, 4) and key.dim() == query.dim():
        keep = _key_padding(attn_mask, query, key)
    reason = _sdpa_unsupported(query, key, value, attn_mask, is_causal, enable_gqa, keep)
    if reason is not None:
        warn_fallback("fastattn.scaled_dot_product_attention", reason)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, **kwargs)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query[:, None], key[:, None], value[:, None]
    if attn_mask is not None:
        out = _padded_attention(query, key, value, keep, dropout_p, scale)
    else:
        out = flash_attention(query, key, value, causal=is_causal, scale=scale,
                              dropout_p=dropout_p)
    return out[:, 0] if three_d else out


# F.scaled_dot_product_attention is this builtin; the drop-in falls back itself (warning).
registry.replaces_function("flash_attention", torch._C._nn.scaled_dot_product_attention,
                           scaled_dot_product_attention)
