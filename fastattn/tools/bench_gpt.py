"""GPT training throughput: the naive GPT against the fast one, same config, one run.

    fastattn bench --op gpt [--quick] [--save]     # the short version (CPU defaults)
    python benchmarks/bench_gpt.py                 # every knob; CPU: T = 256, 512, 1024
    python benchmarks/bench_gpt.py --seq 1024 --steps 5 --save
    python benchmarks/bench_gpt.py --device cuda --save            # GPT-2 small, bf16

For each sequence length T and each variant (``naive``: textbook T×T attention and torch
modules; ``fast``: fastattn's kernels) it builds the same model (same seed, so the same
weights: checked), and times full training steps — forward, loss, backward, AdamW step —
on one fixed batch. It reports

* training tokens/s = B·T / median step time (CUDA: ``time_cuda``, CUDA events; CPU:
  ``perf_counter`` around each step, the two variants' steps interleaved in one process
  so that load from other processes hits both alike);
* extra peak memory of a step (gradients, optimizer state and activations): CUDA
  ``max_memory_allocated`` minus what was allocated before; CPU the peak RSS of a fresh
  process that runs the case's first step, minus its RSS before it;
* MFU = ``GPT.flops_per_token(T)`` (PaLM's 6·N + 12·L·H·Q·T) × tokens/s / peak, with the
  peak the best of a few large matmuls measured in the same run
  (``measure_peak_tflops``);
* on CPU also the process CPU time per step (``time.process_time``): with ``--threads 1``
  it hardly depends on other work on the machine, so its ratio is the steadier one on a
  shared machine;
* the first step's loss of each variant (they must agree, else both rows are marked
  "wrong" and the script exits with status 1) and the fast/naive speed and memory ratios.

On CPU the timing process is started with ``HEAP_RETENTION_ENV`` (freed memory stays in
the heap, the same for both variants; see DESIGN.md); the memory processes use the
default allocator. With ``--save``, results (with the harness's provenance: device,
versions, commit, date, allocator, load average) go to
``benchmarks/results/<device>/gpt.json`` and ``gpt.png``.

It lives in the package (not in ``benchmarks/``) so that ``fastattn bench --op gpt``
works from any installation; ``benchmarks/bench_gpt.py`` is its script and its
pytest-benchmark cases (``pytest benchmarks/ --benchmark-only``: a tiny model, both
variants). Timing, memory readings, provenance, tables, plots and saving are the
harness's (``fastattn.tools.bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fastattn.models import GPT, GPTConfig
from fastattn.models.optim import Precision, configure_optimizer, train_step
from fastattn.tools.bench import report
from fastattn.tools.bench.allocator import child_env
from fastattn.tools.bench.memory import extra_memory_mib, memory_before
from fastattn.tools.bench.provenance import REPO_ROOT, load_average, provenance
from fastattn.tools.bench.results import save
from fastattn.tools.bench.timing import measure_peak_tflops, quantiles, time_cpu, time_cuda
from fastattn.tools.common import default_device, dtype_of, positive_int, positive_ints

VARIANTS = ("naive", "fast")
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
CPU_DEFAULTS = dict(seq_lens=[256, 512, 1024], n_layer=4, n_embd=256, n_head=4, batch=2,
                    vocab_size=256, steps=20)
CUDA_DEFAULTS = dict(seq_lens=[1024, 2048, 4096], n_layer=12, n_embd=768, n_head=12, batch=4,
                     vocab_size=50304, steps=20)
# --quick: a smoke test of the whole path (both variants, the checks, the file), not a
# measurement.
QUICK = dict(seq_lens=[128, 256], steps=2)


def _build(case: dict) -> tuple[GPT, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """The case's model (seed 0: naive and fast get the same weights), AdamW, one batch."""
    device = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=case["vocab_size"], block_size=case["T"],
                          n_layer=case["n_layer"], n_head=case["n_head"],
                          n_embd=case["n_embd"], attention=case["variant"])).to(device)
    opt = configure_optimizer(model, 1e-4, 0.1, (0.9, 0.95), fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, case["vocab_size"], (case["batch"], case["T"]), generator=g)
            .to(device) for _ in range(2))
    return model, opt, x, y


