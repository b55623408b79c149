"""``fastattn profile`` (fastattn/tools/profile.py, profile_report.py) at tiny sizes: the
trace, the table, the phase shares, memory, every registered op's profile, the command
line and bad arguments.
No timing is asserted: only that the numbers are there, consistent and well-formed."""
import argparse
import json
import math
import pickle

import pytest
import torch

from fastattn.ops import registry
from fastattn.tools import profile as fp
from fastattn.tools import profile_report as fr

GPT_PHASES = ["forward", "backward", "optimizer"]
OP_PHASES = ["forward", "backward"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The profiled steps are tiny: on a busy machine, intra-op threads spin-waiting for
    each other make each step tens of times slower than on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> fr.ProfileResult:
    out = tmp_path_factory.mktemp("profile-gpt")
    return fp.profile(device="cpu", batch=2, seq=32, steps=2, warmup=1, out=out)


def check_table(result: fr.ProfileResult) -> None:
    rows = result.rows
    assert rows, "the table is empty"
    times = [row.self_ms for row in rows]
    assert times == sorted(times, reverse=True)
    assert all(0 < row.share <= 100 and row.calls >= 1 for row in rows)
    # Self times do not nest, so the shares of all rows add up to the whole.
    assert math.isclose(sum(row.share for row in rows), 100, rel_tol=1e-6)
    assert math.isclose(sum(times), result.profiled_ms, rel_tol=1e-6)
    assert all(math.isclose(row.ms_per_step * result.steps, row.self_ms) for row in rows)


def check_phases(result: fr.ProfileResult, phases: list[str]) -> None:
    assert list(result.phase_share) == phases == list(result.phase_ms)
    assert result.step_ms > 0
    assert all(0 < share <= 100 for share in result.phase_share.values())
    assert sum(result.phase_share.values()) <= 100 + 1e-9


def test_gpt_writes_chrome_trace_with_phase_ranges(gpt):
    assert gpt.trace.name == "trace.json"
    trace = json.loads(gpt.trace.read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert set(GPT_PHASES) <= names
    assert any(str(name).startswith("ProfilerStep#") for name in names)


def test_gpt_table_is_sorted_and_shares_add_up(gpt):
    check_table(gpt)
    assert gpt.time_kind == "self CPU time"
    assert any(row.name.startswith("fastattn::") for row in gpt.rows)   # the fast blocks


def test_gpt_phase_shares(gpt):
    check_phases(gpt, GPT_PHASES)


def test_gpt_memory_on_cpu(gpt):
    assert gpt.peak_memory > 0
    assert gpt.snapshot is None
    assert any("CUDA-only" in note for note in gpt.notes)
    assert gpt.shape == {"B": 2, "T": 32, "L": 2, "C": 64, "H": 4, "V": 256}
    assert (gpt.device, gpt.dtype, gpt.variant, gpt.preset) == ("cpu", "float32", "fast",
                                                                 "tiny")


def test_format_report_shows_phases_top_rows_and_files(gpt):
    text = fr.format_report(gpt, top=3)
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("name ")))
    assert lines[header].split() == ["name", "calls", "self", "ms", "%", "ms/step"]
    for line, row in zip(lines[header + 1:header + 4], gpt.rows[:3], strict=True):
        assert line.startswith(row.name[:40]) and f"{row.self_ms:.3f}" in line
    assert f"top 3 of {len(gpt.rows)} by self CPU time" in text
    for phase in GPT_PHASES:
        assert any(line.split()[:1] == [phase] and "%" in line for line in lines)
    assert str(gpt.trace) in text and "peak memory" in text


def test_naive_gpt_runs_no_fastattn_op(tmp_path):
    result = fp.profile(variant="naive", device="cpu", batch=1, seq=32, steps=1, out=tmp_path)
    check_table(result)
    check_phases(result, GPT_PHASES)
    assert not any(row.name.startswith("fastattn::") for row in result.rows)


