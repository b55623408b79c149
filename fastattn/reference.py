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
                    scale: float | None = None, window: tuple[int, int] = (-1, -1),
                    key_padding: Tensor | None = None) -> Tensor:
    """Textbook attention on (B, H, T, D): scores, ``masked_fill(-inf)`` with a ``tril``
    mask, softmax, then ``@ V``. Materialises the (B, H, Tq, Tk) matrix — the baseline.

    With Tq != Tk the causal mask is aligned to the bottom-right (query i sees keys
    ``j <= i + Tk - Tq``), as in flash-attn and ``attention`` below. K/V may have fewer
    heads than Q (grouped-query attention); they are repeated to match. ``window``
    masks a sliding window as ``attention`` does; ``key_padding`` (B, Tk) bool hides
    the keys marked False (a padded batch; a row left without keys gives NaN, as the
    textbook softmax does).
    """
    scores, v = masked_scores(q, k, v, causal, scale, window)      # (B, H, Tq, Tk)
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    att = F.softmax(scores, dim=-1)
    return att @ v                                                 # (B, H, Tq, D)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              scale: float | None = None, *, window: tuple[int, int] = (-1, -1),
              softcap: float = 0.0, alibi: Tensor | None = None,
              dropout_mask: Tensor | None = None, dropout_p: float = 0.0
              ) -> tuple[Tensor, Tensor]:
    """Exact attention and its row log-sum-exp, computed in the inputs' dtype (run it in
    float64 for a ground truth), with every variant the kernels serve. Conventions are
    those of ``fastattn.flash_attention`` and flash-attn:

    * scores ``x = scale·q·k``; with ``softcap > 0``, ``x = softcap·tanh(x / softcap)``;
      with ``alibi`` (B, H) or (H,), ``x -= slope·|i + Tk − Tq − j|``;
    * key j is visible to query i iff ``i + Tk − Tq − left <= j <= i + Tk − Tq + right``
      for ``window = (left, right)``, ``-1`` leaving that side unbounded; ``causal``
      sets ``right = 0`` (bottom-right alignment);
    * ``dropout_mask`` (B, H, Tq, Tk) bool, True = kept: the probabilities are multiplied
      by it and by ``1 / (1 − dropout_p)``; the log-sum-exp is not affected;
    * GQA (k, v with fewer heads); rows that see no key give output 0 and lse ``-inf``.

    Returns ``out`` (B, H, Tq, D) and ``lse`` (B, H, Tq).
    """
    scores, v = masked_scores(q, k, v, causal, scale, window, softcap, alibi)
    lse = torch.logsumexp(scores, dim=-1)                          # (B, H, Tq)
    # A row with every key masked has lse = -inf; define its probabilities as 0.
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs @ v, lse


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, causal: bool = False, scale: float | None = None,
                     *, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi: Tensor | None = None, dropout_mask: list[Tensor] | None = None,
                     dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """``attention`` over a packed batch: q (total_q, H, D), k, v (total_k, Hkv, D), and
    sequence b owning rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of each. ``alibi`` is
    (B, H) or (H,); ``dropout_mask`` a list of per-sequence (1, H, Tq_b, Tk_b) masks.

    Returns ``out`` (total_q, H, D) and ``lse`` (H, total_q), flash-attn's varlen layout.
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = q.new_zeros(q.shape)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"))
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        seq = [x[lo:hi].transpose(0, 1)[None] for x, lo, hi in
               ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1]))]
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o_b, lse_b = attention(*seq, causal, scale, window=window, softcap=softcap,
                               alibi=None if slopes is None else slopes[None],
                               dropout_mask=None if dropout_mask is None else dropout_mask[b],
                               dropout_p=dropout_p)
        out[cq[b]:cq[b + 1]] = o_b[0].transpose(0, 1)
        lse[:, cq[b]:cq[b + 1]] = lse_b[0]
    return out, lse


def visible(tq: int, tk: int, causal: bool = False, window: tuple[int, int] = (-1, -1),
            device=None) -> Tensor:
    """(Tq, Tk) bool: whether query i sees key j (bottom-right aligned causal/window)."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    seen = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


def masked_scores(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
                   window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   alibi: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The scaled (B, H, Tq, Tk) scores (soft-capped, ALiBi-biased), ``-inf`` where the
    causal mask or window hides a key, and v with its heads repeated to q's."""
    tq, tk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi is not None:
        i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        j = torch.arange(tk, device=q.device)[None, :]
        slopes = alibi.to(scores.dtype)
        slopes = slopes[None] if slopes.dim() == 1 else slopes     # (B or 1, H)
        scores = scores - slopes[:, :, None, None] * (i - j).abs().to(scores.dtype)
    if causal or tuple(window) != (-1, -1):
        scores = scores.masked_fill(~visible(tq, tk, causal, tuple(window), q.device),
                                    float("-inf"))
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


def swiglu(a: Tensor, b: Tensor | None = None) -> Tensor:
    """SwiGLU: ``silu(a)·b`` with ``silu(a) = a·σ(a)``, σ the logistic sigmoid. With b
    None, a's last dim is split in halves: gate first, then up."""
    if b is None:
        a, b = a.chunk(2, dim=-1)
    return a * torch.sigmoid(a) * b


def geglu(a: Tensor, b: Tensor | None = None, approximate: str = "none") -> Tensor:
    """GEGLU: ``gelu(a)·b`` (``gelu`` above, exact or tanh); b None splits a as ``swiglu``."""
    if b is None:
        a, b = a.chunk(2, dim=-1)
    return gelu(a, approximate) * b


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotary position embedding of x (B, H, T, D) by the angles whose cosines and sines
    are ``cos``, ``sin`` (B or 1, T, R/2): pair i of position t turns by θ_ti,
    ``(x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)``. Pairs are (i, i + R/2) in the
    GPT-NeoX layout (transformers' ``rotate_half``) or (2i, 2i + 1) when ``interleaved``
    (GPT-J); dims R..D pass through unchanged (partial rotary)."""
    r = 2 * cos.shape[-1]
    c, s = cos[:, None], sin[:, None]                              # (B|1, 1, T, R/2)
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, dim=-1)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), -1)
    return torch.cat((out, rest), dim=-1)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float = 0.0) -> Tensor:
    """Cross-entropy of all the logits ``x·Wᵀ + b`` (..., V) at once against ``target``
    (...): per row ``(1 − ε)(lse − l_t) + ε(lse − mean_j l_j) + z_loss·lse²`` with
    ``l = softcap·tanh(logits / softcap)`` when ``softcap > 0``, 0 where ``target ==
    ignore_index``; "mean" divides the sum by the number of other rows."""
    logits = F.linear(x, weight, bias)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    keep = target != ignore_index
    logit_t = logits.gather(-1, torch.where(keep, target, 0)[..., None])[..., 0]
    loss = ((1.0 - label_smoothing) * (lse - logit_t)
            + label_smoothing * (lse - logits.mean(dim=-1)) + z_loss * lse * lse)
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()
