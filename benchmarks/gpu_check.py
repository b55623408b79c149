"""Check a GPU machine end to end, in one call, inside a time budget (default 9 minutes).

    bash benchmarks/gpu_check.sh OUT_DIR          # installs offline first, then this
    python benchmarks/gpu_check.py OUT_DIR [--budget 540] [--skip-tests] [--quick]

In order, each step in its own process with a time limit cut from what is left of the
budget, so that one slow or failing step costs its own result and never the others:

1. ``fastattn info``: GPU, versions, which backends run and why not (``info.txt``);
2. the device's peaks: a large matmul per dtype and a large device copy (``peaks.json``);
3. the C++/CUDA extension, built just in time (``fastattn.ext.load()``, cached): a build
   failure is reported and the rest runs without it;
4. the test suite on the device (``tests.log``; its last line goes in the summary);
5. the benchmarks, most telling first: attention, GPT training naive vs fast, LayerNorm,
   residual LayerNorm, bias-GELU (with the C++/CUDA extension when it builds), and the
   attention sweep (head dim × causal × dtype); each writes ``<op>.json`` and
   ``<op>.png`` into OUT_DIR (``fastattn bench --save OUT_DIR``);
6. a summary table, printed last: each step's status, seconds and headline numbers
   (``summary.txt``).

A step that would not fit what is left of the budget is skipped and says so. Copy the
results into ``benchmarks/results/<device>/`` and run ``python
benchmarks/update_readme.py`` to put them in the README. Runs on a CPU too (with
``--quick``: tiny sizes), which is how its own test runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASTATTN = [sys.executable, "-m", "fastattn"]


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float            # at most this long; less when the budget runs out
    needs_s: float            # skipped when less than this is left
    log: str | None = None    # file under OUT_DIR for the whole output
    results: list[str] = field(default_factory=list)   # JSON files it writes
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    step: Step
    status: str               # ok, failed (exit status N), timed out, skipped (why)
    seconds: float
    tail: str = ""
    headline: list[str] = field(default_factory=list)


def steps(out: Path, quick: bool, with_tests: bool, gpu: bool) -> list[Step]:
    save = ["--save", str(out)]
    q = ["--quick"] if quick else []
    tiny_attention = ["--seq", "128,256"] if quick else []
    tiny_rows = ["--seq", "256,1024"] if quick else []
    peaks = ("from fastattn import benchmark as fb; import json, torch, sys; "
             "d = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); "
             "dts = [torch.bfloat16, torch.float16, torch.float32] if d.type == 'cuda' "
             "else [torch.float32]; "
             f"q = {quick}; "
             "p = {'device': fb.device_name(d.type), "
             "'tflops': {fb.dtype_name(t): fb.measure_peak_tflops(d, t, q) for t in dts}, "
             "'copy': fb.measure_copy_gbps(d, torch.float32, q)}; "
             "print(json.dumps(p, indent=1))")
    build = ("import fastattn.ext as e; e.load(); print(e.describe())")
    out_steps = [
        Step("info", [*FASTATTN, "info"], 60, 5, log="info.txt"),
        Step("peaks", [sys.executable, "-c", peaks], 90, 10, log="peaks.json"),
        # JIT-build the C++/CUDA extension once (cached): the tests and --ext load it.
        Step("build extension", [sys.executable, "-c", build], 240, 30,
             log="build_extension.log"),
    ]
    if with_tests:
        out_steps.append(Step(
            "tests", [sys.executable, "-m", "pytest", "tests", "-q", "-x", "-p",
                      "no:cacheprovider", *(["-k", "not gpt and not train"] if quick else [])],
            200, 30, log="tests.log", env={"FASTATTN_AUTOTUNE": "0"}))
    ext = ["--ext"]
    out_steps += [
        Step("bench attention", [*FASTATTN, "bench", *tiny_attention, *q, *save], 110, 20,
             log="bench_attention.log", results=["attention.json"]),
        Step("bench gpt", [*FASTATTN, "bench", "--op", "gpt", *q, *save], 150, 30,
             log="bench_gpt.log", results=["gpt.json"]),
        *(Step(f"bench {op}", [*FASTATTN, "bench", "--op", op, *tiny_rows, *ext, *q, *save],
               60, 15, log=f"bench_{op}.log", results=[f"{op}.json"])
          for op in ("layer_norm", "residual_layer_norm", "bias_gelu")),
        Step("bench attention sweep",
             [*FASTATTN, "bench", "--sweep", *(["--seq", "128"] if quick else []), *q, *save],
             150, 40, log="bench_attention_sweep.log", results=["attention_sweep.json"]),
    ]
    if not gpu:      # a CPU check (--quick): the sweep alone would take minutes
        out_steps = [s for s in out_steps if s.name != "bench attention sweep"]
    return out_steps


def run_step(step: Step, out: Path, left_s: float) -> Outcome:
    if left_s < step.needs_s:
        return Outcome(step, f"skipped ({left_s:.0f} s left of the budget, needs "
                             f"{step.needs_s:.0f})", 0.0)
    limit = min(step.limit_s, left_s)
    print(f"== {step.name} (at most {limit:.0f} s): {' '.join(step.argv[:6])} ...",
          flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=limit, env={**os.environ, **step.env}, check=False)
        output, status = proc.stdout + proc.stderr, (
            "ok" if proc.returncode == 0 else f"failed (exit status {proc.returncode})")
        stdout = proc.stdout
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        stdout, status = _text(e.stdout), f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - start
    if step.log:
        (out / step.log).write_text(stdout if step.log.endswith(".json") else output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return Outcome(step, status, seconds, tail="\n".join(lines[-3:]),
                   headline=headline(step, out, lines))


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def headline(step: Step, out: Path, lines: list[str]) -> list[str]:
    """The step's few numbers for the summary: read from its results files."""
    from fastattn import bench_gpt
    from fastattn import benchmark as fb

    if step.name == "tests":
        return lines[-1:]
    if step.name == "peaks" and (out / "peaks.json").exists():
        try:
            p = json.loads((out / "peaks.json").read_text())
        except json.JSONDecodeError:
            return []
        return [", ".join(f"{k} {v['tflops']:.3g} TFLOP/s" for k, v in p["tflops"].items())
                + f"; copy {p['copy']['gbps']:.4g} GB/s"]
    if step.name == "info":
        # unindented "torch  2.x" lines are versions; the indented "cuda  <name>" line
        # under "devices:" is the GPU (backend lines start with the backend's name)
        versions = [" ".join(line.split()) for line in lines
                    if not line[0].isspace() and line.split()[0] in ("torch", "triton", "CUDA")]
        gpus = [" ".join(line.split()[1:]) for line in lines if line[0].isspace()
                and line.split()[0] == "cuda" and "none available" not in line]
        return [", ".join(versions), *gpus[:1]]
    if step.name == "build extension":
        return lines[-1:]
    found = []
    for name in step.results:
        path = out / name
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        if doc["op"] == "gpt":
            found += bench_gpt.summary(doc["rows"])
        elif "runs" in doc:
            rows = [r for r in fb.sweep_rows(doc) if "speedup_vs_naive" in r]
            if rows:
                lo = min(rows, key=lambda r: r["speedup_vs_naive"])
                found.append(f"{len(doc['runs'])} settings; speed vs naive "
                             f"{lo['speedup_vs_naive']:.1f}× (worst) to "
                             f"{max(r['speedup_vs_naive'] for r in rows):.1f}×")
        else:
            found += fb.summary(doc)
    return found