@pytest.mark.parametrize("op", registry.names())
def test_op_profile(op, tmp_path):
    """Every registered op profiles, at the shape the tiny GPT (width 64, 4 heads, MLP
    256) gives it at B=1, T=32, and its custom ops are what ran."""
    result = fp.profile(op, device="cpu", batch=1, seq=32, steps=2, out=tmp_path)
    check_table(result)
    check_phases(result, OP_PHASES if "fwd+bwd" in registry.get(op).modes else ["forward"])
    assert result.variant is None
    assert result.shape == registry.get(op).model_shape(1, 32, 64, 4, 4, 256)
    assert set(registry.get(op).custom_ops) <= {row.name for row in result.rows}
    names = {e.get("name") for e in json.loads(result.trace.read_text())["traceEvents"]}
    assert set(OP_PHASES if "fwd+bwd" in registry.get(op).modes else ("forward",)) <= names


def test_forced_backend_is_reported(tmp_path):
    result = fp.profile("gelu", device="cpu", batch=1, seq=16, steps=1,
                        backend="torch", out=tmp_path)
    assert result.backend == "torch"
    assert "backend torch" in fr.describe(result)


@pytest.mark.parametrize("kwargs, match", [
    ({"op": "conv"}, r"op must be one of \('gpt', .*'flash_attention'.*got 'conv'"),
    ({"op": "attention"}, r"op must be one of .*got 'attention'"),    # one name per op
    ({"variant": "fastest"}, r"variant must be one of \('fast', 'naive'\), got 'fastest'"),
    ({"op": "flash_attention", "variant": "naive"},
     r"variant 'naive' applies to op 'gpt' only"),
    ({"preset": "huge"}, r"preset must be one of \('tiny', 'small', 'gpt2'\), got 'huge'"),
    ({"seq": 0}, r"seq must be a positive integer, got 0"),
    ({"batch": 2.5}, r"batch must be a positive integer, got 2.5"),
    ({"steps": 0}, r"steps must be a positive integer, got 0"),
    ({"warmup": -1}, r"warmup must be a non-negative integer, got -1"),
    ({"dtype": "fp8"}, r"dtype must be one of \('auto', .*got 'fp8'"),
    ({"device": "tpu"}, r"device must be 'cpu' or 'cuda', got 'tpu'"),
    ({"backend": "cudnn"}, r"backend must be one of \('triton', 'ext', 'torch'\), got"),
    ({"backend": "ext"},
     r"backend 'ext' does not implement flash_attention, which op 'gpt' runs"),
    ({"variant": "naive", "backend": "torch"}, r"the naive GPT runs none of them"),
])
def test_bad_arguments_raise(kwargs, match, tmp_path):
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        fp.profile(out=tmp_path, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_unavailable_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available"):
        fp.profile(device="cuda", out=tmp_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn")
    fp.add_profile_parser(p.add_subparsers())
    return p


def test_cli_prints_the_report(tmp_path, capsys):
    args = parser().parse_args(["profile", "--op", "layer_norm", "--device", "cpu", "--batch",
                                "1", "--seq", "16", "--steps", "1", "--top", "2", "--out",
                                str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "top 2 of" in out and "forward" in out
    assert (tmp_path / "trace.json").is_file()


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--warmup", "-1"], "argument --warmup: expected a non-negative integer, got '-1'"),
    (["--op", "conv"], "argument --op: invalid choice: 'conv'"),
    (["--op", "flash_attention", "--variant", "naive"],
     "variant 'naive' applies to op 'gpt' only"),
])
def test_cli_bad_arguments(argv, match, tmp_path, capsys):
    p = parser()
    with pytest.raises(SystemExit) as exc:
        args = p.parse_args(["profile", "--device", "cpu", "--out", str(tmp_path), *argv])
        args.func(args)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_snapshot_and_kernel_table(tmp_path):
    result = fp.profile(device="cuda", preset="tiny", batch=2, seq=64, steps=2,
                        dtype="float32", out=tmp_path)
    assert result.snapshot == tmp_path / "memory_snapshot.pickle"
    with open(result.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    assert "segments" in snapshot and snapshot["device_traces"]
    assert result.peak_memory > 0 and result.time_kind == "self CUDA time"
    check_table(result)
    check_phases(result, GPT_PHASES)
    assert not {"forward", "backward", "optimizer"} & {row.name for row in result.rows}
