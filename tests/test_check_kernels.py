"""``fastattn check-kernels``: every Triton kernel compiled for sm_80 and sm_90, no GPU.

The kernels are compiled ahead of time (``triton.compile`` for a ``GPUTarget``, ptxas
from the Triton wheel) from the launchers' real argument lists, and each launch shape
must have a config that fits shared memory, its first config (the one
``FASTATTN_AUTOTUNE=0`` launches) must fit, and that config must not spill registers on
sm_90 in fp16/bf16, where the attention matmul kernels' first configs must also run
wgmma and move their tiles through TMA.

Budget: a compile takes 0.3-17 s (fp32 tiles are the slow ones). The session compiles

* the first config of every kernel for fp16/bf16/fp32, head dims 16, 64, 80, 128 and
  256 and norm widths 768 and 12288 (a whole row in registers; a looped row), on sm_80
  and sm_90: 168 compiles. A fitting first config is a fitting config, so this also
  checks that each of these shapes has one;
* the first SAMPLE configs of the attention kernels for bf16 and fp32 at D = 128 and
  D = 256 (the widest tiles, both operand widths): the pinned first config and the
  start of the search space (all of it, ~36 configs per kernel and about 950 compiles
  here, is ``fastattn check-kernels``' job, not CI's; the autotuner prunes what cannot
  fit before it benchmarks: ``tests/test_flash_attention_configs.py``);

with one on-disk result cache for the session, so the second set and the reruns reuse
the first's compiles. From a cold Triton cache that is about 5 CPU-minutes (2.5-4 minutes
on 2 cores); with a warm one, under a minute.
"""
import json
import re
from pathlib import Path

import pytest

from fastattn.tools import cli
from fastattn.tools import check_kernels as ck

pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = [80, 90]
FIRST = ck.cases(ck.OPS, ck.DTYPES, [16, 64, 80, 128, 256], [768, 12288])
ALL = ck.cases(["flash_attention"], ["bfloat16", "float32"], [128, 256], [])
SAMPLE = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("check-kernels-cache")


@pytest.fixture(scope="module")
def first_rows(cache) -> list[dict]:
    return ck.check(FIRST, ARCHS, all_configs=False, cache_dir=cache)


@pytest.fixture(scope="module")
def all_rows(cache, first_rows) -> list[dict]:
    return ck.check(ALL, ARCHS, all_configs=SAMPLE, cache_dir=cache)


def jit_kernels() -> set[str]:
    """Names of the ``@triton.jit`` kernels in kernels/*.py (helpers are not kernels)."""
    found = set()
    for path in (ROOT / "kernels").glob("*.py"):
        found |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", path.read_text()))
    return found


def test_every_kernel_compiles(first_rows):
    assert {r["kernel"] for r in first_rows} == jit_kernels()
    assert not ck.compile_errors(first_rows), "\n".join(ck.compile_errors(first_rows))
    # one compile per (op, kernel, dtype, shape, constexpr variant, arch): none wasted
    jobs = {(r["op"], r["kernel"], r["dtype"], r["size"], r["constexprs"], r["arch"])
            for r in first_rows}
    assert len(jobs) == len(first_rows), "a kernel compiled twice for the same case"


def test_every_launch_shape_has_a_fitting_config(first_rows, all_rows):
    unfit = ck.unfit_shapes(first_rows + all_rows)
    assert not unfit, "\n".join(unfit)


def test_first_configs_fit_shared_memory(first_rows, all_rows):
    unfit = ck.unfit_defaults(first_rows + all_rows)
    assert not unfit, "\n".join(unfit)


def test_first_configs_fit_sm86_and_sm89(first_rows):
    """sm_86/89 (RTX 30xx/40xx, A10, L4, L40) allow 101,376 B per block. Triton compiles
    them through the same Ampere path as sm_80, with the same shared memory (measured
    alike for every config), so the sm_80 compiles stand in for them."""
    over = [f"{r['kernel']} {r['dtype']} {r['size']}: first config {r['config']} needs "
            f"{r['smem']:,} B" for r in first_rows
            if r["arch"] == 80 and r["default"] and r["smem"] > ck.SMEM_LIMIT[86]]
    assert not over, "\n".join(over)


