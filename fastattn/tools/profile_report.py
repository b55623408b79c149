"""``fastattn profile``'s results: the table of ops or kernels by self time, the peak
memory, and the report printed from them (``fastattn.tools.profile`` measures)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType

DEFAULT_TOP = 15
MEMORY_VIZ, PERFETTO = "https://pytorch.org/memory_viz", "https://ui.perfetto.dev"


@dataclass
class Row:
    """One op (CPU) or kernel (CUDA) of the table, summed over the profiled steps."""
    name: str
    calls: int
    self_ms: float
    share: float                   # % of the profiled time
    ms_per_step: float


@dataclass
class ProfileResult:
    """What ``profile`` measured. Times in milliseconds, memory in bytes."""
    op: str
    variant: str | None            # "fast" / "naive" for the GPT, None for an op
    preset: str
    shape: dict[str, int]
    device: str
    dtype: str
    backend: str                   # the forced backend, or "default (<name> on <device>)"
    steps: int
    warmup: int
    time_kind: str                 # "self CPU time" (ops) or "self CUDA time" (kernels)
    rows: list[Row]                # every op/kernel with self time > 0, longest first
    profiled_ms: float             # the sum of all self times
    step_ms: float                 # mean step time (timers, under the profiler)
    phase_ms: dict[str, float]     # mean per step: forward, backward[, optimizer]
    phase_share: dict[str, float]  # % of step_ms
    peak_memory: int                # bytes; see memory_note
    memory_note: str
    trace: Path
    snapshot: Path | None = None
    notes: list[str] = field(default_factory=list)


def add_memory(result: ProfileResult, cuda_memory: dict | None) -> None:
    """Peak memory, what it counts, the snapshot, and on CUDA how busy the GPU was."""
    r = result
    if cuda_memory is None:
        r.peak_memory = cpu_peak(r.trace)
        r.memory_note = ("allocated during the profiled steps (profiler memory events: "
                         "what was live before them, such as parameters, optimizer state "
                         "and inputs, is not counted)")
        r.notes.append("memory snapshot: CUDA-only (torch.cuda.memory._record_memory_history)")
        return
    r.peak_memory, r.snapshot = cuda_memory["peak"], cuda_memory["snapshot"]
    r.memory_note = (f"allocated (torch.cuda.max_memory_allocated), "
                     f"{_mib(cuda_memory['before'])} of it before the first step "
                     "(parameters, inputs)")
    busy = r.profiled_ms / r.steps / r.step_ms if r.step_ms > 0 else 0.0
    r.notes.append(f"kernels kept the GPU busy {100 * busy:.0f} % of the step time (the "
                   "rest: waiting for the CPU to launch work)")


def _self_device_us(event) -> float:
    # torch >= 2.4 says "device", older versions "cuda".
    value = getattr(event, "self_device_time_total", None)
    return value if value is not None else getattr(event, "self_cuda_time_total", 0)


def rows_by_self_time(events, device: torch.device, steps: int) -> tuple[list[Row], float, str]:
    """Rows by self time: CPU ops on CPU, GPU kernels on CUDA (the GPU's user-annotation
    copies of the record_function ranges are left out, as torch's own table does)."""
    if device.type == "cuda":
        kind = "self CUDA time"
        timed = [(e, _self_device_us(e)) for e in events if e.device_type == DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)]
    else:
        kind = "self CPU time"
        timed = [(e, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    timed = [(e, us) for e, us in timed if us > 0]
    total = sum(us for _, us in timed)
    timed.sort(key=lambda pair: (-pair[1], pair[0].key))
    rows = [Row(e.key, e.count, us / 1e3, 100 * us / total, us / 1e3 / steps)
            for e, us in timed]
    return rows, total, kind


def cpu_peak(trace: Path) -> int:
    """Peak "Total Allocated" of the profiler's CPU memory events in a Chrome trace."""
    events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(result: ProfileResult) -> str:
    """One line: what ran, on what."""
    r = result
    what = f"GPT ({r.variant})" if r.op == "gpt" else r.op
    shape = ", ".join(f"{k}={v}" for k, v in r.shape.items())
    return (f"{what}, preset {r.preset}: {shape}; {r.device} {r.dtype}, backend "
            f"{r.backend}; {r.steps} profiled steps after {r.warmup} warm-up")


def format_report(result: ProfileResult, top: int = DEFAULT_TOP) -> str:
    """The phase shares, the top ``top`` rows of the table, memory and the files."""
    r = result
    lines = [describe(r), "",
             f"step time {r.step_ms:.2f} ms (mean of {r.steps} steps, under the profiler)"]
    for name, ms in r.phase_ms.items():
        lines.append(f"  {name:<10} {r.phase_share[name]:5.1f} %  {ms:9.2f} ms")
    rest = r.step_ms - sum(r.phase_ms.values())
    lines.append(f"  {'other':<10} {100 * rest / r.step_ms:5.1f} %  {rest:9.2f} ms")
    lines += ["", (f"top {min(top, len(r.rows))} of {len(r.rows)} by {r.time_kind} "
                   f"({r.profiled_ms:.2f} ms over {r.steps} steps):")]
    width = max([len("name")] + [len(row.name) for row in r.rows[:top]])
    width = min(width, 60)
    lines.append(f"{'name':<{width}}  {'calls':>6}  {'self ms':>9}  {'%':>6}  {'ms/step':>9}")
    for row in r.rows[:top]:
        name = row.name if len(row.name) <= width else row.name[:width - 1] + "…"
        lines.append(f"{name:<{width}}  {row.calls:>6}  {row.self_ms:>9.3f}  "
                     f"{row.share:>6.1f}  {row.ms_per_step:>9.3f}")
    ranges = [row.name for row in r.rows[:top] if row.name in (*r.phase_ms, "ProfilerStep*")]
    if ranges:
        lines.append(f"({', '.join(ranges)}: time in that range outside any op: Python, "
                     "the profiler)")
    lines.append("")
    lines.append(f"peak memory {_mib(r.peak_memory)} {r.memory_note}")
    lines += r.notes
    lines.append(f"trace: {r.trace} (chrome://tracing or {PERFETTO})")
    if r.snapshot is not None:
        lines.append(f"memory snapshot: {r.snapshot} (drop it into {MEMORY_VIZ})")
    return "\n".join(lines)
