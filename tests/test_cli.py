"""The ``fastattn`` command line and the benchmark harness behind it
(``fastattn.tools.bench``), at tiny sizes.

``fastattn bench`` runs once per session (a subprocess, as a user runs it) and the tests
read its table and saved files; the rest calls ``fastattn.tools.cli.main`` in this process.
No timing is asserted: only that every number is there and well-formed.
"""
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.tools import cli
from fastattn.ops import registry
from fastattn.tools import gpu_check
from fastattn.tools.bench import report, sweep
from fastattn.tools.bench.allocator import allocator_setting, heap_retention_active
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.measure import measure
from fastattn.tools.bench.memory_server import _memory_job
from fastattn.tools.bench.ops import Impl
from fastattn.tools.bench.results import save

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("naive", "sdpa", "fastattn/torch")


def fastattn_cmd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """``fastattn bench`` on the CPU at T = 64, 128 with ``--save`` into a tmp dir."""
    out = tmp_path_factory.mktemp("results")
    proc = fastattn_cmd("bench", "--device", "cpu", "--seq", "64,128", "--heads", "2",
                        "--quick", "--save", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def test_bench_prints_table_with_every_impl(bench):
    proc, _ = bench
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("impl "))
    for column in ("time ms", "TFLOP/s", "% peak", "extra MiB", "speed vs naive",
                   "mem naive/x", "speed vs sdpa"):
        assert column in header
    rows = [line.split() for line in lines[lines.index(header):]
            if line.split()[:1] and line.split()[0] in IMPLS and " at " not in line]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (impl, t, mode) for impl in IMPLS for t in ("64", "128") for mode in ("fwd", "fwd+bwd")}
    assert all(len(r) == 11 and "-" not in r[3:6] for r in rows), rows
    assert "fastattn/triton: not run" in proc.stdout      # skipped with its reason
    assert "fastattn/torch at T=128 fwd+bwd:" in proc.stdout   # the headline ratios
    assert "T=128" in proc.stderr                          # progress goes to stderr