def test_first_configs_do_not_spill_on_sm90_half(first_rows):
    spills = ck.spilling_defaults(first_rows)
    assert not spills, "\n".join(spills)


def test_every_autotune_config_is_compiled(all_rows):
    """Each autotuned kernel gets a row per sampled config and arch, the first marked."""
    assert not ck.compile_errors(all_rows), "\n".join(ck.compile_errors(all_rows))
    by_shape: dict[tuple, list[dict]] = {}
    for row in all_rows:
        by_shape.setdefault((row["kernel"], row["dtype"], row["size"], row["constexprs"],
                             row["arch"]), []).append(row)
    for shape, rows in by_shape.items():
        assert [r["default"] for r in rows] == [True] + [False] * (len(rows) - 1), shape
        assert len({r["config"] for r in rows}) == len(rows), shape
        if shape[0] != "_attn_bwd_delta_kernel":
            assert len(rows) > 1, f"{shape}: only one config compiled"


def test_first_configs_use_wgmma_and_tma_on_sm90(first_rows):
    """The attention dots of the 16-bit first configs run as wgmma on sm_90 (64 rows
    per warpgroup) and mma.sync on sm_80; fp32 runs true-fp32 (ieee) dots, on FMA units.
    On sm_90 every 16-bit matmul kernel moves its tiles through TMA (the launchers'
    choice for aligned inputs there); fp32 does not (it would spill), nor does sm_80 or
    the Δ kernel. Held to no spill only: the opt-in atomic-dQ dK/dV (16-row blocks: its
    dS·K dot runs mma.sync beside wgmma; pointers at D > 128) and the dK/dV with a soft
    cap, ALiBi or dropout at D = 256 (pointers: it spills through TMA)."""
    attention = [r for r in first_rows if r["op"] == "flash_attention"]
    assert {r["kernel"] for r in attention} == {*ck.HOPPER_KERNELS, "_attn_bwd_delta_kernel"}
    special = [r for r in attention if "ATOMIC_DQ=True" in r["constexprs"] or (
        "SOFTCAP=True" in r["constexprs"] and r["size"] == "D=256"
        and r["kernel"] == "_attn_bwd_dkdv_kernel")]
    assert {r["size"] for r in special} == {f"D={d}" for d in ck.HEAD_DIMS}
    assert not ck.spilling_defaults(special), "\n".join(ck.spilling_defaults(special))
    for r in (r for r in attention if r not in special):
        matmul = r["kernel"] in ck.HOPPER_KERNELS
        if r["dtype"] == "float32" or not matmul:
            expected = "none"
        else:
            expected = "wgmma" if r["arch"] == 90 else "mma.sync"
        assert r["mma"] == expected, r
        assert r["tma"] == (expected == "wgmma"), r
    assert not ck.slow_defaults(first_rows), "\n".join(ck.slow_defaults(first_rows))


def test_split_head_dim_is_labelled(first_rows):
    """D = 80 runs as two head-dim pieces, 64 + 16 (``head_dim_split``), labelled D64+16:
    every matmul kernel on sm_90, the forward only on sm_80 (``arch_paths``); the Δ
    kernel (a row reduction) keeps the padded D128, D = 128 one piece."""
    rows = [r for r in first_rows if r["op"] == "flash_attention"]
    for r in rows:
        padded = (r["kernel"] == "_attn_bwd_delta_kernel"
                  or (r["arch"] < 90 and r["kernel"] != "_attn_fwd_kernel"))
        if r["size"] == "D=80":
            assert ("D128 " if padded else "D64+16 ") in r["config"], r
        if r["size"] == "D=128":
            assert "D128 " in r["config"] and "+" not in r["config"], r


