"""A GPT (decoder-only transformer) on fastattn's kernels, and its textbook twin.

``GPTConfig.attention`` picks the blocks:

* ``"fast"``: ``fastattn.nn.Block`` — flash attention (no T×T matrix), fastattn's
  LayerNorm with the first residual add fused into ``ln2``, a fused Linear + GELU.
* ``"naive"``: ``NaiveBlock`` below — ``nn.LayerNorm``, attention that materialises the
  (B, H, T, T) softmax with ``masked_fill(-inf)`` (``fastattn.reference.naive_attention``),
  ``nn.Linear`` + ``nn.GELU``: the model users already have, and the benchmarks' baseline.

Both have the same parameter names and shapes (``blocks.i.ln1``, ``blocks.i.attn.qkv_proj``,
``blocks.i.attn.out_proj``, ``blocks.i.ln2``, ``blocks.i.mlp.fc``, ``blocks.i.mlp.proj``),
so one state dict loads into either and they compute the same function.

Architecture (GPT-2): token + learned position embeddings, dropout, ``n_layer`` pre-LN
blocks, a final LayerNorm, and an output head tied to the token embedding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastattn import nn as fnn
# The filters lived here before generate.py; still importable from this module.
from fastattn.models.generate import (apply_repetition_penalty, next_token, top_k_filter,
                                      top_p_filter)
from fastattn.ops.flash_attention import HEAD_DIMS, head_dim_supported
from fastattn.ops.linear_cross_entropy import linear_cross_entropy
from fastattn.reference import naive_attention

ATTENTION = ("fast", "naive")
APPROXIMATE = ("none", "tanh")


@dataclass
class GPTConfig:
    vocab_size: int = 256                  # bytes; a BPE tokenizer sets its own
    block_size: int = 256                  # longest sequence (position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None           # grouped-query attention; None = n_head
    n_embd: int = 256
    mlp_hidden: int | None = None          # None = 4 * n_embd
    dropout: float = 0.0                   # embedding and residual dropout
    bias: bool = True                      # in Linears and LayerNorms
    attention: str = "fast"                # "fast" (fastattn) or "naive" (textbook)
    approximate: str = "none"              # GELU: "none" (erf) or "tanh"
    checkpointing: bool = False            # recompute each block in backward
    eps: float = 1e-5                      # LayerNorm
    fused_loss: bool = True                # fast model: LM head + loss fused, in chunks

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.approximate not in APPROXIMATE:
            raise ValueError(f"approximate must be one of {APPROXIMATE}, "
                             f"got {self.approximate!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_head must divide n_embd={self.n_embd}, got {self.n_head}")
        d = self.head_dim
        if not head_dim_supported(d):
            raise ValueError(f"head dim n_embd / n_head = {self.n_embd} / {self.n_head} = {d} "
                             f"must be {HEAD_DIMS}")
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv != 0:
            raise ValueError(f"n_kv_head must be a positive divisor of n_head={self.n_head}, "
                             f"got {self.n_kv_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A preset (``tiny``, ``small``, ``gpt2``) with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # Seconds on a laptop CPU: the smoke test and the CI run.
    "tiny": dict(block_size=128, n_layer=2, n_head=4, n_embd=64),
    # Minutes on a CPU, a character-level model that writes plausible code.
    "small": dict(block_size=512, n_layer=6, n_head=6, n_embd=384, dropout=0.1),
    # GPT-2 small, 124M parameters with its 50257-token vocabulary.
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


# ------------------------------------------------------------------ naive blocks


class NaiveCausalSelfAttention(fnn.CausalSelfAttention):
    """Textbook causal self-attention: the (B, H, T, T) scores are masked with ``-inf``
    above the diagonal and softmaxed. Parameters, projections and cache handling are
    ``fastattn.nn.CausalSelfAttention``'s; only the attention itself differs."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return naive_attention(q, k, v, causal=True)

    def attention_probs(self, x: Tensor) -> Tensor:
        """The explicit causal softmax matrix of x (B, T, C): (B, H, T, T)."""
        q, k, _ = self._qkv(x)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        t = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5      # (B, H, T, T)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        return scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1)

    @torch.no_grad()
    def sink_share(self, x: Tensor, n_sink: int = 1) -> Tensor:
        """Share of each head's attention on the first ``n_sink`` keys, averaged over
        batch and queries, read off the explicit softmax: (H,)."""
        return self.attention_probs(x)[..., :n_sink].sum(-1).mean(dim=(0, 2))


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


