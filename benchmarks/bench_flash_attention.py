"""pytest-benchmark cases for attention: naive T×T vs torch SDPA vs fastattn, fwd and
fwd+bwd, grouped per mode and size.

Sizes, implementations, inputs, the correctness check and the FLOP formula all come from
``fastattn.benchmark`` (the harness behind ``fastattn bench``). Tiny sizes by default;
``--bench-full`` or ``FASTATTN_BENCH_FULL=1`` selects the full ones. Each case checks its
implementation against the naive baseline before it is timed. On CUDA every round ends
with a synchronize, and the do_bench quantiles are added to ``extra_info``.
"""
import itertools
import os
from dataclasses import asdict

import pytest
import torch

from fastattn import benchmark as fb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH = fb.OPS["attention"]
TINY = fb.Config(device=DEVICE.type, sizes=[128, 256], heads=4)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    full = os.environ.get("FASTATTN_BENCH_FULL") == "1"     # or --bench-full (conftest)
    cfg = (fb.Config(device=DEVICE.type) if full else TINY).resolve()
    impls, skipped = BENCH.impls(DEVICE, cfg)
    params = []
    for shape in BENCH.shapes(DEVICE, cfg):
        for mode in cfg.modes:
            tag = f"T{shape['T']}-B{shape['B']}-{mode}"
            params += [pytest.param((cfg, shape, mode, i.name), id=f"{i.name}-{tag}")
                       for i in impls]
            params += [pytest.param((cfg, shape, mode, name), id=f"{name}-{tag}",
                                    marks=pytest.mark.skip(reason=f"{name}: {why}"))
                       for name, why in skipped.items()]
    metafunc.parametrize("case", params)


def test_attention(benchmark, case):
    cfg, shape, mode, name = case
    impls = BENCH.impls(DEVICE, cfg)[0]
    impl = next(i for i in impls if i.name == name)
    dtype = fb.dtype_of(cfg.dtype)
    sets = [BENCH.inputs(shape, dtype, DEVICE, seed) for seed in range(fb.N_INPUT_SETS)]
    ref, ref_impl = fb.reference(impls, *sets[0], mode)
    if ref is None:
        pytest.skip("no reference could be computed (out of memory?)")
    try:
        err = fb.check(impl, sets[0], ref, mode)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{name} runs out of memory at {shape}")
    assert err <= fb.TOLERANCE[dtype], f"{name} is wrong: max relative error {err:.2e}"

    inputs = itertools.cycle(sets)
    call = lambda: fb.run_once(impl, *next(inputs), mode)  # noqa: E731
    benchmark.group = f"attention {mode} T={shape['T']} B={shape['B']}"
    flops = BENCH.work(shape, cfg, mode)
    benchmark.extra_info.update(impl=name, mode=mode, shape=shape, dtype=cfg.dtype,
                                causal=cfg.causal, flops=flops, max_rel_error=err,
                                reference=ref_impl.name,
                                allocator=fb.allocator_setting(
                                    DEVICE.type, fb.heap_retention_active())["timing"])
    if DEVICE.type == "cuda":
        def synced():
            call()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        benchmark.extra_info["do_bench_ms"] = asdict(fb.time_cuda(call))
    else:
        benchmark(call)
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