def _train_step(case: dict, model: GPT, opt, x, y, losses: list) -> Callable[[], None]:
    """One training step as ``fastattn train`` runs it (``train_step``, no clipping):
    forward (autocast below fp32), loss, backward (loss-scaled in fp16), AdamW."""
    precision = Precision(dtype_of(case["dtype"]), torch.device(case["device"]).type)
    scaler = precision.scaler()

    def step() -> None:
        loss, _ = train_step(model, opt, scaler, precision, lambda: (x, y))
        losses.append(loss)
    return step


def _facts(case: dict, model: GPT, losses: list, checksum: float) -> dict:
    return {**case, "first_loss": float(losses[0]), "weights_checksum": checksum,
            "flops_per_token": model.flops_per_token(case["T"]),
            "non_embedding_params": model.num_params()}


def _checksum(model: GPT) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def measure_case(case: dict) -> dict:
    """Time one variant at one length in this process (the CUDA path) and measure the
    extra peak memory of its steps. ``case``: variant, T, batch, n_layer, n_embd,
    n_head, vocab_size, device, dtype, steps."""
    device = torch.device(case["device"])
    model, opt, x, y = _build(case)
    checksum, losses = _checksum(model), []
    step = _train_step(case, model, opt, x, y, losses)
    before = memory_before(device)
    step()                                                    # warm-up; its loss is checked
    if device.type == "cuda":
        t = time_cuda(step)
    else:
        t = time_cpu(step, budget_s=0.0, min_repeats=case["steps"],
                     max_repeats=case["steps"])
    row = {**_facts(case, model, losses, checksum),
           "extra_mem_mib": extra_memory_mib(device, before)}
    return _with_time(row, t.p20, t.p50, t.p80)


def time_interleaved(cases: list[dict]) -> list[dict]:
    """CPU timing: build every case of one length, warm each up, then time their steps
    in turn (naive, fast, naive, fast, ...) so that load from other processes on the
    machine falls on both alike. Median and 20/80 % quantiles per case."""
    built = []
    for case in cases:
        model, opt, x, y = _build(case)
        losses: list = []
        built.append((case, model, _checksum(model), losses,
                      _train_step(case, model, opt, x, y, losses)))
        built[-1][-1]()                                       # warm-up; its loss is checked
    times: list[list[float]] = [[] for _ in built]
    cpu: list[list[float]] = [[] for _ in built]
    for _ in range(cases[0]["steps"]):
        for i, (*_, step) in enumerate(built):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i].append((time.process_time() - c0) * 1e3)
    rows = []
    for (case, model, checksum, losses, _), ts, cs in zip(built, times, cpu):
        t = quantiles(ts)
        row = _facts(case, model, losses, checksum)
        # CPU time of the process per step: with --threads 1 it hardly depends on what
        # else the machine runs, unlike wall time.
        row["cpu_ms"] = statistics.median(cs)
        rows.append(_with_time(row, t.p20, t.p50, t.p80))
    return rows


def _with_time(row: dict, p20: float, p50: float, p80: float) -> dict:
    tokens = row["batch"] * row["T"]
    return {**row, "step_ms": p50, "step_ms_p20": p20, "step_ms_p80": p80,
            "tokens_per_s": tokens / (p50 * 1e-3)}


def _child(flag: str, payload, heap_retention: bool):
    """Run this module with ``flag`` in a fresh process: JSON ``payload`` in, JSON out."""
    env = child_env(heap_retention)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fastattn.tools.bench_gpt", flag],
                          input=json.dumps(payload),
                          stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark process ({flag}) failed with exit status "
                           f"{proc.returncode}")
    return json.loads(proc.stdout)


