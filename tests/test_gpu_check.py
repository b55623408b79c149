"""fastattn/tools/gpu_check.py (``bash benchmarks/gpu_check.sh``): step running, budget,
headlines, the plan and the summary table (the GPU run itself is not something a CPU
machine can check)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from fastattn.ops import registry
from fastattn.tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMITTED = sorted({path.stem for path in RESULTS.glob("*/*.json")})


@pytest.fixture(scope="module")
def gc():
    return gpu_check


def python_step(gc, name, code, limit=30.0, needs=0.0, log=None):
    return gc.Step(name, [sys.executable, "-c", code], limit, needs, log=log)


def test_step_outcomes(gc, tmp_path):
    ok = gc.run_step(python_step(gc, "ok", "print('hello')", log="ok.log"), tmp_path, 60)
    assert ok.status == "ok" and (tmp_path / "ok.log").read_text() == "hello\n"
    failed = gc.run_step(python_step(gc, "bad", "import sys; print('boom'); sys.exit(3)"),
                         tmp_path, 60)
    assert failed.status == "failed (exit status 3)" and "boom" in failed.tail
    slow = gc.run_step(python_step(gc, "slow", "import time; time.sleep(30)", limit=30),
                       tmp_path, 1.0)                        # the budget cuts the limit
    assert slow.status == "timed out after 1 s" and slow.seconds < 20
    skipped = gc.run_step(python_step(gc, "big", "print(1)", needs=100), tmp_path, 50)
    assert skipped.status == "skipped (50 s left of the budget, needs 100)"


def test_summary_table_lists_every_step_and_failure_tail(gc, tmp_path):
    outcomes = [gc.Outcome(python_step(gc, "info", ""), "ok", 1.5, headline=["torch 2"]),
                gc.Outcome(python_step(gc, "tests", ""), "failed (exit status 1)", 9.0,
                           tail="E   assert 1 == 2\n1 failed")]
    table = gc.summary_table(outcomes, 10.4, 540)
    assert table.splitlines()[0].split()[:2] == ["step", "seconds"]
    assert "torch 2" in table and "| 1 failed" in table
    assert table.endswith("total 10 s of a 540 s budget")


@pytest.mark.parametrize("name", COMMITTED)
def test_headline_reads_committed_results(gc, tmp_path, name):
    found = sorted(RESULTS.glob(f"*/{name}.json"))
    (tmp_path / f"{name}.json").write_text(found[0].read_text())
    step = gc.Step(f"bench {name}", [], 1, 1, results=[f"{name}.json"])
    lines = gc.headline(step, tmp_path, [])
    assert lines and all(isinstance(line, str) and "×" in line for line in lines)


def test_peaks_headline(gc, tmp_path):
    peaks = {"device": "x", "tflops": {"bfloat16": {"tflops": 700.0}},
             "copy": {"gbps": 3000.0}}
    (tmp_path / "peaks.json").write_text(json.dumps(peaks))
    lines = gc.headline(gc.Step("peaks", [], 1, 1), tmp_path, [])
    assert lines == ["bfloat16 700 TFLOP/s; copy 3000 GB/s"]


def test_committed_results_use_registry_names():
    """One name per op: every committed results file is a registry op, its sweep, gpt, or
    one of the benchmarks beside the registry (host overhead, decoding, the fused loss's
    memory)."""
    ops = set(registry.names())
    others = {"gpt", "overhead", "decode", "linear_cross_entropy_memory"}
    assert COMMITTED and set(COMMITTED) <= {*ops, *(f"{op}_sweep" for op in ops), *others}


def test_info_headline_names_the_gpu(gc, tmp_path):
    """The GPU line of ``fastattn info`` is ``  cuda:0  <name>``: the headline once looked
    for a line starting with ``cuda`` alone and never found the GPU."""
    lines = ["torch    2.13.0", "triton   3.9.0", "CUDA     12.8", "devices:",
             "  cpu     Some CPU, 16 cores, 16 threads", "  cuda:0  NVIDIA H200",
             "  triton  cuda  yes  compiled for sm_90"]
    assert gc.headline(gc.Step("info", [], 1, 1), tmp_path, lines) == [
        "torch 2.13.0, triton 3.9.0, CUDA 12.8", "NVIDIA H200"]


def test_plan_runs_tests_then_every_registered_op(gc, tmp_path):
    """Compute-bound ops first, then the GPT, host overhead and decoding, then the
    bandwidth-bound ops, then the sweeps of the compute-bound ones: every registry
    entry, none named here."""
    names = [s.name for s in gc.steps(tmp_path, quick=False, with_tests=True, gpu=True)]
    assert names[:4] == ["info", "peaks", "build extension", "tests"]
    compute = [s.name for s in registry.specs() if s.unit == "flops"]
    bandwidth = [s.name for s in registry.specs() if s.unit != "flops"]
    assert "flash_attention" in compute and "gelu" in bandwidth
    assert names[4:] == [*(f"bench {n}" for n in compute), "bench gpt", "bench overhead",
                         "bench decode", *(f"bench {n}" for n in bandwidth),
                         *(f"bench {n} sweep" for n in compute)]
    for step in gc.steps(tmp_path, quick=False, with_tests=False, gpu=True):
        assert step.name != "tests"
        if step.name.startswith("bench"):
            assert step.argv[-2:] == ["--save", str(tmp_path)]
            op = step.argv[step.argv.index("--op") + 1]
            beside = op in ("gpt", "overhead", "decode")       # not registry entries
            assert ("--ext" in step.argv) == (not beside and "sweep" not in step.name
                                              and "ext" in registry.get(op).backends)
            assert step.results == [f"{op}{'_sweep' if 'sweep' in step.name else ''}.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_refuses_a_machine_without_gpu_unless_quick(gc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.main([str(tmp_path)])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.main([str(tmp_path), "--budget", "0", "--quick"])
    assert "--budget must be > 0 seconds, got 0.0" in capsys.readouterr().err
