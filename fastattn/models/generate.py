"""Choosing the next token in ``GPT.generate``: CTRL's repetition penalty, temperature,
top-k and nucleus (top-p) filtering, then sampling (or greedy ``argmax``).

Each function takes a (B, V) row of logits per sequence and returns a new tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor


def apply_repetition_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: for every token id present in its row of ``tokens``,
    a positive logit is divided by ``penalty`` and a negative one multiplied by it, so
    ``penalty > 1`` makes repeats less likely (each id once, however often it occurs).

    logits: (B, V) float; tokens: (B, L) int64. Returns a new (B, V) tensor.
    """
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0 or tokens.numel() == 0:
        return logits
    seen = logits.gather(1, tokens)                                   # (B, L)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, tokens, seen)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest logits, set the rest to ``-inf``. Ties with the
    k-th largest are kept. logits: (B, V). Returns a new tensor."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]              # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities
    sum to at least ``p`` (always at least the most likely one), set the rest to
    ``-inf``. logits: (B, V). Returns a new tensor."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token goes when the tokens before it already reach p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)                # back to vocab order
    return logits.masked_fill(drop, float("-inf"))

def next_token(logits: Tensor, seen: Tensor, temperature: float, top_k: int | None,
               top_p: float | None, repetition_penalty: float,
               gen: torch.Generator | None) -> Tensor:
    """The next token of each row: logits (B, V) float, ``seen`` (B, L) the tokens so far.
    Greedy when ``temperature == 0``; else sampled from the filtered softmax with
    ``gen`` (None: torch's global generator). Returns (B,) int64."""
    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


__all__ = ["apply_repetition_penalty", "next_token", "top_k_filter", "top_p_filter"]