def test_results_are_cached(cache, first_rows):
    again = ck.check(FIRST, ARCHS, all_configs=False, cache_dir=cache)
    assert all(r["cached"] for r in again)

    def measured(rows):
        return [{k: v for k, v in r.items() if k not in ("cached", "seconds")} for r in rows]
    assert measured(again) == measured(first_rows)


def row(**changes) -> dict:
    base = {"kernel": "_k", "dtype": "bfloat16", "size": "D=128", "causal": True,
            "config": "M64 N64 w4 s2", "default": True, "arch": 90, "smem": 1000,
            "smem_limit": 2000, "fits": True, "regs": 128, "spill": 0, "mma": "wgmma",
            "tma": True}
    return {**base, **changes}


def test_problems_name_each_failing_rule():
    """The rules themselves, on made-up rows: what fails and what does not."""
    assert ck.problems([row(), row(default=False, smem=3000, fits=False)]) == []
    assert ck.unfit_defaults([row(smem=3000, fits=False)]) == [
        "_k bfloat16 D=128 on sm_90: first config M64 N64 w4 s2 needs 3,000 B of shared "
        "memory, sm_90 allows 2,000"]
    assert ck.unfit_shapes([row(fits=False), row(default=False, fits=False)]) == [
        "_k bfloat16 D=128 on sm_90: no config fits shared memory"]
    assert ck.spilling_defaults([row(spill=16)]) == [
        "_k bfloat16 D=128 on sm_90: first config M64 N64 w4 s2 spills 16 B per thread"]
    # Spills are reported only for the sm_90 16-bit first configs.
    assert ck.spilling_defaults([row(spill=16, arch=80), row(spill=16, dtype="float32"),
                                 row(spill=16, default=False)]) == []
    # wgmma and TMA: required of the attention matmul kernels' sm_90 16-bit first
    # configs at HOPPER_SIZES only (D = 64/80/96/128/192/256).
    fwd = {"kernel": "_attn_fwd_kernel"}
    assert ck.slow_defaults([row(**fwd, mma="mma.sync"), row(**fwd, tma=False),
                             row(**fwd, mma="mma.sync", tma=False, size="D=256")]) == [
        "_attn_fwd_kernel bfloat16 D=128 on sm_90: first config M64 N64 w4 s2 runs "
        "mma.sync",
        "_attn_fwd_kernel bfloat16 D=128 on sm_90: first config M64 N64 w4 s2 runs wgmma, "
        "no TMA",
        "_attn_fwd_kernel bfloat16 D=256 on sm_90: first config M64 N64 w4 s2 runs "
        "mma.sync, no TMA"]
    assert ck.problems([row(**fwd, tma=False)]) == ck.slow_defaults([row(**fwd, tma=False)])
    assert ck.slow_defaults([{**row(**fwd, mma="mma.sync", tma=False), **other} for other in (
        {"arch": 80}, {"dtype": "float32"}, {"default": False}, {"size": "D=16"},
        {"kernel": "_attn_bwd_delta_kernel"}, {"error": "boom"})]) == []


def test_cli_prints_table_and_json(first_rows, cache, capsys):
    args = ["check-kernels", "--op", "gelu", "--dtype", "float32", "--width", "768",
            "--arch", "90", "--cache-dir", str(cache)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:6] == ["kernel", "dtype", "size", "config", "arch",
                                               "smem"]
    assert "_gelu_fwd_kernel" in out and "no problems" in out
    assert "2 kernel x config x arch: 0 compiled, 2 from the cache" in out
    assert cli.main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["kernel"] for r in doc["rows"]] == ["_gelu_fwd_kernel",
                                                  "_gelu_bwd_kernel"]
    assert doc["problems"] == [] and all(r["cached"] for r in doc["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--arch", "70"], "expected a comma-separated list of 80, 86, 89, 90, got '70'"),
    (["--op", "softmax"], "expected a comma-separated list of flash_attention"),
    (["--head-dim", "300"], r"a head dim must be any size from 1 to 256, got \[300\]"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["check-kernels", *argv])
    assert re.search(message, capsys.readouterr().err)