def summary_table(outcomes: list[Outcome], total_s: float, budget_s: float) -> str:
    width = max(len(o.step.name) for o in outcomes)
    lines = [f"{'step'.ljust(width)}  {'seconds':>7}  status / headline",
             f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
    for o in outcomes:
        lines.append(f"{o.step.name.ljust(width)}  {o.seconds:7.1f}  {o.status}")
        lines += [f"{''.ljust(width)}  {'':7}    {h}" for h in o.headline]
        if o.status.startswith(("failed", "timed out")) and o.tail:
            lines += [f"{''.ljust(width)}  {'':7}    | {t}" for t in o.tail.splitlines()]
    lines.append(f"total {total_s:.0f} s of a {budget_s:.0f} s budget")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a GPU machine end to end: info, peaks, "
                                            "tests, benchmarks, a summary.")
    p.add_argument("out", type=Path, help="directory for the results, logs and summary")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for everything (default 540: 9 minutes)")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke test of this script, not a measurement")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        p.error("no CUDA device: this check is for a GPU machine (--quick runs its tiny "
                "version on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    start, outcomes = time.perf_counter(), []
    for step in steps(args.out.resolve(), args.quick, not args.skip_tests, gpu):
        left = args.budget - (time.perf_counter() - start)
        outcomes.append(run_step(step, args.out.resolve(), left))
        print(f"   {outcomes[-1].status} in {outcomes[-1].seconds:.1f} s", flush=True)
    table = summary_table(outcomes, time.perf_counter() - start, args.budget)
    (args.out / "summary.txt").write_text(table + "\n")
    print("\n" + table)
    bad = [o for o in outcomes if o.status.startswith(("failed", "timed out"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
