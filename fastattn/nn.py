"""``nn.Module``s on fastattn's ops, mirroring their torch counterparts.

Constructor arguments, parameter names and ``state_dict`` keys match torch's modules,
so weights load across both ways. Modules only call ops (``fastattn.ops``); which
kernel runs is the ops layer's backend choice (eager torch on CPU, Triton on CUDA).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends
from fastattn._warnings import warn_fallback
from fastattn.ops import registry
from fastattn.ops.flash_attention import HEAD_DIMS, flash_attention, head_dim_supported
from fastattn.ops import gelu as _gelu_ops
from fastattn.ops.gelu import bias_gelu, gelu
from fastattn.ops.kvcache import attend_cache, flash_attn_with_kvcache
from fastattn.ops.layer_norm import layer_norm, rms_norm
from fastattn.ops.rope import rope
from fastattn.ops.swiglu import ACTIVATIONS as _GATED_ACTIVATIONS
from fastattn.ops.swiglu import geglu, swiglu


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Preallocates (B, Hkv, max_len, D) buffers; ``append`` writes new positions and
    returns views of everything cached so far (no copy of the past). ``start`` (B,)
    int32, if given, is each row's first real position: a left-padded batch of prompts
    of different lengths keeps its pad positions in the buffers, and ``attend`` never
    lets a query see them.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=None, start: Tensor | None = None) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.length = max_len, 0
        if start is not None and tuple(start.shape) != (batch,):
            raise ValueError(f"start must have shape ({batch},), got {tuple(start.shape)}")
        self.start = None if start is None else start.to(device=device, dtype=torch.int32)
        # Set by ``place`` before a compiled decoding step: see ``attend``.
        self.column: Tensor | None = None
        self.span = max_len

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, Hkv, T, D) for the new positions. Returns (B, Hkv, length, D) views."""
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache holds at most {self.max_len} positions; appending "
                             f"{k.shape[2]} to {start} cached would make {stop}")
        self.k[:, :, start:stop] = k
        self.v[:, :, start:stop] = v
        self.length = stop
        return self.k[:, :, :stop], self.v[:, :, :stop]

    def attend(self, q: Tensor, k: Tensor, v: Tensor,
               attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Append k, v (B, Hkv, T, D) and return the causal attention (bottom-right) of
        q (B, H, T, D) over the cache: ``attend(q, keys, values)`` over the filled
        positions, or, with ``start``, ``flash_attn_with_kvcache`` with
        ``cache_leftpad=start``, which attends only positions ``start[b]..``.

        Under ``torch.compile`` after ``place``, the step keeps static shapes and stays
        one graph: k, v are written at the ``column`` tensor and fastattn's cache kernel
        attends the first ``span`` positions of the buffers, masked to the filled ones.
        Otherwise the cache runs eagerly, between the compiled parts."""
        if self.column is not None and torch.compiler.is_compiling():
            return self._attend_at_column(q, k, v)
        return self._attend_eager(q, k, v, attend)

    @staticmethod
    def place(caches: list[KVCache], length: int) -> None:
        """Before a compiled decoding step on ``caches`` filled to ``length``: the step
        writes at column ``length`` (a tensor, so moving on recompiles nothing) and
        attends a span of positions, a power of two above ``length`` (at least 64, at
        most ``max_len``), so the step recompiles only when the span doubles. Advances
        ``length`` (the compiled step cannot)."""
        column = torch.tensor([length], device=caches[0].k.device)
        span = min(caches[0].max_len, max(64, 1 << length.bit_length()))
        for cache in caches:
            cache.column, cache.span, cache.length = column, span, length + 1

    def _attend_at_column(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t = k.shape[2]
        columns = self.column + torch.arange(t, device=k.device)
        self.k.index_copy_(2, columns, k)
        self.v.index_copy_(2, columns, v)
        end = (self.column + t).to(torch.int32).expand(q.shape[0])
        keys, values = (x[:, :, :self.span].transpose(1, 2) for x in (self.k, self.v))
        out = attend_cache(q.transpose(1, 2), keys, values, end, self.start)
        return out.transpose(1, 2)                                   # (B, H, T, D)

    @torch.compiler.disable
    def _attend_eager(self, q: Tensor, k: Tensor, v: Tensor,
                      attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        keys, values = self.append(k, v)
        if self.start is None:
            return attend(q, keys, values)
        seqlens = torch.full((q.shape[0],), self.length, dtype=torch.int32, device=q.device)
        out = flash_attn_with_kvcache(q.transpose(1, 2), self.k.transpose(1, 2),
                                      self.v.transpose(1, 2), cache_seqlens=seqlens,
                                      cache_leftpad=self.start, causal=True)
        return out.transpose(1, 2)                                   # (B, H, T, D)

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    """GPT-style causal self-attention with one fused QKV projection.

    Args:
        d_model: model width C; must be divisible by ``n_heads``.
        n_heads: query heads H; head dim is C // H (any size from 1 to 256).
        dropout: dropout on the output projection (residual dropout). Dropout on the
            attention probabilities is not offered: the kernels never form them.
        bias: bias in both projections.
        n_kv_heads: key/value heads for grouped-query attention (default H); must divide H.

    Parameters: ``qkv_proj`` (Linear C → (H + 2·Hkv)·D, rows ordered q, k, v) and
    ``out_proj`` (Linear C → C). Input and output are (B, T, C).

    Rotary position embedding: ``forward(x, rotary=(cos, sin))`` turns q and k by the
    angles cos, sin (B or 1, T, R/2) (GPT-NeoX layout: the first R dims of each head, in
    halves; the rest pass through) before attention; keys enter a cache turned.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 n_kv_heads: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"n_heads must be a positive divisor of d_model={d_model}, "
                             f"got {n_heads}")
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads must be a positive divisor of n_heads={n_heads}, "
                             f"got {n_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        qkv_dim = (n_heads + 2 * n_kv_heads) * self.head_dim
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(d_model, qkv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)

    def _qkv(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                       # (B, T, (H + 2Hkv)·D)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)                       # (B, H, T, D)
        k = k.view(b, t, hkv, d).transpose(1, 2)                     # (B, Hkv, T, D)
        v = v.view(b, t, hkv, d).transpose(1, 2)                     # (B, Hkv, T, D)
        if rotary is not None:
            q, k = self._rotate(q, k, *rotary)
        return q, k, v

    def _rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, H, T, D) and k (B, Hkv, T, D) turned by the angles cos, sin (B or 1, T,
        R/2), one launch for both; the textbook GPT overrides it."""
        return rope(q, k, cos, sin, rotary_dim=2 * cos.shape[-1])

    def forward(self, x: Tensor, cache: KVCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, T, C) -> (B, T, C). With a ``cache``, x holds only the new positions: their
        keys/values are appended and the queries attend to the whole cache (the causal
        mask is aligned bottom-right, so T = 1 is plain decoding). ``rotary``: the
        (cos, sin) angles of x's positions (see the class docstring)."""
        b, t, c = x.shape
        q, k, v = self._qkv(x, rotary)
        if cache is None:
            y = self._attend(q, k, v)                                # (B, H, T, D)
        else:
            y = cache.attend(q, k, v, self._attend)                  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, c)                       # (B, T, C)
        return self.dropout(self.out_proj(y))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention, aligned bottom-right; the textbook GPT overrides it.

        One query (a decoding step against the cache) is the last position and sees
        every key: it runs unmasked, which on CPU takes torch's flash kernel instead of
        the blocked path that a bottom-right mask with Tq != Tk needs."""
        return flash_attention(q, k, v, causal=q.shape[2] > 1)

    @torch.no_grad()
    def sink_share(self, x: Tensor, n_sink: int = 1,
                   rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Share of each head's attention that lands on the first ``n_sink`` keys, averaged
        over queries: (H,). Computed from the kernel's log-sum-exp and the first keys,
        ``Σ_{j<n} exp(scale·q_i·k_j − lse_i)``, so it never forms the T×T matrix."""
        q, k, v = self._qkv(x, rotary)
        _, lse = flash_attention(q, k, v, causal=True, return_lse=True)     # (B, H, T)
        groups = self.n_heads // self.n_kv_heads
        first = k[:, :, :n_sink].repeat_interleave(groups, dim=1)         # (B, H, n, D)
        s = (q.float() @ first.float().transpose(-2, -1)) * self.head_dim ** -0.5
        # Query i only sees keys j <= i: mask the sink keys a query cannot see yet.
        t = q.shape[2]
        visible = torch.arange(n_sink, device=x.device)[None, :] <= torch.arange(
            t, device=x.device)[:, None]                                  # (T, n)
        share = (torch.exp(s - lse[..., None]) * visible).sum(-1)         # (B, H, T)
        return share.mean(dim=(0, 2))

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return f"d_model={self.d_model}, n_heads={self.n_heads}{kv}"


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (same constructor, parameters,
    ``state_dict`` keys, ``batch_first``, returned ``(output, weights)`` tuple).

    The fast path — fastattn's kernel — serves calls with ``need_weights=False``, no
    ``key_padding_mask``, no ``attn_mask`` other than a causal one flagged by
    ``is_causal=True`` (an ``attn_mask`` passed with ``is_causal=True`` is taken as the
    hint torch documents it to be and not read), no ``add_bias_kv``/``add_zero_attn``, no
    attention dropout while training, and a supported head dim. Anything else runs
    torch's implementation, with a one-time ``FallbackWarning`` naming the reason; note
    that torch's default ``need_weights=True`` needs the full attention matrix.
    """

    def _unsupported(self, query: Tensor, key: Tensor, key_padding_mask, need_weights: bool,
                     attn_mask, is_causal: bool) -> str | None:
        if need_weights:
            return "need_weights=True (returning attention weights needs the T×T matrix)"
        if key_padding_mask is not None:
            return "key_padding_mask is not supported by the fast path"
        if attn_mask is not None and not is_causal:
            return "attn_mask without is_causal=True is not supported by the fast path"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by the fast path"
        if self.dropout > 0.0 and self.training:
            return f"attention dropout={self.dropout} in training mode"
        if not head_dim_supported(self.head_dim):
            return f"head dim {self.head_dim} (the fast path takes {HEAD_DIMS})"
        if query.dim() not in (2, 3):
            return f"query with {query.dim()} dimensions"
        t_dim = 0 if query.dim() == 2 or not self.batch_first else 1
        if is_causal and query.shape[t_dim] != key.shape[t_dim]:
            # torch aligns its causal mask top-left when lengths differ; fastattn bottom-right.
            return "is_causal with query length != key length"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        reason = self._unsupported(query, key, key_padding_mask, need_weights, attn_mask,
                                   is_causal)
        if reason is not None:
            warn_fallback("fastattn.nn.MultiheadAttention", reason)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:                                # (T, E) -> (1, T, E) / (T, 1, E)
            query, key, value = (x.unsqueeze(0 if self.batch_first else 1)
                                 for x in (query, key, value))
        if not self.batch_first:                     # (T, B, E) -> (B, T, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out = self._attend(query, key, value, is_causal)             # (B, Tq, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, causal: bool) -> Tensor:
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        b, tq, tk = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, w_q, b_q).view(b, tq, h, d).transpose(1, 2)   # (B, H, Tq, D)
        k = F.linear(key, w_k, b_k).view(b, tk, h, d).transpose(1, 2)     # (B, H, Tk, D)
        v = F.linear(value, w_v, b_v).view(b, tk, h, d).transpose(1, 2)   # (B, H, Tk, D)
        y = flash_attention(q, k, v, causal=causal)                       # (B, H, Tq, D)
        y = y.transpose(1, 2).reshape(b, tq, e)                           # (B, Tq, E)
        return self.out_proj(y)


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (same constructor, parameters and keys) on
    fastattn's kernel. ``forward(x, residual)`` normalises ``x + residual`` in one pass;
    with ``return_residual=True`` it also returns that sum (the pre-LN residual stream).
    """

    def forward(self, input: Tensor, residual: Tensor | None = None,
                return_residual: bool = False):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, return_residual=return_residual)


