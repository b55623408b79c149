"""fastattn: readable Triton kernels for causal flash-attention, LayerNorm and GELU.

>>> import fastattn
>>> out = fastattn.flash_attention(q, k, v, causal=True)          # (B, H, T, D)
>>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
>>> out = fastattn.flash_attn_func(q, k, v, causal=True)          # (B, T, H, D)
"""
from fastattn import nn, reference
from fastattn.backends import BACKENDS, BackendUnavailableError, use_backend
from fastattn.functional import flash_attn_func, scaled_dot_product_attention
from fastattn.ops.flash_attention import flash_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "flash_attention", "flash_attn_func", "nn",
    "reference", "scaled_dot_product_attention", "use_backend",
]