def run_gpt_bench(seq_lens: list[int] | None = None, steps: int | None = None,
                  device: str | None = None, dtype: str | None = None,
                  n_layer: int | None = None, n_embd: int | None = None,
                  n_head: int | None = None, batch: int | None = None,
                  vocab_size: int | None = None, isolate: bool | None = None,
                  peak: dict | None = None, threads: int | None = None,
                  memory: bool = True, verbose: bool = True) -> list[dict]:
    """Measure naive and fast GPT training at each length; one dict per (T, variant).

    Defaults: CPU — 4 layers, width 256, 4 heads, batch 2, vocab 256, fp32,
    T = 256, 512, 1024, 20 timed steps per variant (interleaved: the median of 5 moved
    by ±2% between runs); CUDA — GPT-2 small (12 layers, 768, 12 heads), batch 4,
    vocab 50304, bf16 autocast, T = 1024, 2048, 4096.

    CPU with ``isolate`` (default on Linux): the timing runs in one child process with
    ``HEAP_RETENTION_ENV``, the variants' steps interleaved (``time_interleaved``), and
    each case's memory in its own fresh process (default malloc, one step). Without it,
    or on CUDA, ``measure_case`` runs here. ``peak``: a ``measure_peak_tflops`` result
    to reuse (measured here otherwise). ``threads``: torch's CPU threads in every case
    (default: torch's choice). Rows have ``tokens_per_s``, ``step_ms``,
    ``extra_mem_mib``, ``mfu``, ``status`` ("ok", or "wrong" if the variants' weights
    or first losses differ) and, for fast rows, ``speedup_vs_naive`` and
    ``mem_ratio_vs_naive``. ``memory=False`` skips the CPU memory processes (the rows get
    no ``extra_mem_mib``); on CUDA the memory is measured in the timing process anyway.
    """
    device = device or default_device()
    d = CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    isolate = (device == "cpu" and sys.platform == "linux") if isolate is None else isolate
    peak = peak or measure_peak_tflops(torch.device(device), dtype_of(dtype))
    base = dict(n_layer=n_layer or d["n_layer"], n_embd=n_embd or d["n_embd"],
                n_head=n_head or d["n_head"], batch=batch or d["batch"],
                vocab_size=vocab_size or d["vocab_size"], device=device, dtype=dtype,
                steps=steps or d["steps"], threads=threads)
    rows = []
    for t in seq_lens or d["seq_lens"]:
        cases = [{**base, "variant": v, "T": t} for v in VARIANTS]
        if isolate:
            pair = _child("--_time", cases, heap_retention=True)
            for row in pair if memory else ():
                mem = _child("--_case", {**row_case(row), "steps": 1}, heap_retention=False)
                row["extra_mem_mib"] = mem["extra_mem_mib"]
        else:
            pair = [_measure_or_fail(c) for c in cases]
        for row in pair:
            if "tokens_per_s" in row:
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (
                    peak["tflops"] * 1e12)
            if verbose:
                mem = (f", {row['extra_mem_mib']:,.0f} MiB" if "extra_mem_mib" in row else "")
                print(f"  T={t} {row['variant']}: " + (
                    f"{row['tokens_per_s']:,.0f} tok/s{mem}"
                    if "tokens_per_s" in row else row["error"]), file=sys.stderr, flush=True)
        _compare(*pair)
        rows += pair
    return rows


def _measure_or_fail(case: dict) -> dict:
    """``measure_case``; a case that fails (the naive model out of GPU memory at long T)
    gets a row with ``status`` "error" and the message instead of numbers."""
    try:
        return measure_case(case)
    except Exception as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**case, "status": "error", "error": f"{type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}"}


def row_case(row: dict) -> dict:
    keys = ("variant", "T", "batch", "n_layer", "n_embd", "n_head", "vocab_size", "device",
            "dtype", "steps", "threads")
    return {k: row[k] for k in keys}


def _compare(naive: dict, fast: dict) -> None:
    """Same weights, same first loss (else both rows are marked wrong); then ratios."""
    if naive.get("status") == "error" or fast.get("status") == "error":
        for row in (naive, fast):
            row.setdefault("status", "ok")
        return
    rtol = LOSS_RTOL[dtype_of(fast["dtype"])]
    same_weights = abs(naive["weights_checksum"] - fast["weights_checksum"]) <= 1e-9 * max(
        1.0, abs(naive["weights_checksum"]))
    loss_err = abs(naive["first_loss"] - fast["first_loss"]) / abs(naive["first_loss"])
    ok = same_weights and loss_err <= rtol
    for row in (naive, fast):
        row.update(status="ok" if ok else "wrong", loss_rel_diff=loss_err)
    fast["speedup_vs_naive"] = fast["tokens_per_s"] / naive["tokens_per_s"]
    if "cpu_ms" in fast:
        fast["cpu_speedup_vs_naive"] = naive["cpu_ms"] / fast["cpu_ms"]
    if naive.get("extra_mem_mib", 0) > 0 and fast.get("extra_mem_mib", 0) > 0:
        fast["mem_ratio_vs_naive"] = naive["extra_mem_mib"] / fast["extra_mem_mib"]


