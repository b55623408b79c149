"""fastattn: readable Triton kernels for causal flash-attention, LayerNorm and GELU.

>>> import fastattn
>>> out = fastattn.flash_attention(q, k, v, causal=True)          # (B, H, T, D)
>>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
>>> out = fastattn.flash_attn_func(q, k, v, causal=True)          # (B, T, H, D)
>>> out = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)  # packed
>>> y = fastattn.layer_norm(x, (C,), weight, bias)
>>> report = fastattn.swap(model)                                 # put the kernels in a model
"""
from fastattn import nn, reference
from fastattn._warnings import FallbackWarning
from fastattn.backends import BACKENDS, BackendUnavailableError, use_backend
from fastattn.flash_attn_interface import (
    flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from fastattn.functional import scaled_dot_product_attention
from fastattn.ops.flash_attention import flash_attention, flash_attention_varlen
from fastattn.ops.flash_attention_fp8 import flash_attention_fp8, quantize_fp8
from fastattn.ops.gelu import bias_gelu, gelu
from fastattn.ops.layer_norm import layer_norm, rms_norm
from fastattn.ops.linear_cross_entropy import linear_cross_entropy
from fastattn.ops.rope import apply_rotary_pos_emb, rope
from fastattn.ops.swiglu import geglu, silu, swiglu
from fastattn._swap import SwapReport, enable, enable_globally, swap

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "FallbackWarning", "SwapReport", "bias_gelu",
    "enable", "enable_globally", "flash_attention", "flash_attention_fp8",
    "flash_attention_varlen", "flash_attn_func",
    "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
    "apply_rotary_pos_emb", "flash_attn_with_kvcache", "gelu", "geglu", "layer_norm",
    "linear_cross_entropy", "rope", "silu", "swiglu",
    "nn", "quantize_fp8", "reference", "rms_norm", "scaled_dot_product_attention", "swap",
    "use_backend",
]