def test_bench_save_writes_json_with_provenance_and_png(bench):
    _, out = bench
    results = json.loads((out / "flash_attention.json").read_text())
    assert results["op"] == "flash_attention"
    prov = results["provenance"]
    for key in ("device", "torch", "triton", "cuda", "python", "commit", "dirty", "date",
                "dtype", "threads", "allocator", "command"):
        assert key in prov, key
    assert prov["dtype"] == "float32" and prov["command"].startswith("fastattn bench")
    assert "MALLOC_MMAP_THRESHOLD_" in prov["allocator"]["timing"]
    assert results["shapes"] == [{"B": 1, "H": 2, "T": t, "D": 64} for t in (64, 128)]
    assert len(results["rows"]) == 12
    for row in results["rows"]:
        assert row["status"] == "ok", row
        assert row["time_ms"]["p20"] <= row["time_ms"]["p50"] <= row["time_ms"]["p80"]
        assert row["tflops"] > 0 and row["extra_mem_mib"] >= 0
        assert row["flops"] == registry.attention_flops(1, 2, row["T"], row["T"], 64, True,
                                                        row["mode"])
    if importlib.util.find_spec("matplotlib"):
        assert (out / "flash_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_lists_backends_with_reasons(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for what in ("torch", "triton", "CUDA", "python"):
        assert what in out
    backend_lines = [line.split(None, 3) for line in out.splitlines()
                     if line.split()[:1] and line.split()[0] in ("triton", "ext", "torch")
                     and len(line.split()) > 3]
    assert {b[0] for b in backend_lines} == {"triton", "ext", "torch"}
    assert ["torch", "cpu", "yes", "eager PyTorch"] in backend_lines
    assert all(len(b) == 4 and b[3] for b in backend_lines)   # each with a reason


def test_python_m_fastattn_help():
    proc = fastattn_cmd("--help")
    assert proc.returncode == 0
    assert "bench" in proc.stdout and "info" in proc.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: fastattn" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["bench", "--op", "nope"], "invalid choice: 'nope'"),
    (["bench", "--op", "attention"], "'flash_attention'"),    # one name per op: the new one
    (["bench", "--op", "bias_gelu"], "'gelu'"),
    (["bench", "--op", "layer_norm", "--heads", "2"],
     "heads do(es) not apply to op 'layer_norm'; its shape takes batch"),
    (["bench", "--op", "gelu", "--no-causal"], "causal does not apply to op 'gelu'"),
    (["bench", "--seq", "128,abc"], "positive integers, got '128,abc'"),
    (["bench", "--seq", "0"], "positive integers, got '0'"),
    (["bench", "--mode", "bwd"], "subset of fwd, fwd+bwd, got 'bwd'"),
    (["bench", "--heads", "-1"], "positive integer, got '-1'"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["bench", "--op", "gpt", "--head-dim", "64"], "--head-dim do(es) not apply to --op gpt"),
    (["bench", "--op", "gelu", "--sweep", "--dtype", "float32"],
     "--sweep has nothing left to cross"),
    (["bench", "--op", "gpt", "--ext", "--no-causal"],
     "--no-causal, --ext do(es) not apply to --op gpt"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_bench_on_missing_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err


def test_allocator_setting_is_recorded_as_run():
    retained = allocator_setting("cpu", retain=True)
    assert retained["timing"] == ("MALLOC_MMAP_THRESHOLD_=1099511627776 "
                                  "MALLOC_TRIM_THRESHOLD_=1099511627776")
    assert allocator_setting("cpu", retain=False)["timing"].startswith("default")


def test_attention_flops():
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert registry.attention_flops(2, 3, 128, 128, 64, False) == fwd
    assert registry.attention_flops(2, 3, 128, 128, 64, True) == fwd / 2
    assert registry.attention_flops(2, 3, 128, 128, 64, True, "bwd") == 2.5 * fwd / 2
    assert registry.attention_flops(2, 3, 128, 128, 64, True, "fwd+bwd") == 3.5 * fwd / 2


def test_wrong_implementation_gets_no_number(monkeypatch):
    real = Config.impls

    def with_broken(cfg):
        impls, skipped = real(cfg)
        broken = Impl("broken", "fastattn", lambda q, k, v: impls[0](q, k, v) * 1.01)
        return [*impls, broken], skipped

    monkeypatch.setattr(Config, "impls", with_broken)
    measured = measure(Config(device="cpu", sizes=[32], heads=2, quick=True))
    rows = {(r["impl"], r["mode"]): r for r in measured["rows"]}
    for mode in registry.MODES:
        assert rows["broken", mode]["status"] == "wrong"
        assert "time_ms" not in rows["broken", mode]
        assert rows["fastattn/torch", mode]["status"] == "ok"
    doc = {"x": "T", "unit": "TFLOP/s", "rows": measured["rows"], "skipped": {}}
    assert "WRONG (err 1.0e-02)" in report.format_table(doc)


def test_a_registered_op_appears_in_every_tool(monkeypatch, tmp_path):
    """Issue 12: ``fastattn bench``, ``fastattn profile``, the GPU check and the
    pytest-benchmark suite take their ops from the registry, so a new entry needs no
    edit of any of them; the harness measures it like the others."""
    copy = dataclasses.replace(registry.get("gelu"), name="gelu_copy", backends=("torch",))
    monkeypatch.setitem(registry._REGISTRY, "gelu_copy", copy)
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "--op", "gelu_copy"]).op == "gelu_copy"
    assert parser.parse_args(["profile", "--op", "gelu_copy"]).op == "gelu_copy"
    steps = gpu_check.steps(tmp_path, quick=True, with_tests=False, gpu=False)
    assert "bench gelu_copy" in [s.name for s in steps]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))   # as pytest does for bench_ops
    ids = [p.id for p in importlib.import_module("_cases").parametrize().args[1]]
    assert "gelu_copy-fastattn/torch-M64-N96-fwd" in ids
    measured = measure(Config(op="gelu_copy", device="cpu", sizes=[32], batch=8, quick=True))
    assert {(r["impl"], r["status"]) for r in measured["rows"]} == {
        ("naive", "ok"), ("F.gelu(x+b)", "ok"), ("fastattn/torch", "ok")}
    assert measured["skipped"]["fastattn/ext"] == "does not implement gelu_copy"


