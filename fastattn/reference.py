"""Plain PyTorch reference implementations.

``naive_attention`` is the textbook causal-mask attention that materialises the full
T×T score matrix: the baseline every benchmark compares against. The other functions
are straightforward formulas, run by the tests in float64 as the ground truth for
every backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                    scale: float | None = None) -> Tensor:
    """Textbook attention on (B, H, T, D): scores, ``masked_fill(-inf)`` with a ``tril``
    mask, softmax, then ``@ V``. Materialises the (B, H, Tq, Tk) matrix — the baseline.

    With Tq != Tk the causal mask is aligned to the bottom-right (query i sees keys
    ``j <= i + Tk - Tq``), as in flash-attn and ``attention`` below. K/V may have fewer
    heads than Q (grouped-query attention); they are repeated to match.
    """
    scores, v = _masked_scores(q, k, v, causal, scale)             # (B, H, Tq, Tk)
    att = F.softmax(scores, dim=-1)
    return att @ v                                                 # (B, H, Tq, D)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention and its row log-sum-exp, computed in the inputs' dtype (run it in
    float64 for a ground truth). Same conventions as ``fastattn.flash_attention``:
    bottom-right causal alignment, GQA, and rows that see no key give output 0 and
    log-sum-exp ``-inf``.

    Returns ``out`` (B, H, Tq, D) and ``lse`` (B, H, Tq).
    """
    scores, v = _masked_scores(q, k, v, causal, scale)             # (B, H, Tq, Tk)
    lse = torch.logsumexp(scores, dim=-1)                          # (B, H, Tq)
    # A row with every key masked has lse = -inf; define its probabilities as 0.
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    return probs @ v, lse


def _masked_scores(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                   scale: float | None) -> tuple[Tensor, Tensor]:
    """The scaled (B, H, Tq, Tk) scores, ``-inf`` where the bottom-right causal mask
    hides a key, and v with its heads repeated to q's."""
    tq, tk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        mask = torch.tril(torch.ones(tq, tk, dtype=torch.bool, device=q.device),
                          diagonal=tk - tq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, v


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, n_heads, T, D), each KV head serving n_heads // Hkv query heads."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, residual: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dim: ``(h - mean) / sqrt(var + eps) * weight + bias`` with
    ``h = x + residual`` when a residual is given (biased variance, as torch)."""
    h = x if residual is None else x + residual
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6,
             residual: Tensor | None = None) -> Tensor:
    """RMSNorm over the last dim: ``h / sqrt(mean(h²) + eps) * weight``."""
    h = x if residual is None else x + residual
    y = h / torch.sqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def gelu(x: Tensor, approximate: str = "none", bias: Tensor | None = None) -> Tensor:
    """GELU of ``x + bias``: exact ``x·Φ(x) = x/2·(1 + erf(x/√2))`` or the tanh form
    ``x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``."""
    if bias is not None:
        x = x + bias
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
