"""A GPT (decoder-only transformer) on fastattn's kernels, and its textbook twin.

``GPTConfig.attention`` picks the blocks:

* ``"fast"``: ``fastattn.nn.Block`` — flash attention (no T×T matrix), fastattn's
  LayerNorm with the first residual add fused into ``ln2``, a fused Linear + GELU.
* ``"naive"``: ``NaiveBlock`` (``models/naive.py``) — ``nn.LayerNorm``, attention that
  materialises the (B, H, T, T) softmax with ``masked_fill(-inf)``
  (``fastattn.reference.naive_attention``), ``nn.Linear`` + ``nn.GELU``: the model users
  already have, and the benchmarks' baseline.

Both have the same parameter names and shapes (``blocks.i.ln1``, ``blocks.i.attn.qkv_proj``,
``blocks.i.attn.out_proj``, ``blocks.i.ln2``, ``blocks.i.mlp.fc``, ``blocks.i.mlp.proj``),
so one state dict loads into either and they compute the same function.

Architecture (GPT-2): token + learned position embeddings, dropout, ``n_layer`` pre-LN
blocks, a final LayerNorm, and an output head tied to the token embedding.

Llama-style with ``GPTConfig(pos="rope", mlp="swiglu", norm="rms")`` (usually also
``bias=False`` and ``n_kv_head`` < ``n_head``); fast and naive still share one state dict:

* ``pos="rope"``: no ``wpe``; q and k of every layer turn by the angles
  ``pos · rope_base^(-2i/R)`` (GPT-NeoX layout, the first R = ``rope_dim`` dims of each
  head, default all). Positions are absolute: cached keys are stored turned, and a
  left-padded row counts from its first real token.
* ``mlp="swiglu"``: ``down_proj(silu(gate_proj(x)) · up_proj(x))``, hidden ``mlp_hidden``
  or ``fastattn.nn.swiglu_hidden(n_embd)`` (8·C/3 rounded up to a multiple of 64).
* ``norm="rms"``: ``RMSNorm`` (a weight, no bias) for ``ln1``, ``ln2`` and ``ln_f``.
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
# The textbook blocks lived here before naive.py; still importable from this module.
from fastattn.models.naive import (NaiveBlock, NaiveCausalSelfAttention, NaiveMLP, NaiveRMSNorm,
                                   NaiveSwiGLUMLP, naive_norm)
from fastattn.ops.flash_attention import HEAD_DIMS, head_dim_supported
from fastattn.ops.linear_cross_entropy import linear_cross_entropy

ATTENTION = ("fast", "naive")
APPROXIMATE = ("none", "tanh")
POS = ("learned", "rope")


@dataclass
class GPTConfig:
    vocab_size: int = 256                  # bytes; a BPE tokenizer sets its own
    block_size: int = 256                  # longest sequence (the context window)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None           # grouped-query attention; None = n_head
    n_embd: int = 256
    mlp_hidden: int | None = None          # None: 4·n_embd; swiglu: swiglu_hidden(n_embd)
    dropout: float = 0.0                   # embedding and residual dropout
    bias: bool = True                      # in Linears and LayerNorms (RMSNorm has none)
    attention: str = "fast"                # "fast" (fastattn) or "naive" (textbook)
    approximate: str = "none"              # GELU: "none" (erf) or "tanh"
    checkpointing: bool = False            # recompute each block in backward
    eps: float = 1e-5                      # LayerNorm / RMSNorm
    fused_loss: bool = True                # fast model: LM head + loss fused when V > C
    pos: str = "learned"                   # "learned" (GPT-2's wpe) or "rope" (rotary)
    rope_base: float = 10000.0             # rotary angles pos · base^(-2i/R)
    rope_dim: int | None = None            # R, rotated dims per head; None = head dim
    mlp: str = "gelu"                      # "gelu" (GPT-2) or "swiglu" (Llama)
    norm: str = "layer"                    # "layer" (LayerNorm) or "rms" (RMSNorm)

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
        self._check_llama_options()

    def _check_llama_options(self) -> None:
        for name, allowed in (("pos", POS), ("mlp", fnn.MLPS), ("norm", fnn.NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) \
                or not self.rope_base > 1:
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
        if self.rope_dim is not None:
            if self.pos != "rope":
                raise ValueError(f"rope_dim={self.rope_dim!r} needs pos='rope', got "
                                 f"pos={self.pos!r}")
            r, d = self.rope_dim, self.head_dim
            if not isinstance(r, int) or r % 2 != 0 or not 2 <= r <= d:
                raise ValueError(f"rope_dim must be an even integer in [2, head dim {d}], "
                                 f"got {r!r}")
        if self.mlp == "swiglu" and self.approximate != "none":
            raise ValueError(f"approximate={self.approximate!r} picks the GELU of mlp='gelu'; "
                             "mlp='swiglu' has no GELU (leave approximate='none')")

    @property
    def rotary_dim(self) -> int:
        """R: the dims of each head that rotary embedding turns (with pos='rope')."""
        return self.head_dim if self.rope_dim is None else self.rope_dim

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


# -------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    """GPT-2 style language model; ``config.attention`` chooses fast or naive blocks, and
    ``pos``, ``mlp``, ``norm`` make it Llama-style (see the module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        block = fnn.Block if c.attention == "fast" else NaiveBlock
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        # Rotary models have no position parameters: the angles come from positions.
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            block(c.n_embd, c.n_head, dropout=c.dropout, bias=c.bias, n_kv_heads=c.n_kv_head,
                  mlp_hidden=c.mlp_hidden, approximate=c.approximate, eps=c.eps,
                  norm=c.norm, mlp=c.mlp)
            for _ in range(c.n_layer))
        self.ln_f = self._final_norm()
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight           # tied: one (V, C) matrix
        self.reset_parameters()

    def _final_norm(self) -> nn.Module:
        c = self.config
        if c.attention == "fast":
            return fnn.RMSNorm(c.n_embd, eps=c.eps) if c.norm == "rms" else \
                fnn.LayerNorm(c.n_embd, eps=c.eps, bias=c.bias)
        return naive_norm(c.norm, c.n_embd, c.eps, c.bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: matrices and embeddings N(0, 0.02), the residual projections
        (``attn.out_proj``, ``mlp.proj``, SwiGLU's ``mlp.down_proj``) N(0, 0.02 /
        sqrt(2·n_layer)) because each block adds two of them to the residual stream;
        biases 0, norm gains 1.
        Set by parameter name and shape, so fast and naive models initialise alike."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("attn.out_proj.weight", "mlp.proj.weight",
                                          "mlp.down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=residual_std if residual else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    # ---------------------------------------------------------------- forward

    def _embed(self, idx: Tensor, pos: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token ids (B, T) at positions ``pos`` ((T,) or (B, T)) -> the input of the first
        block (B, T, C), and the rotary angles (cos, sin) (B or 1, T, R/2) in float32
        with pos='rope' (None with learned positions)."""
        x = self.wte(idx)                                            # (B, T, C)
        if self.wpe is not None:
            return x + self.wpe(pos), None
        c = self.config
        r = c.rotary_dim
        inv_freq = 1.0 / c.rope_base ** (
            torch.arange(0, r, 2, device=idx.device, dtype=torch.float32) / r)  # (R/2,)
        pos = pos if pos.dim() == 2 else pos[None]                   # (B|1, T)
        angles = pos.float()[..., None] * inv_freq                   # (B|1, T, R/2)
        return x, (angles.cos(), angles.sin())

    def _hidden(self, idx: Tensor, caches: list[fnn.KVCache] | None = None,
                pos: Tensor | None = None) -> Tensor:
        """Token ids (B, T) at positions ``pos`` ((T,) or (B, T); default 0..T-1) ->
        final-norm output (B, T, C)."""
        t = idx.shape[1]
        if pos is None:
            if t > self.config.block_size:
                raise ValueError(f"sequence length {t} exceeds the model's block_size "
                                 f"{self.config.block_size} (its context window)")
            pos = torch.arange(t, device=idx.device)
        x, rotary = self._embed(idx, pos)
        x = self.drop(x)                                             # (B, T, C)
        recompute = self.config.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if recompute and cache is None:
                x = checkpoint(block, x, rotary=rotary, use_reentrant=False)
            else:
                x = block(x, cache=cache, rotary=rotary)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size. Returns logits (B, T, V) and,
        with ``targets`` (B, T) (``-1`` = ignore), the mean cross-entropy in float32.

        With ``config.fused_loss`` and V > C the fast model computes the loss with
        ``linear_cross_entropy`` (the LM head and the loss in chunks, never the (B·T, V)
        logits) and returns ``None`` for the logits; at V <= C the logits are no bigger
        than the hidden state, so the plain head (faster) serves. The naive model keeps
        the textbook ``lm_head`` + ``cross_entropy``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        hidden = self._hidden(idx)                                   # (B, T, C)
        c = self.config
        if targets is not None and c.fused_loss and c.attention == "fast" and \
                c.vocab_size > c.n_embd:
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
        each row gets the tokens it would get alone. Needs ``use_cache``, fast model.

        ``compile``: the one-token step through ``torch.compile``, static shapes, one
        graph for the fast model (caches written at a column tensor: ``KVCache.attend``),
        CUDA graphs on CUDA (``"reduce-overhead"``), as gpt-fast does; same tokens.

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
        lengths, (b, t0) = torch.as_tensor(prompt_lengths, device=idx.device), idx.shape
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
        # Compiled, the fast model's step is one graph: its caches write at a column
        # tensor (``KVCache.attend``); the naive model's attention stays eager.
        static = compile and self.config.attention == "fast"
        caches, out = None, idx
        for _ in range(max_new_tokens):
            window = out[:, -bs:]
            # Left padding inside the window: the columns before each row's first token.
            pad = None if pads is None else (pads - out.shape[1] + window.shape[1]).clamp(0)
            if not use_cache:
                logits = self.lm_head(self._hidden(window)[:, -1]).float()
            elif caches is None or caches[0].length == bs:
                # Prefill, or the window slid: recompute the last block_size tokens.
                if caches is None:
                    caches = self.make_caches(out.shape[0], bs, out.device,
                                              self._compute_dtype(out.device))
                    for buffer in (t for c in caches if static for t in (c.k, c.v)):
                        torch._dynamo.mark_static_address(buffer)   # CUDA graphs write it
                for cache in caches:
                    cache.reset()
                    cache.start = None if pad is None else pad.to(torch.int32)
                pos = _positions(0, window.shape[1], pad, out.device)
                logits = self.lm_head(self._hidden(window, caches, pos)[:, -1]).float()
            else:
                # The last token as its own (B, 1) tensor, not a view of the growing
                # ``out``, whose strides would change every step (and recompile).
                length = caches[0].length
                if static:
                    fnn.KVCache.place(caches, length)
                logits = step(out[:, -1:].clone(memory_format=torch.contiguous_format),
                              _positions(length, 1, pad, out.device), caches)  # (B, V)
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
            x, rotary = self._embed(idx, torch.arange(idx.shape[1], device=idx.device))
            shares = []
            for block in self.blocks:
                shares.append(block.attn.sink_share(block.ln1(x), n_sink, rotary).float())
                x = block(x, rotary=rotary)
            return torch.stack(shares)                                # (L, H)
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- counting

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied head counted once). ``non_embedding`` leaves out
        the token and position embeddings (Kaplan et al.'s N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            n -= 0 if self.wpe is None else self.wpe.weight.numel()
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
           "NaiveRMSNorm", "NaiveSwiGLUMLP", "apply_repetition_penalty", "top_k_filter",
           "top_p_filter"]
