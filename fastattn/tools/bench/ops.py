"""A registry entry (``fastattn.ops.registry``) as the harness sees it: the
implementations it compares, the overrides its shapes take, and the unit its work is
reported in. Nothing here names an op: a newly registered one is benchmarked as is."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattn import backends
from fastattn.ops.registry import OpSpec
from fastattn.tools.bench.timing import measure_copy_gbps, measure_peak_tflops


@dataclass(frozen=True)
class Unit:
    """How an op's work is reported: a compute-bound op in TFLOP/s against a matmul
    peak, a bandwidth-bound one (LayerNorm, GELU) in GB/s against a copy."""
    label: str                 # "TFLOP/s"
    work_key: str              # the row field of the work per call: "flops"
    rate_key: str              # the row field of the rate: "tflops"
    scale: float               # work per second -> rate
    peak: Callable[[torch.device, torch.dtype, bool], dict]   # (device, dtype, quick)


TINY_BATCH = 64
UNITS = {"flops": Unit("TFLOP/s", "flops", "tflops", 1e12, measure_peak_tflops),
         "bytes": Unit("GB/s", "bytes", "gbps", 1e9, measure_copy_gbps)}


@dataclass
class Impl:
    """One implementation of an op: ``fn(*inputs)``, run under ``backend`` if given."""
    name: str                  # "naive", "sdpa", "fastattn/torch", ...
    kind: str                  # "naive" (the baseline), "torch" (best built-in), "fastattn"
    fn: Callable[..., Tensor]
    backend: str | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        ctx = backends.use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with ctx:
            return self.fn(*inputs)


def implementations(spec: OpSpec, device: torch.device, options: dict[str, Any]
                    ) -> tuple[list[Impl], dict[str, str]]:
    """The entry's naive baseline, torch's built-in and every fastattn backend that can
    run on ``device``, each bound to ``options``; and why the other backends cannot."""
    label, builtin = spec.builtin
    impls = [Impl("naive", "naive", functools.partial(spec.naive, **options)),
             Impl(label, "torch", functools.partial(builtin, **options))]
    skipped = {}
    for backend in backends.BACKENDS:
        name = f"fastattn/{backend}"
        ok, why = backends.available(backend, device)
        if backend not in spec.backends:
            ok, why = False, f"does not implement {spec.name}"
        elif ok and backend == "triton" and device.type == "cpu":
            ok, why = False, "the Triton interpreter is too slow to benchmark"
        if ok:
            impls.append(Impl(name, "fastattn", functools.partial(spec.fast, **options),
                              backend))
        else:
            skipped[name] = why
    return impls, skipped


def shape_overrides(spec: OpSpec) -> tuple[str, ...]:
    """The keyword overrides ``spec.shape(size, device, ...)`` takes (batch, heads, ...)."""
    return tuple(list(inspect.signature(spec.shape).parameters)[2:])


def tiny_settings(spec: OpSpec, device: str) -> dict[str, Any]:
    """``Config`` settings of a smoke run: two sizes, an eighth of the two smallest
    defaults, and a batch of at most ``TINY_BATCH`` where the shape takes one (the rows
    of a row-wise op, attention's B on a GPU)."""
    sizes = [max(16, s // 8) for s in sorted(spec.sizes[device])[:2]]
    settings: dict[str, Any] = {"sizes": sizes}
    if "batch" in shape_overrides(spec):
        dev = torch.device(device)
        capped = spec.shape(sizes[0], dev, batch=TINY_BATCH)
        if math.prod(capped.values()) < math.prod(spec.shape(sizes[0], dev).values()):
            settings["batch"] = TINY_BATCH
    return settings
