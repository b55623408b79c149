"""The ``torch`` backend of flash attention: eager PyTorch that never builds the T×T matrix.

Two paths, both returning the row log-sum-exp that the backward needs:

* On CPU, when the causal mask is the square one (Tq == Tk) or there is none, PyTorch's
  own tiled CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and
  its backward). K/V with fewer heads (GQA) are repeated to the query heads for it (a
  copy of size H·Tk·D, never T×T) and their gradients summed back per group.
* Everywhere else (other devices, or a causal mask with Tq != Tk, whose bottom-right
  alignment the aten kernel does not offer) a blocked path: queries are processed
  ``block`` rows at a time, so the largest temporary is (B, H, block, Tk) in fp32.
  Causal blocks only read the keys they can see.

Conventions are those of the Triton kernels: the causal mask is aligned to the
bottom-right (query i sees key j iff j <= i + Tk - Tq); rows that see no key give
output 0 and log-sum-exp -inf.
"""
from __future__ import annotations

import torch
from torch import Tensor

_BLOCK = 256


def _use_aten_cpu(q: Tensor, k: Tensor, causal: bool) -> bool:
    return q.device.type == "cpu" and (not causal or q.shape[2] == k.shape[2])


def _expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, n_heads, T, D): each KV head repeated for its query group."""
    b, hkv, t, d = x.shape
    if hkv == n_heads:
        return x
    return x[:, :, None].expand(b, hkv, n_heads // hkv, t, d).reshape(b, n_heads, t, d)


def _sum_groups(dx: Tensor, n_kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, T, D): sum the gradient over each KV head's query group."""
    b, h, t, d = dx.shape
    if h == n_kv_heads:
        return dx
    return dx.view(b, n_kv_heads, h // n_kv_heads, t, d).sum(dim=2)


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns o (B, H, Tq, D) contiguous in q.dtype and lse (B, H, Tq) float32."""
    if _use_aten_cpu(q, k, causal):
        h = q.shape[1]
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, scale=scale)
        return o.contiguous(), lse.float().contiguous()
    return _blocked_fwd(q, k, v, causal, scale)


def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
             causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq (B, H, Tq, D), dk, dv (B, Hkv, Tk, D), contiguous, in the input dtype."""
    if _use_aten_cpu(q, k, causal):
        h, hkv = q.shape[1], k.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, _expand_kv(k, h), _expand_kv(v, h), o, lse, 0.0, causal, scale=scale)
        return (dq.contiguous(), _sum_groups(dk, hkv).contiguous(),
                _sum_groups(dv, hkv).contiguous())
    return _blocked_bwd(do, q, k, v, o, lse, causal, scale)


def _visible_keys(start: int, stop: int, tq: int, tk: int, causal: bool) -> int:
    """How many leading keys query rows [start, stop) can see between them."""
    return min(tk, stop + tk - tq) if causal else tk


def _block_probs(qb: Tensor, kb: Tensor, start: int, tq: int, tk: int, causal: bool,
                 scale: float, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Probabilities of one query block against its visible keys, in fp32.

    qb: (B, Hkv, G, m, D), kb: (B, Hkv, 1, n, D). With ``lse`` given (backward) the
    probabilities are recomputed from it; otherwise it is computed here.
    Returns p (B, Hkv, G, m, n) and lse (B, Hkv, G, m).
    """
    s = (qb @ kb.transpose(-2, -1)) * scale                       # (B, Hkv, G, m, n)
    if causal:
        m, n = s.shape[-2:]
        rows = torch.arange(start, start + m, device=s.device)[:, None]
        cols = torch.arange(n, device=s.device)[None, :]
        s = s.masked_fill(cols > rows + (tk - tq), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # Rows that see no key have lse = -inf: their probabilities are 0, not NaN.
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, 0.0)[..., None])
    return torch.where(finite[..., None], p, 0.0), lse


def _grouped(x: Tensor, n_kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, G, T, D) in fp32, G = H // Hkv query heads per KV head."""
    b, h, t, d = x.shape
    return x.float().reshape(b, n_kv_heads, h // n_kv_heads, t, d)


def _blocked_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                 block: int = _BLOCK) -> tuple[Tensor, Tensor]:
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg = _grouped(q, hkv)                                        # (B, Hkv, G, Tq, D)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]         # (B, Hkv, 1, Tk, D)
    o = q.new_zeros(b, hkv, h // hkv, tq, d, dtype=torch.float32)
    lse = q.new_full((b, hkv, h // hkv, tq), float("-inf"), dtype=torch.float32)
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        n = _visible_keys(start, stop, tq, tk, causal)
        if n <= 0:  # every row of this block sees no key: output 0, lse -inf
            continue
        p, lse_b = _block_probs(qg[..., start:stop, :], kf[..., :n, :], start, tq, tk,
                                causal, scale)
        o[..., start:stop, :] = p @ vf[..., :n, :]
        lse[..., start:stop] = lse_b
    return o.reshape(b, h, tq, d).to(q.dtype), lse.reshape(b, h, tq)


def _blocked_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                 causal: bool, scale: float, block: int = _BLOCK
                 ) -> tuple[Tensor, Tensor, Tensor]:
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)                 # (B, Hkv, G, Tq, D)
    lseg = lse.reshape(b, hkv, h // hkv, tq)
    # delta_i = rowsum(dO_i ∘ O_i) = Σ_j P_ij dP_ij: the softmax VJP's correction term.
    delta = (dog * _grouped(o, hkv)).sum(-1)                      # (B, Hkv, G, Tq)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]         # (B, Hkv, 1, Tk, D)
    dq = torch.zeros_like(qg)
    dk = q.new_zeros(b, hkv, tk, d, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        n = _visible_keys(start, stop, tq, tk, causal)
        if n <= 0:
            continue
        qb, dob = qg[..., start:stop, :], dog[..., start:stop, :]
        p, _ = _block_probs(qb, kf[..., :n, :], start, tq, tk, causal, scale,
                            lse=lseg[..., start:stop])           # (B, Hkv, G, m, n)
        dv[..., :n, :] += (p.transpose(-2, -1) @ dob).sum(2)
        dp = dob @ vf[..., :n, :].transpose(-2, -1)               # (B, Hkv, G, m, n)
        ds = p * (dp - delta[..., start:stop, None])
        dq[..., start:stop, :] = (ds @ kf[..., :n, :]) * scale
        dk[..., :n, :] += (ds.transpose(-2, -1) @ qb).sum(2) * scale
    return (dq.reshape(b, h, tq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
