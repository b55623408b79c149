"""benchmarks/gpu_check.py: step running, budget, headlines and the summary table (the
GPU run itself is not something a CPU machine can check)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module        # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


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


@pytest.mark.parametrize("name", ["attention", "layer_norm", "bias_gelu", "gpt",
                                  "attention_sweep"])
def test_headline_reads_committed_results(gc, tmp_path, name):
    found = sorted(RESULTS.glob(f"*/{name}.json"))
    if not found:
        pytest.skip(f"no committed {name}.json")
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


def test_plan_runs_tests_then_benchmarks(gc, tmp_path):
    names = [s.name for s in gc.steps(tmp_path, quick=False, with_tests=True, gpu=True)]
    assert names[:4] == ["info", "peaks", "build extension", "tests"]
    assert names[4:] == ["bench attention", "bench gpt", "bench layer_norm",
                         "bench residual_layer_norm", "bench bias_gelu",
                         "bench attention sweep"]
    for step in gc.steps(tmp_path, quick=False, with_tests=False, gpu=True):
        assert step.name != "tests"
        if step.name.startswith("bench"):
            assert step.argv[-2:] == ["--save", str(tmp_path)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_refuses_a_machine_without_gpu_unless_quick(gc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.main([str(tmp_path)])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.main([str(tmp_path), "--budget", "0", "--quick"])
    assert "--budget must be > 0 seconds, got 0.0" in capsys.readouterr().err
