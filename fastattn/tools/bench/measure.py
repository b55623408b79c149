"""The measuring loop of one run, in this process: per size, one reference, then each
implementation's correctness check (its warm-up call), then the timing of those that
passed, on CPU interleaved round by round; on CUDA also their extra memory."""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from fastattn.ops.registry import MODES
from fastattn.tools.bench.check import TOLERANCE, check, reference, run_once
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.memory import extra_memory_mib, memory_before
from fastattn.tools.bench.ops import Impl
from fastattn.tools.bench.timing import CPU_BUDGET_S, Timing, time_cpu_interleaved, time_cuda
from fastattn.tools.common import dtype_name, dtype_of

N_INPUT_SETS = 2


def _row(cfg: Config, impl: Impl, shape: dict, mode: str) -> dict:
    x = cfg.spec.x
    return {"impl": impl.name, "kind": impl.kind, "backend": impl.backend, "mode": mode,
            "shape": shape, x: shape[x], "status": "ok"}


def _check_row(cfg: Config, impl: Impl, shape: dict, mode: str, sets: list,
               ref: list[Tensor] | None) -> dict:
    """The row of one implementation at one size after its correctness check, which is
    also its warm-up call. ``ref`` is None when the implementation, run in the benchmark
    dtype, made the reference itself: that run was its check and warm-up."""
    row = _row(cfg, impl, shape, mode)
    if ref is None:
        return row
    try:
        row["max_rel_error"] = check(impl, sets[0], ref, mode)
    except Exception as e:  # noqa: BLE001  an implementation that fails gets no number
        return _failed(row, e)
    if not row["max_rel_error"] <= (cfg.spec.tolerance or TOLERANCE[dtype_of(cfg.dtype)]):
        row["status"] = "wrong"
    return row


def _failed(row: dict, e: Exception) -> dict:
    row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _time_rows(cfg: Config, impls: list[Impl], rows: list[dict], sets: list, mode: str,
               peak: float) -> None:
    """Time the implementations whose rows passed the check (and on CUDA measure their
    memory): on CPU interleaved, round by round; on CUDA one after another."""
    calls = {}
    for impl, row in zip(impls, rows):
        if row["status"] == "ok":
            inputs = itertools.cycle(sets)
            calls[impl.name] = (row, lambda impl=impl, inputs=inputs: run_once(
                impl, *next(inputs), mode))
    if cfg.device == "cuda":
        timings: dict[str, Timing | Exception] = {}
        for name, (row, call) in calls.items():
            try:
                timings[name] = time_cuda(call, cfg.quick)
                row["extra_mem_mib"] = _cuda_extra_memory(call)
            except Exception as e:  # noqa: BLE001
                timings[name] = e
    else:
        timings = time_cpu_interleaved({name: call for name, (_, call) in calls.items()},
                                       budget_s=0.05 if cfg.quick else CPU_BUDGET_S)
    unit, work = cfg.unit, cfg.work(rows[0]["shape"], mode)
    for name, (row, _) in calls.items():
        t = timings[name]
        if isinstance(t, Exception):
            _failed(row, t)
            continue
        rate = work / (t.p50 * 1e-3) / unit.scale
        row.update({"time_ms": asdict(t), unit.work_key: work, unit.rate_key: rate,
                    "pct_peak": 100 * rate / peak})


def _cuda_extra_memory(call: Callable[[], Any]) -> float:
    device = torch.device("cuda")
    before = memory_before(device)
    result = call()
    extra = extra_memory_mib(device, before)
    del result
    return extra


def _progress(row: dict, x: str, start: float) -> None:
    if row["status"] == "ok":
        what = f"{row['time_ms']['p50']:9.2f} ms"
    else:
        what = row["status"] + (f": {row['error']}" if "error" in row else
                                f" (max rel error {row['max_rel_error']:.2e})")
    print(f"  [{time.perf_counter() - start:5.1f} s] {row['impl']:<16} {x}={row[x]:<6} "
          f"{row['mode']:<8} {what}", file=sys.stderr, flush=True)


def measure(cfg: Config) -> dict:
    """Correctness check and timing of every implementation at every size and mode, in
    this process. Returns ``{"peak": ..., "rows": [...], "skipped": {...}, "threads": n}``."""
    cfg = cfg.resolve()
    start = time.perf_counter()
    spec, device, dtype = cfg.spec, torch.device(cfg.device), dtype_of(cfg.dtype)
    impls, skipped = cfg.impls()
    peak = cfg.unit.peak(device, dtype, cfg.quick)
    # fwd+bwd first: it repeats the reference call's allocations, so the heap it grew
    # serves the timed calls; the forward's smaller allocations then fit into it.
    modes = sorted(cfg.modes, key=MODES.index, reverse=True)
    rows = []
    for shape in cfg.shapes():
        sets = [spec.inputs(shape, dtype, device, seed) for seed in range(N_INPUT_SETS)]
        # One reference run serves both modes: output and gradients.
        ref, ref_impl = reference(impls, *sets[0], modes[0])
        for mode in modes:
            if ref is None:
                group = [{**_row(cfg, impl, shape, mode), "status": "error",
                          "error": "no reference could be computed"} for impl in impls]
            else:
                group = [_check_row(cfg, impl, shape, mode, sets,
                                    None if impl is ref_impl and ref[0].dtype == dtype else ref)
                         for impl in impls]
                for row in group:
                    row["reference"] = f"{ref_impl.name} in {dtype_name(ref[0].dtype)}"
                _time_rows(cfg, impls, group, sets, mode, peak[cfg.unit.rate_key])
            for row in group:
                _progress(row, spec.x, start)
            rows += group
        del sets, ref
    rows.sort(key=lambda r: (cfg.sizes.index(r[spec.x]), MODES.index(r["mode"])))  # stable
    return {"peak": peak, "rows": rows, "skipped": skipped, "threads": torch.get_num_threads()}
