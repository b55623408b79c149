"""HuggingFace transformers: fastattn as an attention implementation.

>>> import fastattn.integrations.transformers as fa_hf
>>> fa_hf.register()
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")

``register()`` adds ``"fastattn"`` to transformers' public attention registry
(``AttentionInterface``) and gives it the mask function of ``"sdpa"``, which passes no
mask when the mask is plain causal (no padding) or an empty static cache is being
filled. fastattn's attention function computes exactly what transformers' SDPA function
would for the same call, and eager attention whenever SDPA cannot:

* Served on ``fastattn.flash_attention``: no ``attention_mask``; fp16/bf16/fp32; head
  dim a multiple of 8 from 16 to 256; no dropout while training; no keyword arguments
  but ``dropout``, ``scaling``, ``is_causal``, ``sliding_window`` and the bookkeeping
  ones (``position_ids``, ``use_cache``, ``cache_position``). A causal call reads as
  SDPA's ``is_causal`` does: with more keys than queries (prefill into an empty static
  cache) the queries are the first Tq positions and the keys past them empty slots, so
  only the first Tq keys are used; one query sees every key (decoding). A
  ``sliding_window`` is served when it cuts no key the queries see (every query within
  ``window - 1`` positions of its keys, transformers' ``kv > q - window``); one that
  would cut keys comes with a mask from transformers, and without one raises ValueError.
* Handed to transformers' ``sdpa_attention_forward``: an attention mask (padding,
  packed sequences, a static cache being decoded, a sliding window that cuts keys), a
  ``position_bias`` (T5's relative bias), dropout while training, other dtypes or head
  dims, key and value head dims that differ, fewer keys than queries under a causal mask.
* Handed to the model's own ``eager_attention_forward`` (what ``"eager"`` runs; SDPA
  refuses a softcap and would drop the rest): a ``softcap`` (Gemma 2) and any other
  keyword argument that is set, e.g. gpt-oss's attention sinks (``s_aux``) or
  ``output_attentions=True``. The mask goes with it in eager's additive form. An
  attention class without an ``eager_attention_forward`` beside it raises
  NotImplementedError.

Each fallback warns (``FallbackWarning``) once per reason and config object: models
built from one config object share it; T5's encoder and decoder each have their own.
transformers is an optional dependency: importing this module needs it.
"""
from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fastattn._warnings import warn_fallback
from fastattn.ops.flash_attention import DTYPES, HEAD_DIMS, flash_attention, head_dim_supported

NAME = "fastattn"
WHERE = "fastattn (transformers attention)"

# Keywords that change nothing in the attention math: ``sdpa_mask`` has already folded
# positions (packed sequences) and the cache into ``attention_mask``.
_BOOKKEEPING = frozenset({"position_ids", "use_cache", "cache_position"})
# Keywords ``_route`` reads itself; any other keyword that is set goes to eager.
_HANDLED = frozenset({"sliding_window", "softcap", "position_bias"})


def _keys_seen(tq: int, tk: int, causal: bool) -> int:
    """How many keys the last query sees in SDPA's reading of a call without a mask:
    ``is_causal`` is aligned top-left, so Tq > 1 causal queries see the first Tq keys."""
    return min(tq, tk) if causal and tq > 1 else tk


def _route(module, query, key, value, attention_mask, dropout, causal,
           kwargs) -> tuple[str, str | None]:
    """("fastattn", None), or the fallback ("sdpa" or "eager") and the reason for it.
    Raises ValueError for a sliding window that cuts keys when no mask came."""
    unserved = sorted(name for name, v in kwargs.items() if v is not None and v is not False
                      and name not in _BOOKKEEPING | _HANDLED)
    if unserved:
        return "eager", f"keyword argument(s) {', '.join(unserved)}"
    if kwargs.get("softcap") is not None:
        return "eager", "a logit softcap"
    if kwargs.get("position_bias") is not None:
        return "sdpa", "a position bias (e.g. T5's relative attention bias)"
    if attention_mask is not None:
        return "sdpa", "an explicit attention mask (padding, packed sequences, static cache)"
    if dropout > 0.0 and module.training:
        return "sdpa", f"attention dropout={dropout} in training mode"
    if query.dtype not in DTYPES:
        return "sdpa", f"dtype {query.dtype}"
    d, tq, tk = query.shape[-1], query.shape[2], key.shape[2]
    if not head_dim_supported(d) or value.shape[-1] != d:
        return "sdpa", (f"head dims q/k {d}, v {value.shape[-1]} (fastattn takes one head dim, "
                        f"{HEAD_DIMS})")
    if causal and 1 < tq and tk < tq:
        return "sdpa", f"{tk} keys for {tq} causal queries"
    window = kwargs.get("sliding_window")
    if window is not None and _keys_seen(tq, tk, causal) > window:
        # transformers builds a mask whenever its window cuts a key (sdpa_mask's
        # local_size), so a window that cuts keys without one has no defined meaning.
        raise ValueError(f"sliding_window={window} cuts keys ({_keys_seen(tq, tk, causal)} "
                         "seen) but no attention_mask came with the call")
    return "fastattn", None


def _eager_mask(query, key, attention_mask, causal) -> torch.Tensor | None:
    """The additive mask eager attention expects for what SDPA makes of ``attention_mask``
    (``eager_mask`` turns ``sdpa_mask``'s booleans into 0 / dtype min the same way)."""
    tq, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        if not (causal and tq > 1):
            return None
        # SDPA's is_causal: top-left, see _keys_seen
        attention_mask = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=query.device).tril()
    if attention_mask.dtype != torch.bool:
        return attention_mask                                   # already additive
    return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                       ).masked_fill(~attention_mask, torch.finfo(query.dtype).min)


def _eager_attention(module: torch.nn.Module, reason: str):
    """The model's own ``eager_attention_forward``, from the file defining its attention."""
    for cls in type(module).__mro__:
        found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if found is not None:
            return found
    raise NotImplementedError(f"{WHERE}: {reason} needs the model's eager attention, but no "
                              f"eager_attention_forward sits beside {type(module).__name__}; "
                              "use attn_implementation='eager'")


def fastattn_attention_forward(module: torch.nn.Module, query: torch.Tensor,
                               key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key/value
    (B, Hkv, Tk, D); returns ((B, Tq, H, D), attention weights or None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    path, reason = _route(module, query, key, value, attention_mask, dropout, causal, kwargs)
    if path == "sdpa":
        warn_fallback(WHERE, reason, key=getattr(module, "config", module),
                      to="transformers' sdpa_attention_forward")
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    if path == "eager":
        eager = _eager_attention(module, reason)
        warn_fallback(WHERE, reason, key=getattr(module, "config", module),
                      to=f"the eager attention of {type(module).__name__}")
        return eager(module, query, key, value, _eager_mask(query, key, attention_mask, causal),
                     dropout=dropout, scaling=scaling, **kwargs)
    tq = query.shape[2]
    n = _keys_seen(tq, key.shape[2], causal)
    # SDPA's reading (see _keys_seen): causal queries see the first Tq keys under a square
    # mask, one query (decoding) sees every key.
    out = flash_attention(query, key[:, :, :n], value[:, :, :n], causal=causal and tq > 1,
                          scale=scaling)
    return out.transpose(1, 2), None                               # (B, Tq, H, D)


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available to every transformers model."""
    AttentionInterface.register(NAME, fastattn_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
