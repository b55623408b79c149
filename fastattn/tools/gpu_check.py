"""Check a GPU machine end to end, in one call, inside a time budget (default 9 minutes).

    bash benchmarks/gpu_check.sh OUT_DIR          # installs offline first, then this
    python -m fastattn.tools.gpu_check OUT_DIR [--budget 540] [--skip-tests] [--quick]

In order, each step in its own process with a time limit cut from what is left of the
budget, so that one slow or failing step costs its own result and never the others:

1. ``fastattn info``: GPU, versions, which backends run and why not (``info.txt``);
2. the device's peaks: a large matmul per dtype and a large device copy (``peaks.json``);
3. the C++/CUDA extension, built just in time (``fastattn.ext.load()``, cached): a build
   failure is reported and the rest runs without it;
4. the test suite on the device (``tests.log``; its last line goes in the summary);
5. the benchmarks of every registered op (``fastattn.ops.registry``), most telling
   first: the compute-bound ops (attention), GPT training naive vs fast, the
   bandwidth-bound ops (LayerNorm, residual LayerNorm, RMSNorm, bias-GELU; with the
   C++/CUDA extension when it builds), then each compute-bound op's sweep (attention:
   head dim × causal × dtype); each writes ``<op>.json`` and ``<op>.png`` into OUT_DIR
   (``fastattn bench --save OUT_DIR``);
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

import torch

from fastattn.ops import registry
from fastattn.ops.registry import OpSpec
from fastattn.tools.bench import report
from fastattn.tools.bench.ops import tiny_settings
from fastattn.tools.bench.provenance import REPO_ROOT, device_name
from fastattn.tools.bench.timing import measure_copy_gbps, measure_peak_tflops
from fastattn.tools.common import default_device, dtype_name

FASTATTN = [sys.executable, "-m", "fastattn"]
# The benchmark steps' time limits and the least time each needs, by the unit of the
# op's work: a compute-bound op (attention) takes longer than a row-wise one.
BENCH_LIMITS = {"flops": (110, 20), "bytes": (60, 15)}


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


def print_peaks(quick: bool) -> None:
    """The peaks step's process: a large matmul per dtype and a large copy, as JSON."""
    device = torch.device(default_device())
    dtypes = ([torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda"
              else [torch.float32])
    print(json.dumps({"device": device_name(device.type),
                      "tflops": {dtype_name(d): measure_peak_tflops(device, d, quick)
                                 for d in dtypes},
                      "copy": measure_copy_gbps(device, torch.float32, quick)}, indent=1))


def _bench_step(spec: OpSpec, out: Path, quick: bool, gpu: bool, sweep: bool = False
                ) -> Step:
    """``fastattn bench --op <op> [--sweep]``, saved into ``out``; with ``quick`` at tiny
    sizes (a sweep at one), with ``--ext`` where the op has an ext backend."""
    sizes = tiny_settings(spec, "cuda" if gpu else "cpu")["sizes"][:1 if sweep else 2]
    argv = [*FASTATTN, "bench", "--op", spec.name, *(["--sweep"] if sweep else []),
            *(["--seq", ",".join(map(str, sizes)), "--quick"] if quick else []),
            *(["--ext"] if "ext" in spec.backends and not sweep else []), "--save", str(out)]
    stem = f"{spec.name}_sweep" if sweep else spec.name
    limit, needs = (150, 40) if sweep else BENCH_LIMITS[spec.unit]
    return Step(f"bench {spec.name}{' sweep' if sweep else ''}", argv, limit, needs,
                log=f"bench_{stem}.log", results=[f"{stem}.json"])


def steps(out: Path, quick: bool, with_tests: bool, gpu: bool) -> list[Step]:
    q = ["--quick"] if quick else []
    build = "import fastattn.ext as e; e.load(); print(e.describe())"
    out_steps = [
        Step("info", [*FASTATTN, "info"], 60, 5, log="info.txt"),
        Step("peaks", [sys.executable, "-c", "from fastattn.tools.gpu_check import "
                       f"print_peaks; print_peaks({quick})"], 90, 10, log="peaks.json"),
        # JIT-build the C++/CUDA extension once (cached): the tests and --ext load it.
        Step("build extension", [sys.executable, "-c", build], 240, 30,
             log="build_extension.log"),
    ]
    if with_tests:
        out_steps.append(Step(
            "tests", [sys.executable, "-m", "pytest", "tests", "-q", "-x", "-p",
                      "no:cacheprovider", *(["-k", "not gpt and not train"] if quick else [])],
            200, 30, log="tests.log", env={"FASTATTN_AUTOTUNE": "0"}))
    compute = [s for s in registry.specs() if s.unit == "flops"]
    bandwidth = [s for s in registry.specs() if s.unit != "flops"]
    out_steps += [
        *(_bench_step(spec, out, quick, gpu) for spec in compute),
        Step("bench gpt", [*FASTATTN, "bench", "--op", "gpt", *q, "--save", str(out)], 150,
             30, log="bench_gpt.log", results=["gpt.json"]),
        # host time per call against torch's, and decoding tokens/s (CUDA graphs on a GPU)
        *(Step(f"bench {name}", [*FASTATTN, "bench", "--op", name, *q, "--save", str(out)],
               limit, 20, log=f"bench_{name}.log", results=[f"{name}.json"])
          for name, limit in (("overhead", 90), ("decode", 150))),
        *(_bench_step(spec, out, quick, gpu) for spec in bandwidth),
        # On a CPU (--quick) a sweep alone would take minutes.
        *(_bench_step(spec, out, quick, gpu, sweep=True) for spec in compute if gpu),
    ]
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
        proc = subprocess.run(step.argv, cwd=REPO_ROOT, capture_output=True, text=True,
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
        # unindented "torch  2.x" lines are versions; the indented "cuda:0  <name>" lines
        # under "devices:" are the GPUs (backend lines start with the backend's name)
        versions = [" ".join(line.split()) for line in lines
                    if not line[0].isspace() and line.split()[0] in ("torch", "triton", "CUDA")]
        gpus = [" ".join(line.split()[1:]) for line in lines if line[0].isspace()
                and line.split()[0].startswith("cuda:")]
        return [", ".join(versions), *gpus[:1]]
    if step.name == "build extension":
        return lines[-1:]
    return [line for name in step.results if (out / name).exists()
            for line in report.headline(json.loads((out / name).read_text()))]


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
