"""Where and with what a result was measured: device, versions, commit, date, threads,
allocator, load. Saved with every result (STYLE.md: provenance)."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import fastattn
from fastattn.tools.bench.allocator import allocator_setting

REPO_ROOT = Path(__file__).resolve().parents[3]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {cpu_count()} cores"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_slug(device: str) -> str:
    """``cpu-intel-xeon-processor-2c``, ``nvidia-h100-80gb-hbm3``: the results folder."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name())
    model = device_name("cpu").rsplit(",", 1)[0]
    model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", model, flags=re.I)
    return f"cpu-{_slug(model)}-{cpu_count()}c"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_state() -> dict:
    """Commit of the checkout fastattn runs from, and whether its code differs from it:
    changed or untracked files outside ``benchmarks/results`` (a fresh results file is
    not a code change)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", ".", ":!benchmarks/results")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def provenance(device: str, dtype: str, threads: int, load: list[float] | None,
               heap_retention: bool = True) -> dict:
    """The provenance of a run on ``device`` in ``dtype`` with ``threads`` CPU threads;
    ``load``: the load average at its start."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "device_slug": device_slug(device),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform(),
        "fastattn": fastattn.__version__, **git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype, "threads": threads,
        "allocator": allocator_setting(device, heap_retention),
        "cpu_cores": cpu_count(), "load_average_at_start": load,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: more than the core count means other work
    shared the CPU and the CPU times are noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
