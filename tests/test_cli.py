"""The ``fastattn`` command line and the benchmark harness behind it, at tiny sizes.

``fastattn bench`` runs once per session (a subprocess, as a user runs it) and the tests
read its table and saved files; the rest calls ``fastattn.cli.main`` in this process.
No timing is asserted: only that every number is there and well-formed.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import benchmark as fb
from fastattn import cli

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
    results = json.loads((out / "attention.json").read_text())
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
        assert row["flops"] == fb.attention_flops(1, 2, row["T"], row["T"], 64, True,
                                                  row["mode"])
    if importlib.util.find_spec("matplotlib"):
        assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    (["bench", "--seq", "128,abc"], "positive integers, got '128,abc'"),
    (["bench", "--seq", "0"], "positive integers, got '0'"),
    (["bench", "--mode", "bwd"], "subset of fwd, fwd+bwd, got 'bwd'"),
    (["bench", "--heads", "-1"], "positive integer, got '-1'"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["bench", "--op", "gpt", "--head-dim", "64"], "--head-dim do(es) not apply to --op gpt"),
    (["bench", "--op", "bias_gelu", "--sweep", "--dtype", "float32"],
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
    retained = fb.allocator_setting("cpu", retain=True)
    assert retained["timing"] == ("MALLOC_MMAP_THRESHOLD_=1099511627776 "
                                  "MALLOC_TRIM_THRESHOLD_=1099511627776")
    assert fb.allocator_setting("cpu", retain=False)["timing"].startswith("default")


def test_attention_flops():
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert fb.attention_flops(2, 3, 128, 128, 64, False) == fwd
    assert fb.attention_flops(2, 3, 128, 128, 64, True) == fwd / 2
    assert fb.attention_flops(2, 3, 128, 128, 64, True, "bwd") == 2.5 * fwd / 2
    assert fb.attention_flops(2, 3, 128, 128, 64, True, "fwd+bwd") == 3.5 * fwd / 2


def test_wrong_implementation_gets_no_number(monkeypatch):
    bench = fb.OPS["attention"]
    real = bench.impls

    def with_broken(device, cfg):
        impls, skipped = real(device, cfg)
        broken = fb.Impl("broken", "fastattn", lambda q, k, v: impls[0](q, k, v) * 1.01)
        return [*impls, broken], skipped

    monkeypatch.setattr(bench, "impls", with_broken)
    measured = fb.measure(fb.Config(device="cpu", sizes=[32], heads=2, quick=True))
    rows = {(r["impl"], r["mode"]): r for r in measured["rows"]}
    for mode in fb.MODES:
        assert rows["broken", mode]["status"] == "wrong"
        assert "time_ms" not in rows["broken", mode]
        assert rows["fastattn/torch", mode]["status"] == "ok"
    results = {"x": "T", "unit": "TFLOP/s", "rows": measured["rows"], "skipped": {}}
    assert "WRONG (err 1.0e-02)" in fb.format_table(results)


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
        assert r["tokens_per_s"] > 0 and r["extra_mem_mib"] >= 0 and 0 < r["mfu"] < 1
        # same weights, the same first loss (checked by the benchmark before it reports)
        assert r["first_loss"] == pytest.approx(rows[t, "naive"]["first_loss"], rel=1e-4)
    for t in (32, 64):
        fast, naive = rows[t, "fast"], rows[t, "naive"]
        assert fast["speedup_vs_naive"] == pytest.approx(
            fast["tokens_per_s"] / naive["tokens_per_s"])
        assert f"fast GPT at T={t}: {fast['speedup_vs_naive']:.2f}× the naive" in proc.stdout
    assert (out / "gpt.png").stat().st_size > 0


def test_gpt_bench_rows_that_disagree_are_wrong():
    from fastattn import bench_gpt
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
    cfg = fb.Config(device="cpu", sizes=[32], heads=2, quick=True, memory=False,
                    heap_retention=fb.heap_retention_active(), modes=["fwd"])
    seen = []
    doc = fb.run_sweep(cfg, {"head_dim": [16, 32], "causal": [True, False]},
                       on_run=lambda d: seen.append(d["sweep_point"]))
    points = [{"head_dim": d, "causal": c} for d in (16, 32) for c in (True, False)]
    assert seen == points and [r["sweep_point"] for r in doc["runs"]] == points
    for run, point in zip(doc["runs"], points):
        assert run["config"]["head_dim"] == point["head_dim"]
        assert run["config"]["causal"] is point["causal"]
        assert {r["shape"]["D"] for r in run["rows"]} == {point["head_dim"]}
        assert {r["impl"] for r in run["rows"]} >= {"naive", "sdpa", "fastattn/torch"}
    rows = fb.sweep_rows(doc)
    assert len(rows) == 4 and all(r["status"] == "ok" and "speedup_vs_naive" in r
                                  for r in rows)
    table = fb.format_sweep_table(doc)
    assert table.splitlines()[0].split()[:4] == ["head_dim", "causal", "T", "mode"]
    assert "attention sweep on" in fb.describe_sweep(doc)
    json_path, png_path, _ = fb.save(doc, tmp_path / "results" / "cpu-test-2c")
    assert json_path.name == "attention_sweep.json" and png_path.stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:attention_sweep:begin -->\n"
                      "<!-- results:attention_sweep:end -->\n")
    argv = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert load_update_readme().main(argv) == 0
    assert "| head_dim | causal | T | mode | impl |" in readme.read_text()
    with pytest.raises(ValueError, match="sweep axes must be among"):
        fb.run_sweep(cfg, {"colour": [1]})


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
    before = "# Title\n\nintro\n\n<!-- results:attention:begin -->\n"
    after = "<!-- results:attention:end -->\n\n## Layout\ntext\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + "stale table\n" + after)
    update_readme = load_update_readme()
    argv = ["--readme", str(readme), "--results", str(results_dir)]

    assert update_readme.main(argv + ["--check"]) == 1
    assert update_readme.main(argv) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "stale table" not in text
    assert "results/cpu-test-2c/attention.json" in text            # names its source
    assert json.loads((out / "attention.json").read_text())["provenance"]["device"] in text
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
    assert "no '<!-- results:attention:begin/end -->' markers" in err
    assert "no '<!-- results:fakeop:begin/end -->' markers" in err
