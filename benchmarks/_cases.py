"""The pytest-benchmark cases of every registered op, run by ``bench_ops.py``.

Sizes, implementations, inputs, the correctness check and the work formula all come from
the op registry through ``fastattn.tools.bench`` (the harness behind ``fastattn bench``),
so a case here measures what a row of ``fastattn bench`` measures::

    @_cases.parametrize()
    def test_op(benchmark, case):
        _cases.measure(benchmark, case)

Tiny sizes by default (``tiny_settings``: an eighth of the two smallest default sizes,
at most 64 rows);
``--bench-full`` or ``FASTATTN_BENCH_FULL=1`` (conftest.py) selects the harness's
defaults. For an op with an ext backend the C++ extension is built (or its cached build
loaded) first, so that the ext backend is measured. Implementations that cannot run on
this machine appear as skipped cases with the reason. Each case checks its
implementation against the naive baseline before it is timed. On CUDA every round ends
with a synchronize, and the do_bench quantiles are added to ``extra_info``. On CPU the
number of rounds comes from the mean time of the first calls (``_cpu_rounds``), not
from pytest-benchmark's calibration.

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

from fastattn import ext
from fastattn.ops import registry
from fastattn.ops.registry import OpSpec
from fastattn.tools.bench.allocator import allocator_setting, heap_retention_active
from fastattn.tools.bench.check import TOLERANCE, check, reference, run_once
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.measure import N_INPUT_SETS
from fastattn.tools.bench.ops import Impl, tiny_settings
from fastattn.tools.bench.timing import time_cuda
from fastattn.tools.common import dtype_of

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FIRST_CALLS_S = 0.05        # CPU: the calls that size the rounds (at least 3 calls)
MAX_ROUNDS = 1000           # CPU: enough for a median; bounds a case on a busy machine


@dataclass
class Case:
    """One implementation of one op at one shape and mode."""
    cfg: Config
    shape: dict
    mode: str
    impl: Impl
    impls: list[Impl]         # all of them: the reference is the naive one
    group: str                # pytest-benchmark group: op, mode and shape

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


def config(spec: OpSpec) -> Config:
    """The op's run: tiny sizes unless full sizes were asked for."""
    full = os.environ.get("FASTATTN_BENCH_FULL") == "1"     # or --bench-full (conftest)
    tiny = {} if full else tiny_settings(spec, DEVICE.type)
    return Config(op=spec.name, device=DEVICE.type, **tiny).resolve()


def _op_params(spec: OpSpec) -> list:
    if "ext" in spec.backends:
        _load_ext()
    cfg = config(spec)
    impls, skipped = cfg.impls()
    params = []
    for shape in cfg.shapes():
        for mode in cfg.modes:
            tag = "-".join(f"{k}{v}" for k, v in shape.items()) + f"-{mode}"
            group = f"{spec.name} {mode} " + " ".join(f"{k}={v}" for k, v in shape.items())
            params += [pytest.param(Case(cfg, shape, mode, impl, impls, group),
                                    id=f"{spec.name}-{impl.name}-{tag}") for impl in impls]
            # First line only: a failed build's reason carries the compiler's output.
            params += [pytest.param(None, id=f"{spec.name}-{name}-{tag}",
                                    marks=pytest.mark.skip(
                                        reason=f"{name}: {why.splitlines()[0]}"))
                       for name, why in skipped.items()]
    return params


def parametrize() -> pytest.MarkDecorator:
    """``case`` parameters for every registered op, shape, mode and implementation;
    ids like ``layer_norm-fastattn/torch-M64-N96-fwd``."""
    return pytest.mark.parametrize("case", [p for spec in registry.specs()
                                            for p in _op_params(spec)])


def measure(benchmark: Any, case: Case) -> None:
    """Check ``case`` against the naive baseline, then time it with ``benchmark``;
    ``extra_info`` gets the op's options, the work and its rate (TFLOP/s or GB/s), the
    error, the reference and the allocator setting."""
    cfg, shape, mode, impl = case.cfg, case.shape, case.mode, case.impl
    spec, unit, dtype = cfg.spec, cfg.unit, dtype_of(cfg.dtype)
    sets = [spec.inputs(shape, dtype, DEVICE, seed) for seed in range(N_INPUT_SETS)]
    ref, ref_impl = reference(case.impls, *sets[0], mode)
    if ref is None:
        pytest.skip("no reference could be computed (out of memory?)")
    try:
        err = check(impl, sets[0], ref, mode)     # also the warm-up call
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl.name} runs out of memory at {shape}")
    assert err <= TOLERANCE[dtype], f"{impl.name} is wrong: max relative error {err:.2e}"

    inputs = itertools.cycle(sets)

    def call() -> list[torch.Tensor]:
        return run_once(impl, *next(inputs), mode)

    benchmark.group = case.group
    work = cfg.work(shape, mode)
    benchmark.extra_info.update(impl=impl.name, mode=mode, shape=shape, dtype=cfg.dtype,
                                **cfg.options(), **{unit.work_key: work}, max_rel_error=err,
                                reference=ref_impl.name,
                                allocator=allocator_setting(
                                    DEVICE.type, heap_retention_active())["timing"])
    if DEVICE.type == "cuda":
        def synced():
            call()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        benchmark.extra_info["do_bench_ms"] = asdict(time_cuda(call))
    elif benchmark.enabled:
        benchmark.pedantic(call, rounds=_cpu_rounds(benchmark, call))
    else:
        benchmark(call)     # one call, untimed
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info[unit.rate_key] = work / benchmark.stats.stats.median / unit.scale


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
