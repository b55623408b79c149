"""HuggingFace transformers: fastattn as an attention implementation.

>>> import fastattn.integrations.transformers as fa_hf
>>> fa_hf.register()
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")

``register()`` adds ``"fastattn"`` to transformers' public attention registry
(``AttentionInterface``) and gives it the mask function of ``"sdpa"``, which passes no
mask at all when the mask is plain causal (no padding). Those calls run on
``fastattn.flash_attention``; calls with a real mask (padding, packed sequences), a
sliding window, a softcap or attention dropout while training are handed to
transformers' own SDPA implementation with a one-time ``FallbackWarning``.
transformers is an optional dependency: importing this module needs it.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fastattn._warnings import warn_fallback
from fastattn.ops.flash_attention import MAX_HEAD_DIM, MIN_HEAD_DIM, flash_attention

NAME = "fastattn"


def _unsupported(module, query, attention_mask, dropout: float, kwargs) -> str | None:
    if attention_mask is not None:
        return "an explicit attention mask (padding or packed sequences)"
    if dropout > 0.0 and module.training:
        return f"attention dropout={dropout} in training mode"
    if kwargs.get("sliding_window") is not None:
        return "sliding-window attention"
    if kwargs.get("softcap") is not None:
        return "a logit softcap"
    d = query.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
        return f"head dim {d} (fastattn takes a multiple of 8 from 16 to 256)"
    return None


def fastattn_attention_forward(module: torch.nn.Module, query: torch.Tensor,
                               key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key/value
    (B, Hkv, Tk, D); returns ((B, Tq, H, D), None)."""
    reason = _unsupported(module, query, attention_mask, dropout, kwargs)
    if reason is not None:
        warn_fallback("fastattn (transformers attention)", reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # fastattn aligns the causal mask bottom-right, so new queries after a KV cache see
    # the whole cache (for one query token that is no mask at all), as transformers does.
    out = flash_attention(query, key, value, causal=bool(causal), scale=scaling)
    return out.transpose(1, 2), None                               # (B, Tq, H, D)


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available to every transformers model."""
    AttentionInterface.register(NAME, fastattn_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
