"""The ``torch`` backend of flash attention: eager PyTorch that never builds the T×T matrix.

What is computed, as the Triton kernels and ``fastattn.reference.attention`` compute it
(bottom-right alignment, flash-attn's conventions). Per sequence, query row i, key row
j, off = Tk − Tq:

    x_ij = scale · q_i·k_j
    x_ij = softcap · tanh(x_ij / softcap)                        (softcap > 0)
    x_ij += −slope[b, h] · |i + off − j|                         (alibi)
    x_ij = −inf unless j is in the window: i + off − left <= j <= i + off + right
           (left/right −1: unbounded; causal means right = min(right, 0))
    lse_i = log Σ_j exp(x_ij),  P_ij = exp(x_ij − lse_i)
    O_i = Σ_j P_ij · keep_ij / (1 − p) · v_j                     (dropout p > 0)

keep_ij comes from ``_philox`` (Triton's Philox on the counter (j, i, b·H + h, offset)),
so the backward replays it from (seed, offset) and the Triton kernels draw the same
mask. lse is not affected by dropout. A row that sees no key has O = 0, lse = −inf and
no gradient. The backward is the softmax VJP with Δ_i = dO_i·O_i (= Σ_j P_ij dP̃_ij):

    dV = P̃ᵀ dO with P̃ = P ∘ keep / (1 − p),   dP̃ = dO Vᵀ ∘ keep / (1 − p)
    dX = P ∘ (dP̃ − Δ),   dS = dX ∘ (1 − tanh²) with softcap,   dQ = scale·dS K,
    dK = scale·dSᵀ Q.     The alibi slopes get no gradient (flash-attn gives none).

Two paths:

* On CPU, plain attention (no window other than the square causal one, no softcap,
  alibi, dropout) goes to PyTorch's own tiled CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward). K/V with
  fewer heads (GQA) are repeated to the query heads for it (a copy of size H·Tk·D,
  never T×T) and their gradients summed back per group.
* Everything else (other devices, a causal mask with Tq != Tk, whose bottom-right
  alignment the aten kernel does not offer, and every variant) takes a blocked path:
  queries are processed ``_BLOCK`` rows at a time against only the keys [lo, hi) that
  the window lets that block see, so the largest temporary is
  (B, H, block, min(Tk, block + left + right)) in fp32 and the cost is ~T·window.
  With dropout, the block's Philox words add a few int64 tiles of that shape.

Variable-length batches (``cu_seqlens_q`` / ``cu_seqlens_k``) loop over the sequences
in Python, each going through the dense code above; the offsets are read with one
``.tolist()`` per tensor. Head dims 1..256, dtypes fp16/bf16/fp32, computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fastattn.ops import _philox

_BLOCK = 256   # query rows per block of the blocked path, read at each call


@dataclass(frozen=True)
class _Variant:
    """The attention variant besides ``causal``. ``left``/``right``: the window, −1 for
    unbounded; ``alibi``: (B, H) or (H,) fp32 slopes, or None."""
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    alibi: Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0

    def with_causal(self, causal: bool) -> _Variant:
        """The window with causal folded in (flash-attn's rule: causal is the window
        (left, 0)); folding twice changes nothing."""
        if not causal:
            return self
        return replace(self, right=0 if self.right < 0 else min(self.right, 0))

    def plain(self) -> bool:
        """No window but the causal one, no softcap, alibi or dropout."""
        return (self.left < 0 and self.right in (-1, 0) and self.softcap == 0.0
                and self.alibi is None and self.dropout_p == 0.0)


def _variant(window, softcap: float, alibi: Tensor | None, dropout_p: float, seed: int,
             offset: int) -> _Variant:
    left, right = (max(int(w), -1) for w in window)
    slopes = None if alibi is None else alibi.float()
    return _Variant(left, right, float(softcap), slopes, float(dropout_p), int(seed),
                    int(offset))


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, *,
             window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
             alibi: Tensor | None = None, dropout_p: float = 0.0, seed: int = 0,
             offset: int = 0, cu_seqlens_q: Tensor | None = None,
             cu_seqlens_k: Tensor | None = None, max_seqlen_q: int = 0,
             max_seqlen_k: int = 0) -> tuple[Tensor, Tensor]:
    """Dense: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> o (B, H, Tq, D), lse (B, H, Tq).
    Varlen: q (total_q, H, D), k, v (total_k, Hkv, D) -> o (total_q, H, D),
    lse (H, total_q). o is contiguous in q.dtype, lse float32. ``alibi``: (B, H) slopes
    (possibly an expand of (H,)), or (H,).
    ``max_seqlen_*`` size the Triton grid; this backend does not need them."""
    if cu_seqlens_q is None and _plain_aten(q, k, causal, window, softcap, alibi, dropout_p):
        return _aten_fwd(q, k, v, causal, scale)                  # the common call, directly
    var = _variant(window, softcap, alibi, dropout_p, seed, offset)
    if cu_seqlens_q is not None:
        return _varlen_fwd(q, k, v, causal, scale, var, cu_seqlens_q, cu_seqlens_k)
    return _dense_fwd(q, k, v, causal, scale, var)


def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
             causal: bool, scale: float, *, window: tuple[int, int] = (-1, -1),
             softcap: float = 0.0, alibi: Tensor | None = None, dropout_p: float = 0.0,
             seed: int = 0, offset: int = 0, cu_seqlens_q: Tensor | None = None,
             cu_seqlens_k: Tensor | None = None, max_seqlen_q: int = 0,
             max_seqlen_k: int = 0, deterministic: bool = True
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv in the layouts of q, k, v (dense or varlen), contiguous, in the
    input dtype. The other arguments are those of the forward, and its o and lse;
    ``deterministic`` is accepted for the kernels' signature: this backward always is."""
    if cu_seqlens_q is None and _plain_aten(q, k, causal, window, softcap, alibi, dropout_p):
        return _aten_bwd(do, q, k, v, o, lse, causal, scale)
    var = _variant(window, softcap, alibi, dropout_p, seed, offset)
    if cu_seqlens_q is not None:
        return _varlen_bwd(do, q, k, v, o, lse, causal, scale, var, cu_seqlens_q,
                           cu_seqlens_k)
    return _dense_bwd(do, q, k, v, o, lse, causal, scale, var)


