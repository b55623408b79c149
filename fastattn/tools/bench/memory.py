"""Extra peak memory of a call: what it allocates on top of what was there before.

CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before. CPU (Linux):
the peak resident set size (``getrusage().ru_maxrss``, reset to now through
``/proc/self/clear_refs`` where the kernel allows) minus the resident set size before;
meaningful in a fresh process that has run little else (``memory_server``).
"""
from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import torch


def rss_bytes() -> int:
    """This process's resident set size now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_before(device: torch.device) -> int:
    """Start a reading: reset the peak, return what is in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError):   # reset the peak RSS to now (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes()


def extra_memory_mib(device: torch.device, before: int) -> float:
    """The peak since ``memory_before`` returned ``before``, minus ``before``, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    return max(0, peak - before) / 2 ** 20
