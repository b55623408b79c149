"""One benchmark run as ``fastattn bench`` makes it, and its results document.

On CPU (Linux) the timing runs in a child process with ``HEAP_RETENTION_ENV`` (or
without, if ``Config.heap_retention`` is off) unless this process already has the
wanted setting, and the memory in processes forked from a memory server. ``run`` starts
both at once, so that their imports overlap; the timing starts when both are ready, and
the memory jobs (two at a time) after it, so no measurement shares the cores with
another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

from fastattn.tools.bench.allocator import child_env, heap_retention_active
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.measure import measure
from fastattn.tools.bench.memory_server import MemoryServer, cpu_memory
from fastattn.tools.bench.provenance import load_average, provenance


def timing_child() -> None:
    """Entry point of the CPU timing process: Config JSON on stdin, results on stdout.
    Everything else the process prints goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = measure(Config(**json.loads(sys.stdin.read())))
    out.write(json.dumps(result))
    out.close()


def _start_timing_child(retain: bool) -> subprocess.Popen:
    """The CPU timing process, with ``HEAP_RETENTION_ENV`` if ``retain`` (else without
    it); it imports, then waits for its Config on stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", "from fastattn.tools.bench.run import timing_child as t; t()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(retain))


def _timing_child_result(proc: subprocess.Popen, cfg: Config) -> dict:
    out, _ = proc.communicate(json.dumps(asdict(cfg)))
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed (exit status {proc.returncode})")
    return json.loads(out)


def _close(*procs: subprocess.Popen | None) -> None:
    """Done with these processes (or failed): kill what still runs, close the pipes."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def run(cfg: Config) -> dict:
    """Measure ``cfg`` and return the results document (``results.save`` writes it)."""
    cfg = cfg.resolve()
    load = load_average()           # before this run adds its own
    linux_cpu = cfg.device == "cpu" and sys.platform == "linux"
    server = MemoryServer() if linux_cpu and cfg.memory else None
    in_child = linux_cpu and heap_retention_active() != cfg.heap_retention
    child = _start_timing_child(cfg.heap_retention) if in_child else None
    clock = [time.perf_counter()]
    try:   # the two processes import at the same time; the timing starts when both did
        if server is not None:
            server.wait_ready()
        measured = _timing_child_result(child, cfg) if child else measure(cfg)
        clock.append(time.perf_counter())
        if server is not None:
            cpu_memory(server, cfg, measured["rows"])
        clock.append(time.perf_counter())
    finally:
        _close(child, server and server.proc)
    spec, unit = cfg.spec, cfg.unit
    add_ratios(measured["rows"], spec.x)
    prov = provenance(cfg.device, cfg.dtype, measured["threads"], load, cfg.heap_retention)
    return {"schema": 1, "op": cfg.op, "x": spec.x, "unit": unit.label,
            "work_key": unit.work_key, "rate_key": unit.rate_key,
            "config": asdict(cfg), "shapes": cfg.shapes(), "provenance": prov,
            "peak": measured["peak"], "skipped": measured["skipped"], "rows": measured["rows"],
            "durations_s": {"start_and_timing": round(clock[1] - clock[0], 1),
                            "memory": round(clock[2] - clock[1], 1)}}


def add_ratios(rows: list[dict], x: str) -> None:
    """Speed and memory ratios of each row against the naive and the torch rows at the
    same size and mode: ``speedup_vs_naive`` = naive time / time (higher is faster),
    ``mem_ratio_vs_naive`` = naive extra memory / extra memory (higher uses less);
    ``*_vs_torch`` likewise against torch's built-in (SDPA for attention)."""
    for row in rows:
        for kind in ("naive", "torch"):
            base = next((r for r in rows if r["kind"] == kind and r[x] == row[x]
                         and r["mode"] == row["mode"] and r["shape"] == row["shape"]), None)
            if base is None:
                continue
            if "time_ms" in base and "time_ms" in row:
                row[f"speedup_vs_{kind}"] = base["time_ms"]["p50"] / row["time_ms"]["p50"]
            if base.get("extra_mem_mib") and row.get("extra_mem_mib"):
                row[f"mem_ratio_vs_{kind}"] = base["extra_mem_mib"] / row["extra_mem_mib"]