# ------------------------------------------------------------------ dense dispatch


def _plain_aten(q: Tensor, k: Tensor, causal: bool, window, softcap: float,
                alibi: Tensor | None, dropout_p: float) -> bool:
    """``_use_aten_cpu`` for the raw arguments, checked without building a ``_Variant``:
    the test that keeps the everyday call (no variant but the causal mask) cheap."""
    return (q.device.type == "cpu" and alibi is None and not softcap and not dropout_p
            and window[0] < 0 and (window[1] < 0 or (causal and window[1] == 0))
            and (not causal or q.shape[2] == k.shape[2]) and q.shape[2] > 0 and k.shape[2] > 0)


def _aten_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
              ) -> tuple[Tensor, Tensor]:
    """PyTorch's CPU flash kernel (its causal mask is the square one: Tq == Tk). Without
    a mask, the G query heads of a KV head are its G·Tq rows (``_rows_per_kv_head``):
    K/V are read once, not repeated G times (decoding against a GQA cache).

    fp16/bf16 run it on fp32 copies (O(T·D), never T×T): its reduced-precision backward
    sums dV and dQ in the input dtype (dV of 339 queries on one key: 0.25 off in bf16,
    where eager torch is exact), and the forward is upcast with it so both see one P."""
    if q.dtype != torch.float32:
        o, lse = _aten_fwd(q.float(), k.float(), v.float(), causal, scale)
        return o.to(q.dtype), lse
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    if not causal and hkv < h:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _rows_per_kv_head(q, hkv), k, v, 0.0, False, scale=scale)
        return o.reshape(b, h, tq, d), lse.float().reshape(b, h, tq)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, scale=scale)
    return o.contiguous(), lse.float().contiguous()


