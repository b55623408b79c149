"""``fastattn bench --sweep``: one full run per combination of settings, at one size.

What is crossed follows from the op's registry entry: the head dim if its shape takes
one, ``causal`` if it has that option, and the dtypes it supports (on CUDA a
compute-bound op in the tensor-core dtypes, a bandwidth-bound one also in float32)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict

from fastattn.ops import registry
from fastattn.tools.bench.config import Config
from fastattn.tools.bench.ops import UNITS, shape_overrides
from fastattn.tools.bench.provenance import load_average
from fastattn.tools.bench.run import run
from fastattn.tools.common import default_device, dtype_of

AXES = ("head_dim", "causal", "dtype", "heads", "batch")   # the settings a sweep may cross
HEAD_DIMS = {"cpu": [32, 64, 128], "cuda": [64, 128, 256]}
DTYPES = {("cpu", "flops"): ["float32", "bfloat16"], ("cpu", "bytes"): ["float32", "bfloat16"],
          ("cuda", "flops"): ["bfloat16", "float16"],
          ("cuda", "bytes"): ["bfloat16", "float16", "float32"]}


def sweep_axes(op: str, device: str) -> dict[str, list]:
    """{setting: values} that ``run_sweep`` crosses for ``op`` on ``device``."""
    spec = registry.get(op)
    axes: dict[str, list] = {}
    if "head_dim" in shape_overrides(spec):
        axes["head_dim"] = HEAD_DIMS[device]
    if "causal" in spec.options:
        axes["causal"] = [True, False]
    axes["dtype"] = [d for d in DTYPES[device, spec.unit] if dtype_of(d) in spec.dtypes]
    return axes


def sweep_size(op: str, device: str) -> int:
    """The one size a sweep runs at (the size axis has its own runs): the second largest
    default, big enough to show the op's behaviour at a fraction of the largest's time."""
    return sorted(registry.get(op).sizes[device])[-2:][0]


def run_sweep(cfg: Config, axes: dict[str, list] | None = None,
              on_run: Callable[[dict], None] | None = None) -> dict:
    """``run`` once per combination of ``axes`` (default ``sweep_axes``) on top of
    ``cfg``, at ``cfg.sizes`` or ``sweep_size``. Returns a document whose ``runs`` are
    the runs' own documents, so every number keeps its provenance; ``on_run(doc)`` is
    called after each run (progress)."""
    device = cfg.device or default_device()
    base = Config(**{**asdict(cfg), "device": device,
                     "sizes": cfg.sizes or [sweep_size(cfg.op, device)]}).resolve()
    axes = axes or sweep_axes(cfg.op, device)
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ValueError(f"sweep axes must be among {', '.join(AXES)}; got {unknown}")
    load, start, runs = load_average(), time.perf_counter(), []
    for values in itertools.product(*axes.values()):
        doc = run(Config(**{**asdict(base), **dict(zip(axes, values))}))
        doc["sweep_point"] = dict(zip(axes, values))
        runs.append(doc)
        if on_run is not None:
            on_run(doc)
    unit = UNITS[base.spec.unit]
    prov = dict(runs[0]["provenance"], load_average_at_start=load)
    return {"schema": 1, "op": f"{cfg.op}_sweep", "sweep_of": cfg.op, "x": base.spec.x,
            "unit": unit.label, "rate_key": unit.rate_key, "axes": axes,
            "config": asdict(base), "provenance": prov, "runs": runs,
            "durations_s": {"total": round(time.perf_counter() - start, 1)}}
