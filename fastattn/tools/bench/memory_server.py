"""CPU extra peak memory, each (implementation, size, mode) in a fresh process.

The memory server has imported torch and fastattn and runs no op itself; each job runs
in a process forked from it: it builds the inputs, warms the implementation up on a tiny
input (thread pool, library set-up), reads its resident set size, runs the call once and
reads the peak resident set size; the difference is the extra memory. The server uses
glibc's default allocator. ``MemoryServer`` is the parent's handle, started early so
that its imports overlap other work, then given all jobs at once.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch

from fastattn.tools.bench.allocator import child_env
from fastattn.tools.bench.check import run_once
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.memory import extra_memory_mib, memory_before
from fastattn.tools.common import dtype_of

MEMORY_TIMEOUT_S = 300          # for one answer of the memory process
MEMORY_WORKERS = 2              # memory processes at a time (RSS does not mind sharing)


def _memory_job(job: dict) -> dict:
    """In a fresh forked process: extra peak RSS of one call, in MiB."""
    cfg, shape, device = Config(**job["config"]), job["shape"], torch.device("cpu")
    spec, dtype = cfg.spec, dtype_of(cfg.dtype)
    impl = next(i for i in cfg.impls()[0] if i.name == job["impl"])
    tiny = {**shape, spec.x: min(shape[spec.x], 64)}
    run_once(impl, *spec.inputs(tiny, dtype, device, 1), job["mode"])  # warm-up, seed 1
    inputs, dout = spec.inputs(shape, dtype, device, 0)
    before = memory_before(device)
    run_once(impl, inputs, dout, job["mode"])
    return {"extra_mem_mib": extra_memory_mib(device, before)}


def memory_server() -> None:
    """Entry point of the memory process. Reads all jobs (JSON lines) until stdin
    closes, runs up to ``MEMORY_WORKERS`` forks at a time, answers ``[index, answer]``
    lines."""
    import torch._dynamo  # noqa: F401  a custom op's first call imports it: once, here
    print(json.dumps({"ready": True}), flush=True)
    pending = list(enumerate(json.loads(line) for line in sys.stdin))
    running: dict[int, tuple[int, int]] = {}          # pid -> (job index, pipe)
    while pending or running:
        while pending and len(running) < MEMORY_WORKERS:
            index, job = pending.pop(0)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:   # the measuring process: never returns into this loop
                try:
                    os.close(r)
                    try:
                        answer = _memory_job(job)
                    except BaseException as e:  # noqa: BLE001  reported to the parent
                        answer = {"error": f"{type(e).__name__}: {e}"}
                    os.write(w, json.dumps(answer).encode())   # small: fits the pipe
                finally:
                    os._exit(0)
            os.close(w)
            running[pid] = (index, r)
        pid, status = os.wait()
        index, r = running.pop(pid)
        with os.fdopen(r, "rb") as f:
            data = f.read().decode()
        answer = json.loads(data) if data else {"error": f"the process died ({status})"}
        print(json.dumps([index, answer]), flush=True)


class MemoryServer:
    """The parent's handle on ``memory_server``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "from fastattn.tools.bench.memory_server import memory_server as m; m()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_env(retain=False))

    def _line(self) -> Any:
        ready, _, _ = select.select([self.proc.stdout], [], [], MEMORY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("no answer from the memory process "
                               f"(exit status {self.proc.poll()})")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._line()

    def measure(self, jobs: list[dict]) -> list[dict]:
        self.proc.stdin.write("".join(json.dumps(job) + "\n" for job in jobs))
        self.proc.stdin.close()
        answers: list[dict] = [{"error": "not measured"}] * len(jobs)
        try:
            for _ in jobs:
                index, answer = self._line()
                answers[index] = answer
        except RuntimeError as e:
            answers = [a if "error" not in a else {"error": str(e)} for a in answers]
        return answers


def cpu_memory(server: MemoryServer, cfg: Config, rows: list[dict]) -> None:
    """Fill in ``extra_mem_mib`` (or ``mem_error``) of every row that has a time."""
    todo = [r for r in rows if r["status"] == "ok"]
    # Largest first, so that the slow naive jobs do not end up alone at the end.
    todo.sort(key=lambda r: (r["kind"] == "naive", r["time_ms"]["p50"]), reverse=True)
    answers = server.measure([{"config": asdict(cfg), "shape": r["shape"], "impl": r["impl"],
                               "mode": r["mode"]} for r in todo])
    for row, answer in zip(todo, answers):
        if "error" in answer:
            row["mem_error"] = answer["error"]
        else:
            row["extra_mem_mib"] = answer["extra_mem_mib"]