@pytest.mark.parametrize("op", registry.names())
def test_memory_job_runs_every_registered_op(op):
    """The memory job builds inputs as the registry declares them, positionally: it once
    passed ``seed=`` by keyword, which entries built with ``lambda *a`` (rms_norm,
    residual_layer_norm) refuse, so their memory was never measured."""
    cfg = Config(op=op, device="cpu", sizes=[32], batch=2).resolve()
    answer = _memory_job({"config": dataclasses.asdict(cfg), "shape": cfg.shapes()[0],
                          "impl": "naive", "mode": cfg.modes[-1]})
    assert answer["extra_mem_mib"] >= 0


@pytest.fixture(scope="module")
def gpt_bench(tmp_path_factory):
    """``fastattn bench --op gpt`` on the CPU: a 2-head model at T = 32, 64, saved."""
    out = tmp_path_factory.mktemp("gpt-results")
    proc = fastattn_cmd("bench", "--op", "gpt", "--device", "cpu", "--seq", "32,64",
                        "--heads", "2", "--batch", "1", "--quick", "--save", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def test_gpt_bench_compares_variants_and_saves(gpt_bench):
    proc, out = gpt_bench
    doc = json.loads((out / "gpt.json").read_text())
    assert doc["op"] == "gpt" and doc["provenance"]["command"].startswith("fastattn bench")
    rows = {(r["T"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(t, v) for t in (32, 64) for v in ("naive", "fast")}
    for (t, variant), r in rows.items():
        assert r["status"] == "ok" and r["n_head"] == 2 and r["batch"] == 1
        assert r["tokens_per_s"] > 0 and r["extra_mem_mib"] >= 0
        # MFU against the peak measured in the same run (under load from other
        # processes the peak can come out low, and a tiny model's MFU above 1)
        assert r["mfu"] == pytest.approx(
            r["flops_per_token"] * r["tokens_per_s"] / (doc["peak"]["tflops"] * 1e12))
        # same weights, the same first loss (checked by the benchmark before it reports)
        assert r["first_loss"] == pytest.approx(rows[t, "naive"]["first_loss"], rel=1e-4)
    for t in (32, 64):
        fast, naive = rows[t, "fast"], rows[t, "naive"]
        assert fast["speedup_vs_naive"] == pytest.approx(
            fast["tokens_per_s"] / naive["tokens_per_s"])
        assert f"fast GPT at T={t}: {fast['speedup_vs_naive']:.2f}× the naive" in proc.stdout
    assert (out / "gpt.png").stat().st_size > 0


def test_gpt_bench_rows_that_disagree_are_wrong():
    from fastattn.tools import bench_gpt
    naive = {"dtype": "float32", "weights_checksum": 1.0, "first_loss": 5.0,
             "tokens_per_s": 10.0, "extra_mem_mib": 2.0}
    fast = {**naive, "first_loss": 5.5, "tokens_per_s": 20.0, "extra_mem_mib": 1.0}
    bench_gpt._compare(naive, fast)
    assert naive["status"] == fast["status"] == "wrong"
    same = {**naive, "tokens_per_s": 30.0}
    bench_gpt._compare(naive, same)
    assert same["status"] == "ok" and same["speedup_vs_naive"] == 3.0


def test_sweep_crosses_settings_and_keeps_each_run(tmp_path):
    """``run_sweep`` in this process (no memory processes): one full run per point."""
    cfg = Config(device="cpu", sizes=[32], heads=2, quick=True, memory=False,
                 heap_retention=heap_retention_active(), modes=["fwd"])
    seen = []
    doc = sweep.run_sweep(cfg, {"head_dim": [16, 32], "causal": [True, False]},
                          on_run=lambda d: seen.append(d["sweep_point"]))
    points = [{"head_dim": d, "causal": c} for d in (16, 32) for c in (True, False)]
    assert seen == points and [r["sweep_point"] for r in doc["runs"]] == points
    for run, point in zip(doc["runs"], points):
        assert run["config"]["head_dim"] == point["head_dim"]
        assert run["config"]["causal"] is point["causal"]
        assert {r["shape"]["D"] for r in run["rows"]} == {point["head_dim"]}
        assert {r["impl"] for r in run["rows"]} >= {"naive", "sdpa", "fastattn/torch"}
    rows = report.sweep_rows(doc)
    assert len(rows) == 4 and all(r["status"] == "ok" and "speedup_vs_naive" in r
                                  for r in rows)
    table = report.format_sweep_table(doc)
    assert table.splitlines()[0].split()[:4] == ["head_dim", "causal", "T", "mode"]
    assert "flash_attention sweep on" in report.describe_sweep(doc)
    json_path, png_path, _ = save(doc, tmp_path / "results" / "cpu-test-2c")
    assert json_path.name == "flash_attention_sweep.json" and png_path.stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:flash_attention_sweep:begin -->\n"
                      "<!-- results:flash_attention_sweep:end -->\n")
    argv = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert load_update_readme().main(argv) == 0
    assert "| head_dim | causal | T | mode | impl |" in readme.read_text()
    with pytest.raises(ValueError, match="sweep axes must be among"):
        sweep.run_sweep(cfg, {"colour": [1]})


def test_sweep_axes_follow_the_registry_entry():
    assert sweep.sweep_axes("flash_attention", "cpu") == {
        "head_dim": [32, 64, 128], "causal": [True, False], "dtype": ["float32", "bfloat16"]}
    assert sweep.sweep_axes("layer_norm", "cuda") == {
        "dtype": ["bfloat16", "float16", "float32"]}
    assert sweep.sweep_size("flash_attention", "cpu") == 2048


def load_update_readme():
    spec = importlib.util.spec_from_file_location("update_readme",
                                                  ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_readme_replaces_only_the_marked_block(bench, gpt_bench, tmp_path, capsys):
    _, out = bench
    _, gpt_out = gpt_bench
    results_dir = tmp_path / "results"
    (results_dir / "cpu-test-2c").mkdir(parents=True)
    for name in os.listdir(out):
        (results_dir / "cpu-test-2c" / name).write_bytes((out / name).read_bytes())
    before = "# Title\n\nintro\n\n<!-- results:flash_attention:begin -->\n"
    after = "<!-- results:flash_attention:end -->\n\n## Layout\ntext\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + "stale table\n" + after)
    update_readme = load_update_readme()
    argv = ["--readme", str(readme), "--results", str(results_dir)]

    assert update_readme.main(argv + ["--check"]) == 1
    assert update_readme.main(argv) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "stale table" not in text
    assert "results/cpu-test-2c/flash_attention.json" in text      # names its source
    device = json.loads((out / "flash_attention.json").read_text())["provenance"]["device"]
    assert device in text
    assert "| fastattn/torch | 128 | fwd+bwd |" in text
    assert update_readme.main(argv + ["--check"]) == 0               # idempotent
    assert update_readme.main(argv) == 0 and readme.read_text() == text

    for name in os.listdir(gpt_out):
        (results_dir / "cpu-test-2c" / name).write_bytes((gpt_out / name).read_bytes())
    readme.write_text(text + "<!-- results:gpt:begin -->\n<!-- results:gpt:end -->\n")
    assert update_readme.main(argv) == 0
    text = readme.read_text()
    assert "results/cpu-test-2c/gpt.json" in text and "| 64 | fast |" in text
    assert "- fast GPT at T=64: " in text

    other = {"op": "fakeop", "provenance": {"device": "Some CPU"},
             "rows": [{"T": 64, "variant": "fast", "tokens_per_s": 12345.6, "ok": True}]}
    (results_dir / "cpu-test-2c" / "fakeop.json").write_text(json.dumps(other))
    readme.write_text(text + "<!-- results:fakeop:begin -->\n<!-- results:fakeop:end -->\n")
    assert update_readme.main(argv) == 0                             # another op's rows
    assert "| T | variant | tokens_per_s | ok |\n|---|---|---|---|\n| 64 | fast | 12,346 | True |" \
        in readme.read_text()

    readme.write_text("# no markers here\n")
    assert update_readme.main(argv) == 0
    assert readme.read_text() == "# no markers here\n"
    err = capsys.readouterr().err
    assert "no '<!-- results:flash_attention:begin/end -->' markers" in err
    assert "no '<!-- results:fakeop:begin/end -->' markers" in err