# ---------------------------------------------------------------------- results


def results_document(rows: list[dict], peak: dict, command: str,
                     load: list[float] | None) -> dict:
    """The results with the harness's provenance (``load``: load average at the start)."""
    device, dtype = rows[0]["device"], rows[0]["dtype"]
    threads = rows[0].get("threads") or torch.get_num_threads()
    prov = provenance(device, dtype, threads, load)
    prov["command"] = command
    return {"schema": 1, "op": "gpt", "x": "T", "unit": "tokens/s", "peak": peak,
            "provenance": prov, "rows": rows}


# -------------------------------------------------------------------------- main


def bench_and_report(command: str, *, seq_lens: list[int] | None = None,
                     steps: int | None = None, device: str | None = None,
                     dtype: str | None = None, quick: bool = False, memory: bool = True,
                     save_dir: str | None = None, threads: int | None = None,
                     **model: int | None) -> int:
    """Measure, print the table and (``save_dir`` not None; "" = the default folder) save
    it: what ``fastattn bench --op gpt`` and ``python benchmarks/bench_gpt.py`` run.
    ``model``: n_layer, n_embd, n_head, batch, vocab_size overrides. Returns the exit
    status: 1 if the variants disagree."""
    start, load = time.perf_counter(), load_average()
    device = device or default_device()
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if quick:
        seq_lens, steps = seq_lens or QUICK["seq_lens"], steps or QUICK["steps"]
    if threads:
        torch.set_num_threads(threads)                  # also for the peak matmul
    peak = measure_peak_tflops(torch.device(device), dtype_of(dtype), quick=quick)
    rows = run_gpt_bench(seq_lens, steps, device, dtype, peak=peak, threads=threads,
                         memory=memory, **model)
    doc = results_document(rows, peak, command, load)
    print(report.describe_gpt(doc) + "\n")
    print(report.format_gpt_table(rows))
    if report.gpt_summary(rows):
        print("\n" + "\n".join(report.gpt_summary(rows)))
    if save_dir is not None:
        path, png, note = save(doc, save_dir or None)
        print(f"\nsaved {path}" + (f" and {png}" if png else f" ({note})"))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] in (["--_case"], ["--_time"]):   # a child process
        work = measure_case if sys.argv[1] == "--_case" else time_interleaved
        print(json.dumps(work(json.loads(sys.stdin.read()))))
        return 0
    p = argparse.ArgumentParser(description="Naive vs fast GPT training throughput.")
    p.add_argument("--seq", type=positive_ints, help="sequence lengths (CPU: 256,512,1024)")
    p.add_argument("--steps", type=positive_int, help="timed steps per case (CPU 5)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    for name in ("n-layer", "n-embd", "n-head", "batch", "vocab-size"):
        p.add_argument(f"--{name}", type=positive_int)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: "
                   "torch's choice; 1 is steadier on a machine shared with other work)")
    p.add_argument("--quick", action="store_true", help="T=128,256, 2 steps: a smoke test")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the CPU peak-memory processes")
    p.add_argument("--save", nargs="?", const="", metavar="DIR",
                   help="write gpt.json and gpt.png (default benchmarks/results/<device>/)")
    args = p.parse_args(argv)
    command = " ".join(["python", *(sys.argv if argv is None else ["-m", __name__, *argv])])
    return bench_and_report(command, seq_lens=args.seq, steps=args.steps, device=args.device,
                            dtype=args.dtype, quick=args.quick, memory=args.memory,
                            save_dir=args.save, threads=args.threads, n_layer=args.n_layer,
                            n_embd=args.n_embd, n_head=args.n_head, batch=args.batch,
                            vocab_size=args.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
