"""Models built on fastattn's modules: a GPT with a fast/naive switch (same parameters)."""
from fastattn.models.gpt import (PRESETS, GPT, GPTConfig, apply_repetition_penalty,
                                 top_k_filter, top_p_filter)

__all__ = ["GPT", "PRESETS", "GPTConfig", "apply_repetition_penalty", "top_k_filter",
           "top_p_filter"]