class RMSNorm(nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` on fastattn's kernel, with the same fused
    ``residual`` option as ``LayerNorm``."""

    def forward(self, input: Tensor, residual: Tensor | None = None,
                return_residual: bool = False):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, return_residual=return_residual)


class GELU(nn.GELU):
    """Drop-in for ``torch.nn.GELU(approximate="none" | "tanh")`` on fastattn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, self.approximate)


registry.replaces_module("attention", nn.MultiheadAttention, MultiheadAttention)
registry.replaces_module("layer_norm", nn.LayerNorm, LayerNorm)
registry.replaces_module("rms_norm", nn.RMSNorm, RMSNorm)
registry.replaces_module("gelu", nn.GELU, GELU)


class LinearGELU(nn.Linear):
    """``gelu(x @ W.T + b)`` with ``nn.Linear``'s parameters; the bias add is fused into
    the GELU kernel (forward and backward), saving one pass over the (…, out) activation.
    On the ``torch`` backend, which has no such kernel, the bias goes into the matmul
    (``addmm``) instead, as eager PyTorch does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, approximate: str = "none") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: Tensor) -> Tensor:
        if self.bias is None or backends.resolve(
                _gelu_ops.OP, input.device, _gelu_ops.BACKENDS) == "torch":
            return gelu(F.linear(input, self.weight, self.bias), self.approximate)
        y = F.linear(input, self.weight)                             # (…, out), no bias yet
        return bias_gelu(y, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


class MLP(nn.Module):
    """The GPT feed-forward: ``proj(gelu(fc(x)))`` then dropout, with the first bias add
    fused into the GELU. Parameters ``fc`` (C → hidden) and ``proj`` (hidden → C)."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0,
                 bias: bool = True, approximate: str = "none", device=None, dtype=None) -> None:
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        factory = {"device": device, "dtype": dtype}
        self.fc = LinearGELU(d_model, hidden, bias=bias, approximate=approximate, **factory)
        self.proj = nn.Linear(hidden, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.fc(x)))                   # (B, T, C)


class SwiGLU(nn.Module):
    """``act(gate) · up`` in one pass, forward and backward (``fastattn.ops.swiglu``):
    ``activation`` ``"silu"`` (SwiGLU), ``"gelu"`` or ``"gelu_tanh"`` (GEGLU). No
    parameters. ``forward(gate, up)`` takes two (…, N) tensors, ``forward(x)`` one
    (…, 2N) tensor split into gate and up halves. A LlamaMLP-style forward becomes
    ``down_proj(swiglu(gate_proj(x), up_proj(x)))``."""

    def __init__(self, activation: str = "silu") -> None:
        super().__init__()
        if activation not in _GATED_ACTIVATIONS:
            raise ValueError(f"activation must be one of {_GATED_ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, gate: Tensor, up: Tensor | None = None) -> Tensor:
        if self.activation == "silu":
            return swiglu(gate, up)
        return geglu(gate, up, "tanh" if self.activation == "gelu_tanh" else "none")

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLUMLP(nn.Module):
    """The Llama feed-forward, ``down_proj(act(gate_proj(x)) · up_proj(x))``, with the
    gate fused (``SwiGLU``). Parameters and ``state_dict`` keys are those of
    transformers' ``LlamaMLP``: ``gate_proj``, ``up_proj`` (C → hidden), ``down_proj``
    (hidden → C), biases when ``bias=True`` (Llama's ``mlp_bias``). x: (…, C).
    ``dropout`` (the GPT's residual dropout, after ``down_proj``) has no parameters."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: str = "silu", device=None, dtype=None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.act = SwiGLU(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))      # (…, C)
        return self.dropout(y)


NORMS = ("layer", "rms")
MLPS = ("gelu", "swiglu")


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width for model width C: ``8·C/3`` (two thirds of the GELU MLP's
    4·C, so its three matrices hold as many weights as the GELU MLP's two), rounded up
    to a multiple of ``multiple_of``. Llama rounds to 256 at its widths (4096 → 11008);
    64 keeps small models near 8·C/3 (64 → 192, where 256 would give 4·C)."""
    return -(-(8 * d_model // 3) // multiple_of) * multiple_of


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class Block(nn.Module):
    """Pre-LN transformer block: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``.

    The first residual add is fused into ``ln2`` (one pass computes both ``h`` and
    ``ln2(h)``). Parameters ``ln1``, ``attn`` (``CausalSelfAttention``), ``ln2``, ``mlp``.

    ``norm``: ``"layer"`` (``LayerNorm``, GPT-2) or ``"rms"`` (``RMSNorm``, Llama; no
    bias whatever ``bias`` says). ``mlp``: ``"gelu"`` (``MLP``) or ``"swiglu"``
    (``SwiGLUMLP``, hidden width ``mlp_hidden``, default ``swiglu_hidden(d_model)``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 n_kv_heads: int | None = None, mlp_hidden: int | None = None,
                 approximate: str = "none", eps: float = 1e-5, device=None, dtype=None,
                 norm: str = "layer", mlp: str = "gelu") -> None:
        super().__init__()
        _check_choice("norm", norm, NORMS)
        _check_choice("mlp", mlp, MLPS)
        factory = {"device": device, "dtype": dtype}
        self.ln1 = _norm(norm, d_model, eps, bias, factory)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout=dropout, bias=bias,
                                        n_kv_heads=n_kv_heads, **factory)
        self.ln2 = _norm(norm, d_model, eps, bias, factory)
        if mlp == "gelu":
            self.mlp = MLP(d_model, mlp_hidden, dropout=dropout, bias=bias,
                           approximate=approximate, **factory)
        else:
            hidden = swiglu_hidden(d_model) if mlp_hidden is None else mlp_hidden
            self.mlp = SwiGLUMLP(d_model, hidden, bias=bias, dropout=dropout, **factory)

    def forward(self, x: Tensor, cache: KVCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        a = self.attn(self.ln1(x), cache, rotary)                    # (B, T, C)
        # Under autocast a is in the autocast dtype and the residual stream x keeps its
        # own: the sum takes the promoted dtype, as eager x + a would.
        if a.dtype != x.dtype:
            dtype = torch.promote_types(a.dtype, x.dtype)
            a, x = a.to(dtype), x.to(dtype)
        y, h = self.ln2(a, residual=x, return_residual=True)          # h = x + a
        return h + self.mlp(y)


def _norm(kind: str, d_model: int, eps: float, bias: bool, factory: dict) -> nn.Module:
    if kind == "rms":
        return RMSNorm(d_model, eps=eps, **factory)
    return LayerNorm(d_model, eps=eps, bias=bias, **factory)


__all__ = ["Block", "CausalSelfAttention", "GELU", "KVCache", "LayerNorm", "LinearGELU", "MLP",
           "MultiheadAttention", "RMSNorm", "SwiGLU", "SwiGLUMLP", "swiglu_hidden"]