def _aten_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype != torch.float32:                  # fp32 accumulation (see _aten_fwd)
        grads = _aten_bwd(do.float(), q.float(), k.float(), v.float(), o.float(), lse,
                          causal, scale)
        return tuple(g.to(q.dtype) for g in grads)
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    if not causal and hkv < h:
        rows = [_rows_per_kv_head(x, hkv) for x in (do, q)]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            rows[0], rows[1], k, v, _rows_per_kv_head(o, hkv),
            lse.reshape(b, hkv, -1), 0.0, False, scale=scale)
        return dq.reshape(b, h, tq, d), dk.contiguous(), dv.contiguous()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, _expand_kv(k, h), _expand_kv(v, h), o, lse, 0.0, causal, scale=scale)
    return dq.contiguous(), _sum_groups(dk, hkv).contiguous(), _sum_groups(dv, hkv).contiguous()


def _rows_per_kv_head(x: Tensor, n_kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, G·T, D): a KV head's G query heads as rows of one head
    (exact without a mask, where a row's position does not matter)."""
    b, h, t, d = x.shape
    return x.reshape(b, n_kv_heads, (h // n_kv_heads) * t, d)


def _use_aten_cpu(q: Tensor, k: Tensor, var: _Variant) -> bool:
    """Whether PyTorch's CPU flash kernel computes this (``var`` with causal folded in)."""
    tq, tk = q.shape[2], k.shape[2]
    return (q.device.type == "cpu" and var.plain() and tq > 0 and tk > 0
            and (var.right < 0 or tq == tk))


def _dense_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, var: _Variant,
               batch0: int = 0) -> tuple[Tensor, Tensor]:
    """(B, H, Tq, D) attention; ``batch0`` is the batch index of q[0] in the dropout
    counter (the sequence index in varlen)."""
    folded = var.with_causal(causal)
    if _use_aten_cpu(q, k, folded):
        return _aten_fwd(q, k, v, folded.right == 0, scale)
    return _blocked_fwd(q, k, v, causal, scale, var, batch0)


def _dense_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
               causal: bool, scale: float, var: _Variant, batch0: int = 0
               ) -> tuple[Tensor, Tensor, Tensor]:
    folded = var.with_causal(causal)
    if _use_aten_cpu(q, k, folded):
        return _aten_bwd(do, q, k, v, o, lse, folded.right == 0, scale)
    return _blocked_bwd(do, q, k, v, o, lse, causal, scale, var, batch0)


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


# ------------------------------------------------------------------ blocked path


def _key_range(start: int, stop: int, tq: int, tk: int, var: _Variant) -> tuple[int, int]:
    """The keys [lo, hi) that query rows [start, stop) can see between them."""
    off = tk - tq
    lo = 0 if var.left < 0 else max(0, start + off - var.left)
    hi = tk if var.right < 0 else min(tk, stop + off + var.right)
    return lo, hi


def _block_scores(qb: Tensor, kb: Tensor, rows: Tensor, cols: Tensor, off: int, scale: float,
                  var: _Variant, slopes: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Scores x of one query block against its key range, in fp32, −inf where hidden.

    qb: (B, Hkv, G, m, D), kb: (B, Hkv, 1, n, D); rows (m, 1) and cols (n,) are the
    int64 positions inside the sequence; slopes (B, Hkv, G, 1, 1) or None.
    Returns x (B, Hkv, G, m, n) and, with softcap, tanh(s / softcap) for the backward.
    """
    # In-place steps on the fresh (B, Hkv, G, m, n) tile: each saves a pass of memory.
    x = (qb @ kb.transpose(-2, -1)).mul_(scale)                   # (B, Hkv, G, m, n)
    t = None
    if var.softcap > 0:
        t = x.div_(var.softcap).tanh_()
        x = t * var.softcap
    rel = rows + off - cols                                       # (m, n): i + off − j
    if slopes is not None:
        x.addcmul_(slopes, rel.abs().float(), value=-1.0)
    hidden = None
    if var.left >= 0:
        hidden = rel > var.left
    if var.right >= 0:
        hidden = (-rel > var.right) if hidden is None else hidden | (-rel > var.right)
    if hidden is not None:
        x.masked_fill_(hidden, float("-inf"))
    return x, t


def _probs(x: Tensor, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """P = exp(x − lse), computed in place of the scores x, and lse (computed here unless
    given). A row that sees no key (every x = −inf) gets P = 0 and lse = −inf, not NaN:
    its max or lse is replaced by 0 before the subtraction, and exp(−inf) = 0."""
    if lse is not None:
        return x.sub_(torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp_(), lse
    row_max = x.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    total = x.sub_(row_max).exp_().sum(dim=-1, keepdim=True)       # 0 for rows without keys
    x.mul_(torch.where(total > 0, 1.0 / total, 0.0))
    return x, (row_max + total.log()).squeeze(-1)


def _dropout_scale(var: _Variant, bh: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """keep / (1 − p) for the block, (B, Hkv, G, m, n) fp32, replayed from the seed."""
    keep = _philox.keep_mask(var.seed, var.offset, bh, rows, cols, var.dropout_p)
    return keep.float() * (1.0 / (1.0 - var.dropout_p))


def _grouped(x: Tensor, n_kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, G, T, D) in fp32, G = H // Hkv query heads per KV head."""
    b, h, t, d = x.shape
    return x.float().reshape(b, n_kv_heads, h // n_kv_heads, t, d)


def _head_params(q: Tensor, hkv: int, var: _Variant, batch0: int
                 ) -> tuple[Tensor | None, Tensor | None]:
    """Per query head: the alibi slopes and the dropout counter b·H + h, both shaped
    (B, Hkv, G, 1, 1) to broadcast over a block; None when unused."""
    b, h = q.shape[:2]
    slopes = None
    if var.alibi is not None:  # (B, H), or (H,) shared by the batch
        slopes = var.alibi.to(q.device).expand(b, h).reshape(b, hkv, h // hkv, 1, 1)
    bh = None
    if var.dropout_p > 0:
        bh = torch.arange(batch0 * h, (batch0 + b) * h, device=q.device)
        bh = bh.view(b, hkv, h // hkv, 1, 1)
    return slopes, bh


def _positions(start: int, stop: int, lo: int, hi: int, device) -> tuple[Tensor, Tensor]:
    return (torch.arange(start, stop, device=device)[:, None],
            torch.arange(lo, hi, device=device))


def _blocked_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                 var: _Variant = _Variant(), batch0: int = 0, block: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Dense (B, H, Tq, D) attention, ``block`` (default ``_BLOCK``) query rows at a time
    against their visible keys only; ``batch0`` as in ``_dense_fwd``."""
    var, block = var.with_causal(causal), block or _BLOCK
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg = _grouped(q, hkv)                                        # (B, Hkv, G, Tq, D)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]         # (B, Hkv, 1, Tk, D)
    slopes, bh = _head_params(q, hkv, var, batch0)
    o = q.new_zeros(b, hkv, h // hkv, tq, d, dtype=torch.float32)
    lse = q.new_full((b, hkv, h // hkv, tq), float("-inf"), dtype=torch.float32)
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        lo, hi = _key_range(start, stop, tq, tk, var)
        if hi <= lo:  # every row of this block sees no key: output 0, lse −inf
            continue
        rows, cols = _positions(start, stop, lo, hi, q.device)
        x, _ = _block_scores(qg[..., start:stop, :], kf[..., lo:hi, :], rows, cols,
                             tk - tq, scale, var, slopes)
        p, lse_b = _probs(x)
        lse[..., start:stop] = lse_b
        if bh is not None:
            p.mul_(_dropout_scale(var, bh, rows, cols))
        o[..., start:stop, :] = p @ vf[..., lo:hi, :]
    return o.reshape(b, h, tq, d).to(q.dtype), lse.reshape(b, h, tq)


def _blocked_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                 causal: bool, scale: float, var: _Variant = _Variant(), batch0: int = 0,
                 block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    var, block = var.with_causal(causal), block or _BLOCK
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)                 # (B, Hkv, G, Tq, D)
    lseg = lse.reshape(b, hkv, h // hkv, tq)
    # Δ_i = rowsum(dO_i ∘ O_i) = Σ_j P_ij dP̃_ij: the softmax VJP's correction term
    # (O is the dropped output, so this holds with dropout too).
    delta = (dog * _grouped(o, hkv)).sum(-1)                      # (B, Hkv, G, Tq)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]         # (B, Hkv, 1, Tk, D)
    slopes, bh = _head_params(q, hkv, var, batch0)
    dq = torch.zeros_like(qg)
    dk = q.new_zeros(b, hkv, tk, d, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        lo, hi = _key_range(start, stop, tq, tk, var)
        if hi <= lo:
            continue
        rows, cols = _positions(start, stop, lo, hi, q.device)
        qb, dob = qg[..., start:stop, :], dog[..., start:stop, :]
        x, t = _block_scores(qb, kf[..., lo:hi, :], rows, cols, tk - tq, scale, var, slopes)
        p, _ = _probs(x, lseg[..., start:stop])                   # (B, Hkv, G, m, n)
        dp = dob @ vf[..., lo:hi, :].transpose(-2, -1)            # (B, Hkv, G, m, n)
        p_kept = p
        if bh is not None:
            drop = _dropout_scale(var, bh, rows, cols)
            p_kept = p * drop
            dp.mul_(drop)
        dv[..., lo:hi, :] += (p_kept.transpose(-2, -1) @ dob).sum(2)
        ds = dp.sub_(delta[..., start:stop, None]).mul_(p)
        if t is not None:  # d/ds of softcap·tanh(s / softcap) = 1 − tanh²
            ds.mul_(t.square_().neg_().add_(1.0))
        dq[..., start:stop, :] = (ds @ kf[..., lo:hi, :]) * scale
        dk[..., lo:hi, :] += (ds.transpose(-2, -1) @ qb).sum(2) * scale
    return (dq.reshape(b, h, tq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))


# ------------------------------------------------------------------ variable length


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor):
    """(b, q rows, k rows) per sequence, from one ``.tolist()`` of each offset tensor."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        yield b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])


def _as_dense(x: Tensor, rows: slice) -> Tensor:
    """(total, H, D) rows of one sequence -> a (1, H, T, D) view."""
    return x[rows].transpose(0, 1)[None]


def _one_sequence(var: _Variant, b: int) -> _Variant:
    """Sequence b's variant: its row of (B, H) alibi slopes."""
    if var.alibi is None or var.alibi.dim() == 1:
        return var
    return replace(var, alibi=var.alibi[b:b + 1])


def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, var: _Variant,
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    total_q, h, d = q.shape
    o = q.new_zeros(total_q, h, d)
    lse = q.new_full((h, total_q), float("-inf"), dtype=torch.float32)
    for b, qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k):
        if qs.stop <= qs.start or ks.stop <= ks.start:  # no rows, or rows see no key
            continue
        ob, lb = _dense_fwd(_as_dense(q, qs), _as_dense(k, ks), _as_dense(v, ks), causal,
                            scale, _one_sequence(var, b), batch0=b)
        o[qs] = ob[0].transpose(0, 1)
        lse[:, qs] = lb[0]
    return o, lse


def _varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                causal: bool, scale: float, var: _Variant, cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    for b, qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k):
        if qs.stop <= qs.start or ks.stop <= ks.start:
            continue
        dqb, dkb, dvb = _dense_bwd(
            _as_dense(do, qs), _as_dense(q, qs), _as_dense(k, ks), _as_dense(v, ks),
            _as_dense(o, qs), lse[None, :, qs], causal, scale, _one_sequence(var, b),
            batch0=b)
        dq[qs], dk[ks], dv[ks] = (x[0].transpose(0, 1) for x in (dqb, dkb, dvb))
    return dq, dk, dv
