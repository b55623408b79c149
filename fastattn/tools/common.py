"""What every tool shares: argument types for the command lines, and the names of
devices and dtypes. The tools import this module and the library; nothing else."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> str:
    """``name`` (default: cuda if available, else cpu), checked: it must run here."""
    device = name or default_device()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {name!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' is not available (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda})")
    return device


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(
        low, f"an integer >= {low}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def render_table(header: list[str], cells: list[list[str]], markdown: bool = False,
                 notes: Sequence[str] = (), left: Sequence[int] = (), md_left: int = 0
                 ) -> str:
    """A table as aligned text (columns ``left`` left-aligned, the others right) or as
    markdown (the first ``md_left`` columns left-aligned); ``notes`` follow it."""
    if markdown:
        align = ("---" if i < md_left else "---:" for i in range(len(header)))
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
                 *("| " + " | ".join(c) + " |" for c in cells)]
        return "\n".join(lines + (["", *(f"- {n}" for n in notes)] if notes else []))
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]

    def line(c: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(c, widths))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells),
                      *notes])
