"""Benchmark cases of the attention op beyond the plain causal call: a sliding window
and a batch of sequences of different lengths (varlen against padding).

Registry entries of the ``flash_attention`` family (its custom ops, kernels and tests);
``fastattn bench --op sliding_window`` / ``--op varlen_attention`` time them against
the textbook baseline and torch's SDPA in one run.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import reference
from fastattn.ops import registry
from fastattn.ops.flash_attention import (BACKENDS, DTYPES, flash_attention,
                                          flash_attention_varlen)
from fastattn.ops.flash_attention import _inputs as _dense_inputs
from fastattn.ops.flash_attention import _model_shape

CUSTOM_OPS = ("fastattn::flash_attention_fwd", "fastattn::flash_attention_bwd")


def _shape(size: int, device: torch.device, batch: int | None = None, heads: int | None = None,
           head_dim: int | None = None) -> dict:
    gpu = device.type == "cuda"
    return {"B": batch or (max(1, 32768 // size) if gpu else 2), "H": heads or (16 if gpu else 8),
            "T": size, "D": head_dim or (128 if gpu else 64)}


# --------------------------------------------------------------------- sliding window
# Mistral's window: each query sees itself and the WINDOW - 1 keys before it. The
# cost of the fastattn kernels grows with T·WINDOW; the textbook's and SDPA's (which
# gets the band as a boolean mask) with T².
WINDOW = 512


def _band(t: int, device: torch.device) -> Tensor:
    return reference.visible(t, t, causal=True, window=(WINDOW - 1, 0), device=device)


def _window_pairs(t: int) -> int:
    """(query, key) pairs inside the causal window of width WINDOW."""
    w = min(WINDOW, t)
    return w * (w + 1) // 2 + (t - w) * w


def _window_work(shape: dict, dtype: torch.dtype, mode: str, causal: bool) -> float:
    # attention_flops counts Tq·Tk·(1/2 if causal) pairs; scale it to the window's
    t = shape["T"]
    full = registry.attention_flops(shape["B"], shape["H"], t, t, shape["D"], False, mode)
    return full * _window_pairs(t) / (t * t)


registry.register(registry.OpSpec(
    name="sliding_window", family="flash_attention",
    summary=f"causal attention with a {WINDOW}-key sliding window (Mistral), (B, H, T, D)",
    backends=BACKENDS, dtypes=DTYPES, custom_ops=CUSTOM_OPS,
    x="T", sizes={"cuda": (2048, 4096, 8192, 16384), "cpu": (1024, 2048, 4096)},
    shape=_shape, model_shape=_model_shape, inputs=_dense_inputs,
    fast=lambda q, k, v, causal: flash_attention(q, k, v, causal=causal,
                                                 window=(WINDOW - 1, 0)),
    naive=lambda q, k, v, causal: reference.naive_attention(q, k, v, causal,
                                                            window=(WINDOW - 1, 0)),
    builtin=("sdpa+mask", lambda q, k, v, causal: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=_band(q.shape[2], q.device), enable_gqa=k.shape[1] != q.shape[1])),
    reference=lambda q, k, v, causal: reference.attention(q, k, v, causal,
                                                          window=(WINDOW - 1, 0))[0],
    work=_window_work, unit="flops", options={"causal": True}))


# ------------------------------------------------------------------ variable lengths
# A padded batch whose sequences have different lengths: sequence b holds the first
# T − ⌊b·T / 2B⌋ positions (from T down to about T/2), the rest is padding. fastattn
# packs the tokens, runs the varlen kernels and scatters the result back (the unpad /
# re-pad a transformers model does); the textbook and SDPA attend over the whole padded
# (T × T) batch with a padding mask. Outputs at padding positions are 0 for all three.


def _lengths(b: int, t: int) -> list[int]:
    return [t - (i * t) // (2 * b) for i in range(b)]


def _keep(q: Tensor) -> Tensor:
    """(B, T) bool: the real (non-padding) positions of the batch."""
    b, _, t, _ = q.shape
    lengths = torch.tensor(_lengths(b, t), device=q.device)
    return torch.arange(t, device=q.device)[None, :] < lengths[:, None]


def _varlen(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    keep = _keep(q)
    lengths = _lengths(q.shape[0], q.shape[2])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=q.device)
    packed = [x.transpose(1, 2)[keep] for x in (q, k, v)]           # (total, H, D)
    out = flash_attention_varlen(*packed, cu, cu, max(lengths), max(lengths), causal=causal)
    padded = out.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    return padded.index_put((keep,), out).transpose(1, 2)            # (B, H, T, D)


def _padded(attend, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Attention over the padded batch (``attend(q, k, v, keep, causal)``), with the
    padding query rows zeroed."""
    keep = _keep(q)
    return attend(q, k, v, keep, causal).masked_fill(~keep[:, None, :, None], 0.0)


def _sdpa_padded(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, causal: bool) -> Tensor:
    t = q.shape[2]
    mask = keep[:, None, None, :] & reference.visible(t, t, causal, device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _varlen_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    out = torch.zeros_like(q)
    for b, n in enumerate(_lengths(q.shape[0], q.shape[2])):
        out[b:b + 1, :, :n] = reference.attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                                  v[b:b + 1, :, :n], causal)[0]
    return out


def _varlen_work(shape: dict, dtype: torch.dtype, mode: str, causal: bool) -> float:
    return sum(registry.attention_flops(1, shape["H"], n, n, shape["D"], causal, mode)
               for n in _lengths(shape["B"], shape["T"]))


registry.register(registry.OpSpec(
    name="varlen_attention", family="flash_attention",
    summary="causal attention over a padded batch of different lengths: varlen vs padding",
    backends=BACKENDS, dtypes=DTYPES, custom_ops=CUSTOM_OPS,
    x="T", sizes={"cuda": (1024, 2048, 4096, 8192), "cpu": (512, 1024, 2048)},
    shape=_shape, model_shape=_model_shape, inputs=_dense_inputs,
    fast=_varlen,
    naive=lambda q, k, v, causal: _padded(
        lambda q, k, v, keep, causal: reference.naive_attention(q, k, v, causal,
                                                                key_padding=keep),
        q, k, v, causal),
    builtin=("sdpa+mask", lambda q, k, v, causal: _padded(_sdpa_padded, q, k, v, causal)),
    reference=_varlen_reference, work=_varlen_work, unit="flops", options={"causal": True}))
