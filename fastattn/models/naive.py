"""The textbook twin of the fast GPT's blocks, from ``torch.nn`` pieces.

Each class has the parameter names and shapes of its ``fastattn.nn`` counterpart, so one
state dict loads into either model: ``NaiveCausalSelfAttention`` materialises the
(B, H, T, T) softmax (``fastattn.reference.naive_attention``) and turns q, k with the
textbook ``x·cos + rotate_half(x)·sin``; ``NaiveMLP`` is ``nn.Linear`` + ``nn.GELU``;
``NaiveSwiGLUMLP`` is ``F.silu(gate) * up``; ``NaiveRMSNorm`` writes out
``x · rsqrt(mean(x²) + eps) · w``; ``NaiveBlock`` puts them together as ``fastattn.nn.Block``
does, without the fused residual add. The benchmarks' baseline, and what tests compare
the fast model against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastattn import nn as fnn
from fastattn.reference import naive_attention


class NaiveCausalSelfAttention(fnn.CausalSelfAttention):
    """Textbook causal self-attention: the (B, H, T, T) scores are masked with ``-inf``
    above the diagonal and softmaxed. Parameters, projections and cache handling are
    ``fastattn.nn.CausalSelfAttention``'s; only the attention and the rotary turn differ."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return naive_attention(q, k, v, causal=True)

    def _rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Textbook rotary embedding (GPT-NeoX): ``x·cos + rotate_half(x)·sin`` on the
        first R dims with full-width (…, R) tables, the rest passed through."""
        r = 2 * cos.shape[-1]
        cos = torch.cat((cos, cos), dim=-1)[:, None]                 # (B|1, 1, T, R)
        sin = torch.cat((sin, sin), dim=-1)[:, None]

        def turn(x: Tensor) -> Tensor:
            x_rot, x_pass = x[..., :r], x[..., r:]
            x1, x2 = x_rot.chunk(2, dim=-1)
            rotate_half = torch.cat((-x2, x1), dim=-1)
            return torch.cat((x_rot * cos + rotate_half * sin, x_pass), dim=-1).to(x.dtype)

        return turn(q), turn(k)

    def attention_probs(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None
                        ) -> Tensor:
        """The explicit causal softmax matrix of x (B, T, C): (B, H, T, T)."""
        q, k, _ = self._qkv(x, rotary)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        t = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5      # (B, H, T, T)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        return scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1)

    @torch.no_grad()
    def sink_share(self, x: Tensor, n_sink: int = 1,
                   rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Share of each head's attention on the first ``n_sink`` keys, averaged over
        batch and queries, read off the explicit softmax: (H,)."""
        return self.attention_probs(x, rotary)[..., :n_sink].sum(-1).mean(dim=(0, 2))


class NaiveMLP(nn.Module):
    """Linear -> GELU -> Linear -> dropout, parameters named as ``fastattn.nn.MLP``."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0,
                 bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class NaiveSwiGLUMLP(nn.Module):
    """``down_proj(F.silu(gate_proj(x)) * up_proj(x))`` -> dropout, parameters named as
    ``fastattn.nn.SwiGLUMLP`` (transformers' ``LlamaMLP``)."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class NaiveRMSNorm(nn.RMSNorm):
    """``x · rsqrt(mean(x²) + eps) · weight`` written out; ``nn.RMSNorm``'s parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NaiveBlock(nn.Module):
    """Pre-LN transformer block from ``torch.nn`` pieces; parameters as ``fastattn.nn.Block``
    (``norm`` and ``mlp`` as there)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 n_kv_heads: int | None = None, mlp_hidden: int | None = None,
                 approximate: str = "none", eps: float = 1e-5, norm: str = "layer",
                 mlp: str = "gelu") -> None:
        super().__init__()
        self.ln1 = naive_norm(norm, d_model, eps, bias)
        self.attn = NaiveCausalSelfAttention(d_model, n_heads, dropout, bias, n_kv_heads)
        self.ln2 = naive_norm(norm, d_model, eps, bias)
        if mlp == "gelu":
            self.mlp = NaiveMLP(d_model, mlp_hidden, dropout, bias, approximate)
        elif mlp == "swiglu":
            hidden = fnn.swiglu_hidden(d_model) if mlp_hidden is None else mlp_hidden
            self.mlp = NaiveSwiGLUMLP(d_model, hidden, dropout, bias)
        else:
            raise ValueError(f"mlp must be one of {fnn.MLPS}, got {mlp!r}")

    def forward(self, x: Tensor, cache: fnn.KVCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache=cache, rotary=rotary)
        return x + self.mlp(self.ln2(x))


def naive_norm(kind: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rms":
        return NaiveRMSNorm(d_model, eps=eps)
    raise ValueError(f"norm must be one of {fnn.NORMS}, got {kind!r}")


__all__ = ["NaiveBlock", "NaiveCausalSelfAttention", "NaiveMLP", "NaiveRMSNorm",
           "NaiveSwiGLUMLP", "naive_norm"]
