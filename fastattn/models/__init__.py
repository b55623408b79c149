"""Models built on fastattn's modules, and what trains them.

``gpt``: a GPT with a fast/naive switch (same parameters); ``generate``: its next-token
choice; ``data``: text to token batches; ``optim``: AdamW, schedule, precision and the
training step; ``train`` / ``sample``: the command lines (``train_config``,
``checkpoint``, ``distributed``, ``metrics`` serve them).
"""
from fastattn.models.generate import apply_repetition_penalty, top_k_filter, top_p_filter
from fastattn.models.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "PRESETS", "GPTConfig", "apply_repetition_penalty", "top_k_filter",
           "top_p_filter"]
