"""The CPU allocator setting of a benchmark process, and how it is recorded.

glibc returns each freed block above its mmap threshold to the OS, so a call that
allocates a large output page-faults all of it again each time (DESIGN.md). CPU timings
therefore run in a child process started with ``HEAP_RETENTION_ENV`` (mmap and trim
thresholds of 1 TiB: freed memory stays in the heap and is reused), the same for every
implementation, and the setting is recorded in the results. glibc 2.36 accepts
thresholds above the 32 MiB that mallopt(3) gives as the maximum (that number caps only
the *dynamic* threshold): checked with a 600 MiB block, freed and allocated again with
no page faults, where a 32 MiB threshold faults all of it every time. The memory
processes use the default allocator.
"""
from __future__ import annotations

import os
import platform
import sys

# Keep freed memory in the heap: no block is big enough to be mmapped, the top is never
# trimmed. 1 TiB is above any allocation a benchmark makes.
HEAP_RETENTION_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40),
                      "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def heap_retention_active() -> bool:
    return all(os.environ.get(k) == v for k, v in HEAP_RETENTION_ENV.items())


def child_env(retain: bool) -> dict[str, str]:
    """This process's environment for a child: with ``HEAP_RETENTION_ENV`` if
    ``retain``, else with glibc's defaults (whatever this process was started with)."""
    env = {k: v for k, v in os.environ.items() if k not in HEAP_RETENTION_ENV}
    return {**env, **HEAP_RETENTION_ENV} if retain else env


def allocator_setting(device: str, retain: bool = True) -> dict:
    """How a run allocates for the CPU timing (``retain``: ``HEAP_RETENTION_ENV``) and
    memory measurements on this platform."""
    if device != "cpu":
        return {"timing": "CUDA caching allocator", "memory": "torch.cuda.max_memory_allocated"}
    linux = sys.platform == "linux"
    retained = retain if linux else heap_retention_active()
    return {"libc": " ".join(platform.libc_ver()),
            "timing": " ".join(f"{k}={v}" for k, v in HEAP_RETENTION_ENV.items())
            if retained else "default (freed large blocks go back to the OS)",
            "memory": "default malloc; peak RSS of a fresh forked process minus RSS before"
            if linux else "not measured (needs Linux)"}
