"""The pytest-benchmark cases of every op, shared by the ``bench_*.py`` modules.

Sizes, implementations, inputs, the correctness check and the work formula all come from
``fastattn.benchmark`` (the harness behind ``fastattn bench``), so a case here measures
what a row of ``fastattn bench`` measures. A module declares its cases with
``parametrize`` and runs each with ``measure``::

    @_cases.parametrize("bias_gelu", keys=("N", "M"), tiny={"sizes": [256, 1024], "batch": 64})
    def test_bias_gelu(benchmark, case):
        _cases.measure(benchmark, case)

Tiny sizes by default; ``--bench-full`` or ``FASTATTN_BENCH_FULL=1`` (conftest.py)
selects the harness's defaults. Implementations that cannot run on this machine appear
as skipped cases with the reason. Each case checks its implementation against the naive
baseline before it is timed. On CUDA every round ends with a synchronize, and the
do_bench quantiles are added to ``extra_info``. On CPU the number of rounds comes from
the mean time of the first calls (``_cpu_rounds``), not from pytest-benchmark's
calibration.

Not a test module itself: conftest.py collects only ``bench_*.py``. pytest puts this
folder on ``sys.path`` when it imports a bench module (no ``__init__.py`` here, default
``prepend`` import mode), so ``import _cases`` works from any working directory.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch

from fastattn import benchmark as fb
from fastattn import ext

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FIRST_CALLS_S = 0.05        # CPU: the calls that size the rounds (at least 3 calls)
MAX_ROUNDS = 1000           # CPU: enough for a median; bounds a case on a busy machine


@dataclass
class Case:
    """One implementation of one op at one shape and mode."""
    bench: fb.OpBench
    cfg: fb.Config
    shape: dict
    mode: str
    impl: fb.Impl
    impls: list[fb.Impl]      # all of them: the reference is the naive one
    group: str                # pytest-benchmark group: op, mode and the ``keys`` dims

    def __repr__(self) -> str:   # pytest-benchmark's JSON "params"; extra_info has the rest
        return f"Case({self.group}, {self.impl.name})"


@functools.cache
def _load_ext() -> None:
    """JIT-build (or load the cached build of) the C++ extension, once per session. A
    failed build is not an error here: ``fastattn.ext`` keeps the reason, and the ext
    cases are skipped with it."""
    if not ext.is_available():
        with contextlib.suppress(Exception):   # the reason is the ext cases' skip reason
            ext.load()


def config(op: str, tiny: dict[str, Any]) -> fb.Config:
    """The run's Config: ``tiny`` (Config fields) unless full sizes were asked for."""
    full = os.environ.get("FASTATTN_BENCH_FULL") == "1"     # or --bench-full (conftest)
    return fb.Config(op=op, device=DEVICE.type, **({} if full else tiny)).resolve()


def parametrize(op: str, keys: tuple[str, ...], tiny: dict[str, Any],
                load_ext: bool = False) -> pytest.MarkDecorator:
    """``case`` parameters for every shape, mode and implementation of ``fb.OPS[op]``;
    ids like ``fastattn/torch-N256-M64-fwd`` from the ``keys`` dimensions of the shape.
    ``load_ext``: build the C++ extension first, so that its backend is measured."""
    if load_ext:
        _load_ext()
    bench, cfg = fb.OPS[op], config(op, tiny)
    impls, skipped = bench.impls(DEVICE, cfg)
    params = []
    for shape in bench.shapes(DEVICE, cfg):
        for mode in cfg.modes:
            tag = "-".join(f"{k}{shape[k]}" for k in keys) + f"-{mode}"
            group = f"{op} {mode} " + " ".join(f"{k}={shape[k]}" for k in keys)
            params += [pytest.param(Case(bench, cfg, shape, mode, impl, impls, group),
                                    id=f"{impl.name}-{tag}") for impl in impls]
            # First line only: a failed build's reason carries the compiler's output.
            params += [pytest.param(None, id=f"{name}-{tag}", marks=pytest.mark.skip(
                reason=f"{name}: {why.splitlines()[0]}")) for name, why in skipped.items()]
    return pytest.mark.parametrize("case", params)


def measure(benchmark: Any, case: Case, **extra_info: Any) -> None:
    """Check ``case`` against the naive baseline, then time it with ``benchmark``;
    ``extra_info`` gets the work and its rate (TFLOP/s or GB/s), the error, the
    reference, the allocator setting and the given ``extra_info``."""
    bench, cfg, shape, mode, impl = case.bench, case.cfg, case.shape, case.mode, case.impl
    dtype = fb.dtype_of(cfg.dtype)
    sets = [bench.inputs(shape, dtype, DEVICE, seed) for seed in range(fb.N_INPUT_SETS)]
    ref, ref_impl = fb.reference(case.impls, *sets[0], mode)
    if ref is None:
        pytest.skip("no reference could be computed (out of memory?)")
    try:
        err = fb.check(impl, sets[0], ref, mode)     # also the warm-up call
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl.name} runs out of memory at {shape}")
    assert err <= fb.TOLERANCE[dtype], f"{impl.name} is wrong: max relative error {err:.2e}"

    inputs = itertools.cycle(sets)

    def call() -> list[torch.Tensor]:
        return fb.run_once(impl, *next(inputs), mode)

    benchmark.group = case.group
    work = bench.work(shape, cfg, mode)
    benchmark.extra_info.update(impl=impl.name, mode=mode, shape=shape, dtype=cfg.dtype,
                                **extra_info, **{bench.work_key: work}, max_rel_error=err,
                                reference=ref_impl.name,
                                allocator=fb.allocator_setting(
                                    DEVICE.type, fb.heap_retention_active())["timing"])
    if DEVICE.type == "cuda":
        def synced():
            call()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        benchmark.extra_info["do_bench_ms"] = asdict(fb.time_cuda(call))
    elif benchmark.enabled:
        benchmark.pedantic(call, rounds=_cpu_rounds(benchmark, call))
    else:
        benchmark(call)     # one call, untimed
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info[bench.rate_key] = (work / benchmark.stats.stats.median
                                                / bench.rate_scale)


def _cpu_rounds(benchmark: Any, call: Callable[[], Any]) -> int:
    """Rounds that fill ``--benchmark-max-time`` from the mean time of the calls made in
    ``FIRST_CALLS_S``: at least ``--benchmark-min-rounds``, at most ``MAX_ROUNDS``.

    pytest-benchmark sizes its rounds from its fastest calibration call. On a busy
    2-core machine a call now and then waits a scheduler tick for a core (100× its usual
    time), and cases meant to take 1 s took up to a minute. The mean includes those
    waits; the cap bounds a case when the machine gets busy only after the first calls.
    """
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < FIRST_CALLS_S:
        call()
        calls += 1
    mean_s = (time.perf_counter() - start) / calls
    # The fixture's options (CLI or benchmark marker); it has no public accessor.
    return max(benchmark._min_rounds, min(MAX_ROUNDS, math.ceil(benchmark._max_time / mean_s)))