class NaiveBlock(nn.Module):
    """Pre-LN transformer block from ``torch.nn`` pieces; parameters as ``fastattn.nn.Block``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 n_kv_heads: int | None = None, mlp_hidden: int | None = None,
                 approximate: str = "none", eps: float = 1e-5) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.attn = NaiveCausalSelfAttention(d_model, n_heads, dropout, bias, n_kv_heads)
        self.ln2 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.mlp = NaiveMLP(d_model, mlp_hidden, dropout, bias, approximate)

    def forward(self, x: Tensor, cache: fnn.KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache=cache)
        return x + self.mlp(self.ln2(x))


# -------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    """GPT-2 style language model; ``config.attention`` chooses fast or naive blocks."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        fast = c.attention == "fast"
        block, norm = (fnn.Block, fnn.LayerNorm) if fast else (NaiveBlock, nn.LayerNorm)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            block(c.n_embd, c.n_head, dropout=c.dropout, bias=c.bias, n_kv_heads=c.n_kv_head,
                  mlp_hidden=c.mlp_hidden, approximate=c.approximate, eps=c.eps)
            for _ in range(c.n_layer))
        self.ln_f = norm(c.n_embd, eps=c.eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight           # tied: one (V, C) matrix
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: matrices and embeddings N(0, 0.02), the residual projections
        (``attn.out_proj``, ``mlp.proj``) N(0, 0.02 / sqrt(2·n_layer)) because each block
        adds two of them to the residual stream; biases 0, LayerNorm gains 1.
        Set by parameter name and shape, so fast and naive models initialise alike."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("attn.out_proj.weight", "mlp.proj.weight"))
                nn.init.normal_(p, mean=0.0, std=residual_std if residual else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    # ---------------------------------------------------------------- forward

    def _hidden(self, idx: Tensor, caches: list[fnn.KVCache] | None = None,
                pos: Tensor | None = None) -> Tensor:
        """Token ids (B, T) at positions ``pos`` ((T,) or (B, T); default 0..T-1) ->
        final-LayerNorm output (B, T, C)."""
        t = idx.shape[1]
        if pos is None:
            if t > self.config.block_size:
                raise ValueError(f"sequence length {t} exceeds the model's block_size "
                                 f"{self.config.block_size} (its number of position "
                                 "embeddings)")
            pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                  # (B, T, C)
        recompute = self.config.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if recompute and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache=cache)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size. Returns logits (B, T, V) and,
        with ``targets`` (B, T) (``-1`` = ignore), the mean cross-entropy in float32.

        The fast model with ``config.fused_loss`` computes the loss with
        ``linear_cross_entropy`` (the LM head and the loss in chunks of tokens, never the
        (B·T, V) logits) and then returns ``None`` for the logits; the naive model keeps
        the textbook ``lm_head`` + ``cross_entropy``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        hidden = self._hidden(idx)                                   # (B, T, C)
        if targets is not None and self.config.fused_loss and self.config.attention == "fast":
            return None, linear_cross_entropy(hidden, self.lm_head.weight, targets,
                                              ignore_index=-1)
        logits = self.lm_head(hidden)                                # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------- generation

    def make_caches(self, batch: int, max_len: int, device, dtype,
                    start: Tensor | None = None) -> list[fnn.KVCache]:
        """One preallocated ``KVCache`` per layer; ``start`` (B,): each row's first real
        position (left padding)."""
        c = self.config
        return [fnn.KVCache(batch, c.kv_heads, max_len, c.head_dim, device=device, dtype=dtype,
                            start=start) for _ in range(c.n_layer)]

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.wte.weight.dtype

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, eos: int | None = None,
                 seed: int | None = None, use_cache: bool = True,
                 prompt_lengths: Tensor | list[int] | None = None,
                 compile: bool = False) -> Tensor:
        """Continue each row of ``idx`` (B, T0) by up to ``max_new_tokens`` tokens.

        Each step: repetition penalty over all tokens so far (prompt included), then
        greedy ``argmax`` if ``temperature == 0``, else divide by the temperature, apply
        top-k and top-p, and sample (from a ``torch.Generator`` seeded with ``seed``, so
        a seed reproduces the output; None uses torch's global generator).

        With ``use_cache`` the prompt is run once (prefill) into a per-layer
        ``KVCache`` and every later step feeds one token (query length 1 against the
        cache). The model sees at most the last ``block_size`` tokens: once the cache is
        full each step recomputes that window (positions shift), exactly what
        ``use_cache=False`` does every step, so both give the same tokens. The naive
        model runs the same cache with its textbook attention (a 1 × L score row).

        ``prompt_lengths`` (B,): prompts of different lengths, left-padded in ``idx``:
        row b's prompt is its last ``prompt_lengths[b]`` tokens. The pad positions stay
        in the cache but are never attended (``KVCache.start``), positions count from
        each row's first real token, and the repetition penalty ignores the pads, so
        each row gets the tokens it would get alone. Needs ``use_cache`` and the fast
        model.

        ``compile``: run the one-token decoding step through ``torch.compile`` with
        static shapes (a (B, 1) token and its positions against the preallocated cache;
        the cache attention itself runs eagerly between the compiled parts, see
        ``KVCache.attend``); on CUDA with CUDA graphs (mode ``"reduce-overhead"``), as
        gpt-fast does. The first call compiles (seconds to a minute); the tokens are the
        same as without it.

        ``eos``: a row that emits it is finished, and is padded with ``eos`` while others
        go on; generation stops early when every row is finished.
        Returns (B, T0 + n) with n <= max_new_tokens. Leaves the model's mode as it was.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if compile and not use_cache:
            raise ValueError("compile=True compiles the cached decoding step: it needs "
                             "use_cache=True")
        pads = self._pads(idx, prompt_lengths, use_cache)
        was_training = self.training
        self.eval()
        try:
            return self._generate(idx, max_new_tokens, temperature, top_k, top_p,
                                  repetition_penalty, eos, seed, use_cache, pads, compile)
        finally:
            self.train(was_training)

    def _pads(self, idx: Tensor, prompt_lengths, use_cache: bool) -> Tensor | None:
        """Left-padding of each row, (B,) int64, from ``prompt_lengths``; None without."""
        if prompt_lengths is None:
            return None
        lengths = torch.as_tensor(prompt_lengths, device=idx.device)
        b, t0 = idx.shape
        if lengths.shape != (b,) or lengths.is_floating_point():
            raise ValueError(f"prompt_lengths must be {b} integers (one per row of idx), got "
                             f"{prompt_lengths!r}")
        if bool(((lengths < 1) | (lengths > t0)).any()):
            raise ValueError(f"prompt_lengths must be in [1, {t0}] (idx's length), got "
                             f"{lengths.tolist()}")
        if not use_cache or self.config.attention != "fast":
            raise ValueError("prompt_lengths (left-padded prompts) is served by the fast "
                             "model's KV cache: pass use_cache=True and use attention='fast'")
        return t0 - lengths.long()

    def _decode_step(self, token: Tensor, pos: Tensor, caches: list[fnn.KVCache]) -> Tensor:
        """One decoding step: token (B, 1) at positions pos ((1,) or (B, 1)) against the
        caches -> next-token logits (B, V) in float32."""
        return self.lm_head(self._hidden(token, caches, pos)[:, -1]).float()

    def _compiled_decode_step(self, device: torch.device):
        """``_decode_step`` through ``torch.compile`` (made once per model and device
        type): static shapes, CUDA graphs on CUDA."""
        steps = self.__dict__.setdefault("_compiled_steps", {})
        if device.type not in steps:
            mode = "reduce-overhead" if device.type == "cuda" else None
            steps[device.type] = torch.compile(self._decode_step, mode=mode, dynamic=False)
        return steps[device.type]

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                  eos, seed, use_cache, pads, compile) -> Tensor:
        bs = self.config.block_size
        gen = None if seed is None else torch.Generator(idx.device).manual_seed(seed)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        step = self._compiled_decode_step(idx.device) if compile else self._decode_step
        caches = None
        out = idx
        for _ in range(max_new_tokens):
            window = out[:, -bs:]
            # Left padding inside the window: the columns before each row's first token.
            pad = None if pads is None else (pads - (out.shape[1] - window.shape[1])).clamp(
                min=0)
            if not use_cache:
                logits = self.lm_head(self._hidden(window)[:, -1]).float()
            elif caches is None or caches[0].length == bs:
                # Prefill, or the window slid: recompute the last block_size tokens.
                if caches is None:
                    caches = self.make_caches(out.shape[0], bs, out.device,
                                              self._compute_dtype(out.device))
                for cache in caches:
                    cache.reset()
                    cache.start = None if pad is None else pad.to(torch.int32)
                pos = _positions(0, window.shape[1], pad, out.device)
                logits = self.lm_head(self._hidden(window, caches, pos)[:, -1]).float()
            else:
                # The last token as its own (B, 1) tensor, not a view of the growing
                # ``out``, whose strides would change every step (and recompile).
                logits = step(out[:, -1:].clone(memory_format=torch.contiguous_format),
                              _positions(caches[0].length, 1, pad, out.device),
                              caches)                                 # (B, V)
            seen = out if pads is None or repetition_penalty == 1.0 else _real(out, pads)
            nxt = next_token(logits, seen, temperature, top_k, top_p,
                             repetition_penalty, gen)                 # (B,)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
                finished |= nxt == eos
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos is not None and bool(finished.all()):
                break
        return out

    # ------------------------------------------------------------ diagnostics

    @torch.no_grad()
    def sink_shares(self, idx: Tensor, n_sink: int = 1) -> Tensor:
        """Attention-sink diagnostic: for every layer and head, the share of attention
        that lands on the first ``n_sink`` tokens, averaged over the batch and all
        query positions: (n_layer, n_head) float32.

        Each block's ``attn.sink_share`` gets that block's ``ln1`` output. The fast
        model reads it from the attention kernel's log-sum-exp (no T×T matrix, so it
        works at any context length); the naive one from its explicit softmax.
        Runs in eval mode (no dropout); leaves the model's mode as it was.
        """
        if not 1 <= n_sink <= idx.shape[1]:
            raise ValueError(f"n_sink must be in [1, T={idx.shape[1]}], got {n_sink}")
        was_training = self.training
        self.eval()
        try:
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)                         # (B, T, C)
            shares = []
            for block in self.blocks:
                shares.append(block.attn.sink_share(block.ln1(x), n_sink).float())
                x = block(x)
            return torch.stack(shares)                                # (L, H)
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- counting

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied head counted once). ``non_embedding`` leaves out
        the token and position embeddings (Kaplan et al.'s N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM's formula (appendix B):

            6·N + 12·L·H·Q·T

        N = the parameters used in matmuls: the non-embedding ones plus the output head
        (V·C, tied to the token embedding, so not in ``num_params()``); 6 = 2 (multiply-
        add) × 3 (forward, and backward twice). 12·L·H·Q·T is attention's two T×T matmuls
        (Q = head dim, T = ``seq_len``, default block_size), counted in full, as PaLM and
        nanoGPT do, although the causal kernels skip half of them: MFU numbers stay
        comparable with theirs.
        """
        c = self.config
        t = c.block_size if seq_len is None else seq_len
        n = self.num_params(non_embedding=True) + c.vocab_size * c.n_embd
        return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_dim * t

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float,
                     seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: ``flops_per_token(seq_len) · tokens/s / peak_flops``
        (peak in FLOP/s, e.g. 989e12 for an H100 SXM in bf16)."""
        if peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


def _positions(first: int, n: int, pad: Tensor | None, device: torch.device) -> Tensor:
    """Position ids of the cache columns first .. first + n - 1: (n,), or (B, n) counted
    from each row's first real token with left padding ``pad`` (B,) (pads get 0)."""
    cols = torch.arange(first, first + n, device=device)
    return cols if pad is None else (cols[None, :] - pad[:, None]).clamp(min=0)


def _real(tokens: Tensor, pads: Tensor) -> Tensor:
    """tokens (B, L) with each row's left padding replaced by its first real token, so
    that a repetition penalty counts only real tokens (it counts each id once)."""
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    first = tokens.gather(1, pads[:, None])                           # (B, 1)
    return torch.where(cols[None, :] < pads[:, None], first, tokens)


__all__ = ["GPT", "PRESETS", "GPTConfig", "NaiveBlock", "NaiveCausalSelfAttention", "NaiveMLP",
           "apply_repetition_penalty", "top_k_filter", "top_p_filter"]
