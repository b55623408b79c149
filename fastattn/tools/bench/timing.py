"""Timing a call, and the device's peaks that the rates are compared with.

CUDA: ``triton.testing.do_bench`` quantiles (CUDA events, L2 flushed between calls), or
plain CUDA events without Triton. CPU: ``time.perf_counter`` around each call of a
function already warmed up, at least ``MIN_REPEATS`` calls within a time budget; the
minor page faults per call are kept, a sign of fresh memory in the time.
"""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fastattn.tools.common import dtype_name

MIN_REPEATS = 3
CPU_BUDGET_S = 0.3             # per (impl, size, mode), after the warm-up call


@dataclass
class Timing:
    p20: float          # milliseconds
    p50: float
    p80: float
    repeats: int        # -1: not known (do_bench)
    faults_per_call: float | None = None   # CPU: minor page faults, a sign of fresh memory


def time_cpu(fn: Callable[[], Any], budget_s: float = CPU_BUDGET_S,
             min_repeats: int = MIN_REPEATS, max_repeats: int = 100) -> Timing:
    """Call ``fn`` (already warmed up) until ``budget_s`` is spent, at least
    ``min_repeats`` times; quantiles of the wall-clock times."""
    timing = time_cpu_interleaved({"fn": fn}, budget_s, min_repeats, max_repeats)["fn"]
    if isinstance(timing, Exception):
        raise timing
    return timing


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float = CPU_BUDGET_S,
                         min_repeats: int = MIN_REPEATS, max_repeats: int = 100
                         ) -> dict[str, Timing | Exception]:
    """Time several functions (already warmed up) round by round, each called once per
    round, so that load from other processes hits them alike: at least ``min_repeats``
    rounds, more while ``budget_s`` per function lasts. A function that raises is
    dropped; its exception is returned in place of its timing."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    failed: dict[str, Exception] = {}
    start, rounds = time.perf_counter(), 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start
                                    < budget_s * len(fns)) and len(failed) < len(fns):
        for name, fn in fns.items():
            if name in failed:
                continue
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001  reported per function
                failed[name] = e
                continue
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        rounds += 1
    return {name: failed.get(name) or Timing(**{**asdict(quantiles(times[name])),
                                                "faults_per_call": faults[name] / rounds})
            for name in fns}


def time_cuda(fn: Callable[[], Any], quick: bool = False) -> Timing:
    """Median and 20/80 % quantiles in ms from ``triton.testing.do_bench`` (CUDA events,
    L2 cache flushed before each call); plain CUDA events without Triton."""
    warmup, rep = (5, 20) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, warmup, rep)
    p20, p50, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return Timing(p20, p50, p80, repeats=-1)   # do_bench does not say how many


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / one_ms)):
        fn()
    times = []
    for _ in range(max(MIN_REPEATS, int(rep_ms / one_ms))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return quantiles(times)


def quantiles(times_ms: list[float]) -> Timing:
    """20 %, 50 % and 80 % quantiles of ``times_ms``."""
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], 1)
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(q[1], statistics.median(times_ms), q[7], len(times_ms))


def _best_ms(fn: Callable[[], Any], device: torch.device, quick: bool) -> float:
    """A near-best time of ``fn``: its 20 % quantile, after a warm-up call on CPU."""
    if device.type == "cuda":
        return time_cuda(fn, quick).p20
    fn()
    return time_cpu(fn, budget_s=0.1 if quick else 0.4).p20


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False
                        ) -> dict:
    """The device's achievable TFLOP/s in ``dtype``: an n×n matmul (n = 8192 on CUDA,
    2048 on CPU; 1024 with ``quick``), at its 20 % quantile time (a near-best call)."""
    n = 1024 if quick else (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    best_ms = _best_ms(lambda: a @ b, device, quick)
    return {"tflops": 2 * n ** 3 / (best_ms * 1e-3) / 1e12,
            "how": f"{n}x{n} @ {n}x{n} matmul in {dtype_name(dtype)}, 20 % quantile time"}


def measure_copy_gbps(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """The device's achievable bandwidth: a large tensor copy (read + write), GB/s at its
    20 % quantile time. 1 GiB on CUDA, 256 MiB on CPU (64 MiB with ``quick``)."""
    n_bytes = (64 << 20) if quick else ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.randn(n_bytes // 4, device=device).to(dtype)
    dst = torch.empty_like(src)
    best_ms = _best_ms(lambda: dst.copy_(src), device, quick)
    moved = 2 * src.numel() * src.element_size()
    return {"gbps": moved / (best_ms * 1e-3) / 1e9,
            "how": f"copy of {moved // 2 >> 20} MiB ({dtype_name(dtype)}), read + write, "
                   "20 % quantile time"}
