"""Benchmark harness: fastattn against the naive baseline and torch's built-in, in one run.

For every op, size and mode (``fwd``, or ``fwd+bwd``: the forward with autograd and the
gradients of all inputs) it measures, on one device:

* **correctness first**: each implementation's output (and gradients) is compared with
  the naive baseline run in float32 on the same inputs; a wrong result gets no number.
* **time**: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
  20/50/80 % quantiles; on CPU ``time.perf_counter`` after a warm-up call, median of at
  least ``MIN_REPEATS`` calls within a time budget. Calls rotate between two sets of
  fresh random inputs.
* **work rate**: TFLOP/s from the op's FLOP formula (``attention_flops``) and its fraction
  of the device's peak, measured in the same run with a large matmul in the benchmark
  dtype (its 20 % quantile time).
* **extra peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` minus what was
  allocated before the call. On CPU each (implementation, size, mode) runs once in a
  fresh process forked from a server that has imported torch and run nothing: it builds
  the inputs, warms the implementation up on a tiny input (thread pool, library set-up),
  reads its resident set size, runs the call once and reads the peak resident set size
  (``getrusage().ru_maxrss``); the difference is the extra memory.

CPU allocator: glibc returns each freed block above its mmap threshold to the OS, so a
call that allocates a large output page-faults all of it again each time (DESIGN.md).
The CPU timing therefore runs in a child process started with ``HEAP_RETENTION_ENV``
(mmap and trim thresholds of 1 TiB: freed memory stays in the heap and is reused), the
same for every implementation, and the setting is recorded in the results. glibc 2.36
accepts thresholds above the 32 MiB that mallopt(3) gives as the maximum (that number
caps only the *dynamic* threshold): checked with a 600 MiB block, freed and allocated
again with no page faults, where a 32 MiB threshold faults all of it every time. Minor
page faults per timed call are recorded (and noted under the table): the heap can still
grow (fragmentation) in the first calls of the naive baseline. ``Config.heap_retention``
(``fastattn bench --malloc default``) times with glibc's defaults instead, for
comparison. The memory processes use the default allocator.

Processes on CPU: ``run`` (the caller) starts the timing child and the memory server at
once, so that their imports overlap; the timing starts when both are ready, and the
memory jobs (two at a time) after it, so no measurement shares the cores with another.

Adding an op (LayerNorm, GELU) means writing one ``OpBench`` subclass: its sizes, its
implementations, its inputs and its work formula; ``OPS`` lists them.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import resource
import select
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn
from fastattn import backends
from fastattn.ops import flash_attention as _flash_op
from fastattn import ext as _ext
from fastattn import reference as _ref
from fastattn.reference import naive_attention

MODES = ("fwd", "fwd+bwd")
BWD_FLOP_FACTOR = 2.5          # backward ≈ 2.5 forwards (5 matmuls of 2, recompute of S)
MIN_REPEATS = 3
CPU_BUDGET_S = 0.3             # per (impl, size, mode), after the warm-up call
N_INPUT_SETS = 2
# Relative tolerance, as max |x - ref| / max |ref|, per benchmark dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2,
             torch.bfloat16: 3e-2}
# Keep freed memory in the heap: no block is big enough to be mmapped, the top is never
# trimmed. 1 TiB is above any allocation a benchmark makes.
HEAP_RETENTION_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40),
                      "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
FAULTS_NOTE = 2560              # page faults per timed call (10 MiB) worth a table note
MEMORY_TIMEOUT_S = 300          # for one answer of the memory process
MEMORY_WORKERS = 2              # memory processes at a time (RSS does not mind sharing)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
REPO_ROOT = Path(__file__).resolve().parents[1]


def attention_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int,
                    causal: bool, mode: str = "fwd") -> float:
    """FLOPs of attention: the forward does two matmuls of 2·Tq·Tk·D per head
    (``4·B·H·Tq·Tk·D``), half of it when causal; the backward 2.5× the forward."""
    fwd = 4.0 * batch * heads * tq * tk * head_dim * (0.5 if causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": BWD_FLOP_FACTOR, "fwd+bwd": 1.0 + BWD_FLOP_FACTOR}[mode]


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- ops


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


class OpBench:
    """What the harness needs to know about one op. A shape is a dict of the op's
    dimensions; ``x`` names the one that the sizes set (the plots' x axis)."""
    name: str
    x: str
    # What ``work`` counts and how its rate is reported: a bandwidth-bound op (LayerNorm,
    # GELU) sets "GB/s", "bytes", "gbps", 1e9 and overrides ``peak``.
    unit, work_key, rate_key, rate_scale = "TFLOP/s", "flops", "tflops", 1e12

    def peak(self, device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
        """The device's best rate in ``unit`` (key ``rate_key``) and how it was measured."""
        return measure_peak_tflops(device, dtype, quick)

    def default_sizes(self, device: torch.device) -> list[int]:
        raise NotImplementedError

    def shapes(self, device: torch.device, cfg: Config) -> list[dict]:
        """One shape per size in ``cfg.sizes``."""
        raise NotImplementedError

    def impls(self, device: torch.device, cfg: Config) -> tuple[list[Impl], dict[str, str]]:
        """The implementations that can run on ``device``, and why the others cannot."""
        raise NotImplementedError

    def inputs(self, shape: dict, dtype: torch.dtype, device: torch.device,
               seed: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """Fresh random inputs (requiring grad) and a gradient for the output."""
        raise NotImplementedError

    def work(self, shape: dict, cfg: Config, mode: str) -> float:
        """The work of one call, in ``work_key`` units (FLOPs)."""
        raise NotImplementedError


class AttentionBench(OpBench):
    """Attention on (B, H, T, D): naive T×T vs SDPA vs ``fastattn.flash_attention``."""
    name, x = "attention", "T"

    def default_sizes(self, device):
        return [1024, 2048, 4096, 8192, 16384] if device.type == "cuda" else [1024, 2048, 4096]

    def shapes(self, device, cfg):
        gpu = device.type == "cuda"
        heads = cfg.heads or (16 if gpu else 8)
        head_dim = cfg.head_dim or (128 if gpu else 64)
        # On GPU keep B·T at 16k tokens, so every size does comparable work.
        return [{"B": cfg.batch or (max(1, 16384 // t) if gpu else 1), "H": heads, "T": t,
                 "D": head_dim} for t in cfg.sizes]

    def impls(self, device, cfg):
        causal = cfg.causal
        impls = [Impl("naive", "naive", lambda q, k, v: naive_attention(q, k, v, causal)),
                 Impl("sdpa", "torch",
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))]
        skipped = {}
        for backend in backends.BACKENDS:
            name = f"fastattn/{backend}"
            ok, why = backends.available(backend, device)
            if backend not in _flash_op.BACKENDS:
                ok, why = False, "does not implement attention"
            elif ok and backend == "triton" and device.type == "cpu":
                ok, why = False, "the Triton interpreter is too slow to benchmark"
            if ok:
                impls.append(Impl(name, "fastattn", lambda q, k, v: fastattn.flash_attention(
                    q, k, v, causal=causal), backend))
            else:
                skipped[name] = why
        return impls, skipped

    def inputs(self, shape, dtype, device, seed):
        g = torch.Generator(device).manual_seed(seed)
        size = (shape["B"], shape["H"], shape["T"], shape["D"])
        q, k, v = (torch.randn(size, generator=g, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        return (q, k, v), torch.randn(size, generator=g, device=device, dtype=dtype)

    def work(self, shape, cfg, mode):
        return attention_flops(shape["B"], shape["H"], shape["T"], shape["T"], shape["D"],
                               cfg.causal, mode)


OPS: dict[str, OpBench] = {"attention": AttentionBench()}


# ------------------------------------------------------- bandwidth-bound ops


def measure_copy_gbps(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """The device's achievable bandwidth: a large tensor copy (read + write), GB/s at its
    20 % quantile time. 1 GiB on CUDA, 256 MiB on CPU (64 MiB with ``quick``)."""
    n_bytes = (64 << 20) if quick else ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.randn(n_bytes // 4, device=device).to(dtype)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        best_ms = time_cuda(lambda: dst.copy_(src), quick).p20
    else:
        dst.copy_(src)
        best_ms = time_cpu(lambda: dst.copy_(src), budget_s=0.1 if quick else 0.4).p20
    moved = 2 * src.numel() * src.element_size()
    return {"gbps": moved / (best_ms * 1e-3) / 1e9,
            "how": f"copy of {moved // 2 >> 20} MiB ({dtype_name(dtype)}), read + write, "
                   "20 % quantile time"}


class _RowwiseBench(OpBench):
    """An op over (M, N) rows; the sizes set the width N. Work is bytes moved: each input
    read once and each output written once (parameters and statistics are ignored)."""
    x = "N"
    unit, work_key, rate_key, rate_scale = "GB/s", "bytes", "gbps", 1e9
    # Tensors of M·N elements read + written, forward and backward.
    fwd_tensors = bwd_tensors = 0

    def peak(self, device, dtype, quick):
        return measure_copy_gbps(device, dtype, quick)

    def default_sizes(self, device):
        return [768, 1024, 2048, 4096, 8192]

    def shapes(self, device, cfg):
        rows = cfg.batch or (16384 if device.type == "cuda" else 4096)
        return [{"M": rows, "N": n} for n in cfg.sizes]

    def work(self, shape, cfg, mode):
        tensors = self.fwd_tensors + (self.bwd_tensors if mode == "fwd+bwd" else 0)
        return tensors * shape["M"] * shape["N"] * torch.finfo(dtype_of(cfg.dtype)).bits / 8

    def _fastattn_impls(self, device, cfg, op_backends, fn):
        if cfg.load_ext:   # the (cached) JIT build; in every process of the run
            _ext.load()
        impls, skipped = [], {}
        for backend in backends.BACKENDS:
            name = f"fastattn/{backend}"
            ok, why = backends.available(backend, device)
            if backend not in op_backends:
                ok, why = False, f"does not implement {self.name}"
            elif ok and backend == "triton" and device.type == "cpu":
                ok, why = False, "the Triton interpreter is too slow to benchmark"
            if ok:
                impls.append(Impl(name, "fastattn", fn, backend))
            else:
                skipped[name] = why
        return impls, skipped

    @staticmethod
    def _rand(shape, dtype, device, g, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


class LayerNormBench(_RowwiseBench):
    """LayerNorm over (M, N): the textbook formula vs ``F.layer_norm`` vs fastattn."""
    name = "layer_norm"
    fwd_tensors, bwd_tensors = 2, 3          # x → y; dy, x → dx

    def impls(self, device, cfg):
        from fastattn.ops import layer_norm as ln_op
        base = [Impl("naive", "naive", lambda x, w, b: _ref.layer_norm(x, w, b)),
                Impl("F.layer_norm", "torch",
                     lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b))]
        fast, skipped = self._fastattn_impls(
            device, cfg, ln_op.BACKENDS, lambda x, w, b: fastattn.layer_norm(x, x.shape[-1:], w, b))
        return base + fast, skipped

    def inputs(self, shape, dtype, device, seed):
        g = torch.Generator(device).manual_seed(seed)
        m, n = shape["M"], shape["N"]
        x = self._rand((m, n), dtype, device, g).requires_grad_()
        w = (1 + self._rand((n,), dtype, device, g, 0.1)).requires_grad_()
        b = self._rand((n,), dtype, device, g, 0.1).requires_grad_()
        return (x, w, b), self._rand((m, n), dtype, device, g)


class ResidualLayerNormBench(LayerNormBench):
    """``LayerNorm(x + residual)`` returning the sum too (a pre-LN block's second norm):
    add then ``F.layer_norm`` vs fastattn's one-pass kernel."""
    name = "residual_layer_norm"
    fwd_tensors, bwd_tensors = 4, 3          # x, r → h, y; dy, h → dx (= d residual)

    def impls(self, device, cfg):
        from fastattn.ops import layer_norm as ln_op

        def fused(x, r, w, b):
            y, _ = fastattn.layer_norm(x, x.shape[-1:], w, b, residual=r, return_residual=True)
            return y

        def unfused(norm):
            return lambda x, r, w, b: norm(x + r, w, b)

        base = [Impl("naive", "naive", unfused(lambda h, w, b: _ref.layer_norm(h, w, b))),
                Impl("add+F.layer_norm", "torch",
                     unfused(lambda h, w, b: F.layer_norm(h, h.shape[-1:], w, b)))]
        fast, skipped = self._fastattn_impls(device, cfg, ln_op.BACKENDS, fused)
        return base + fast, skipped

    def inputs(self, shape, dtype, device, seed):
        (x, w, b), dy = super().inputs(shape, dtype, device, seed)
        g = torch.Generator(device).manual_seed(seed + 1000)
        r = self._rand(tuple(x.shape), dtype, device, g).requires_grad_()
        return (x, r, w, b), dy


class BiasGeluBench(_RowwiseBench):
    """``gelu(x + b)`` over (M, N): the erf formula vs ``F.gelu(x + b)`` vs fastattn's
    fused kernel (bias gradient included)."""
    name = "bias_gelu"
    fwd_tensors, bwd_tensors = 2, 3          # x → y; dy, x → dx

    def impls(self, device, cfg):
        from fastattn.ops import gelu as gelu_op
        base = [Impl("naive", "naive", lambda x, b: _ref.gelu(x, bias=b)),
                Impl("F.gelu(x+b)", "torch", lambda x, b: F.gelu(x + b))]
        fast, skipped = self._fastattn_impls(device, cfg, gelu_op.BACKENDS,
                                             lambda x, b: fastattn.bias_gelu(x, b))
        return base + fast, skipped

    def inputs(self, shape, dtype, device, seed):
        g = torch.Generator(device).manual_seed(seed)
        m, n = shape["M"], shape["N"]
        x = self._rand((m, n), dtype, device, g).requires_grad_()
        b = self._rand((n,), dtype, device, g, 0.1).requires_grad_()
        return (x, b), self._rand((m, n), dtype, device, g)


OPS.update({op.name: op for op in (LayerNormBench(), ResidualLayerNormBench(), BiasGeluBench())})


# ------------------------------------------------------------------------ configs


@dataclass
class Config:
    """One benchmark run. ``sizes`` and ``dtype`` default per device (``resolve``)."""
    op: str = "attention"
    device: str | None = None          # default: cuda if available, else cpu
    dtype: str | None = None           # default: bfloat16 on CUDA, float32 on CPU
    sizes: list[int] | None = None     # default: the op's (attention: T = 1k, 2k, 4k on CPU)
    batch: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    modes: list[str] = field(default_factory=lambda: list(MODES))
    quick: bool = False                # fewer repeats: a smoke test, not a measurement
    memory: bool = True
    heap_retention: bool = True        # CPU timing with HEAP_RETENTION_ENV (else glibc's default)
    load_ext: bool = False             # JIT-load the C++ extension (fastattn.ext.load())

    def resolve(self) -> Config:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {self.op!r}")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device 'cuda' is not available (torch {torch.__version__}, "
                             f"CUDA {torch.version.cuda})")
        gpu = device == "cuda"
        dtype = dtype_name(dtype_of(self.dtype or ("bfloat16" if gpu else "float32")))
        sizes = self.sizes or OPS[self.op].default_sizes(torch.device(device))
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        for name in ("batch", "heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"sizes must be positive integers, got {sizes}")
        return Config(**{**asdict(self), "device": device, "dtype": dtype,
                         "sizes": list(sizes)})


# ------------------------------------------------------------------------- timing


@dataclass
class Timing:
    p20: float          # milliseconds
    p50: float
    p80: float
    repeats: int        # -1: not known (do_bench)
    faults_per_call: float | None = None   # CPU: minor page faults, a sign of fresh memory


def time_cpu(fn: Callable[[], Any], budget_s: float = CPU_BUDGET_S,
             min_repeats: int = MIN_REPEATS, max_repeats: int = 100) -> Timing:
    """Call ``fn`` (already warmed up) until ``budget_s`` is spent, at least
    ``min_repeats`` times; quantiles of the wall-clock times."""
    timing = time_cpu_interleaved({"fn": fn}, budget_s, min_repeats, max_repeats)["fn"]
    if isinstance(timing, Exception):
        raise timing
    return timing


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float = CPU_BUDGET_S,
                         min_repeats: int = MIN_REPEATS, max_repeats: int = 100
                         ) -> dict[str, Timing | Exception]:
    """Time several functions (already warmed up) round by round, each called once per
    round, so that load from other processes hits them alike: at least ``min_repeats``
    rounds, more while ``budget_s`` per function lasts. A function that raises is
    dropped; its exception is returned in place of its timing."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    failed: dict[str, Exception] = {}
    start, rounds = time.perf_counter(), 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start
                                    < budget_s * len(fns)) and len(failed) < len(fns):
        for name, fn in fns.items():
            if name in failed:
                continue
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001  reported per function
                failed[name] = e
                continue
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        rounds += 1
    return {name: failed.get(name) or Timing(**{**asdict(_quantiles(times[name])),
                                                "faults_per_call": faults[name] / rounds})
            for name in fns}


def time_cuda(fn: Callable[[], Any], quick: bool = False) -> Timing:
    """Median and 20/80 % quantiles in ms from ``triton.testing.do_bench`` (CUDA events,
    L2 cache flushed before each call); plain CUDA events without Triton."""
    warmup, rep = (5, 20) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, warmup, rep)
    p20, p50, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return Timing(p20, p50, p80, repeats=-1)   # do_bench does not say how many


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / one_ms)):
        fn()
    times = []
    for _ in range(max(MIN_REPEATS, int(rep_ms / one_ms))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _quantiles(times)


def _quantiles(times_ms: list[float]) -> Timing:
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], 1)
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(q[1], statistics.median(times_ms), q[7], len(times_ms))


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False
                        ) -> dict:
    """The device's achievable TFLOP/s in ``dtype``: an n×n matmul (n = 8192 on CUDA,
    2048 on CPU; 1024 with ``quick``), at its 20 % quantile time (a near-best call)."""
    n = 1024 if quick else (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    if device.type == "cuda":
        best_ms = time_cuda(lambda: a @ b, quick).p20
    else:
        a @ b
        best_ms = time_cpu(lambda: a @ b, budget_s=0.1 if quick else 0.4).p20
    return {"tflops": 2 * n ** 3 / (best_ms * 1e-3) / 1e12,
            "how": f"{n}x{n} @ {n}x{n} matmul in {dtype_name(dtype)}, 20 % quantile time"}


# --------------------------------------------------------------- correctness check


def run_once(impl: Impl, inputs: tuple[Tensor, ...], dout: Tensor, mode: str
              ) -> list[Tensor]:
    """The output (and, for fwd+bwd, the gradients of all inputs) of one call."""
    if mode == "fwd":
        with torch.no_grad():
            return [impl(*inputs)]
    out = impl(*inputs)
    return [out, *torch.autograd.grad(out, inputs, dout)]


def reference(impls: list[Impl], inputs: tuple[Tensor, ...], dout: Tensor, mode: str
               ) -> tuple[list[Tensor] | None, Impl | None]:
    """Output (and gradients) of the naive implementation in float32 (float64 stays
    float64) on the same inputs; if it cannot run (out of memory), torch's built-in.
    Returns (None, None) if neither can."""
    up = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    for impl in sorted(impls, key=lambda i: ("naive", "torch", "fastattn").index(i.kind))[:2]:
        inputs32 = tuple(x.detach().to(up).requires_grad_() for x in inputs)
        try:
            return [t.detach() for t in run_once(impl, inputs32, dout.to(up), mode)], impl
        except Exception as e:  # noqa: BLE001
            print(f"  reference {impl.name} failed ({type(e).__name__}), trying the next",
                  file=sys.stderr)
            del inputs32
            if inputs[0].is_cuda:
                torch.cuda.empty_cache()
    return None, None


def check(impl: Impl, inputs: tuple[tuple[Tensor, ...], Tensor], ref: list[Tensor],
          mode: str) -> float:
    """Run ``impl`` once on ``inputs`` (tensors, output gradient) and return its
    ``max_rel_error`` against ``ref``; compare with ``TOLERANCE[dtype]``."""
    return max_rel_error(run_once(impl, *inputs, mode), ref)


def max_rel_error(got: list[Tensor], ref: list[Tensor]) -> float:
    """max |got - ref| / max |ref| over the output and gradients (NaN if any is not finite)."""
    worst = 0.0
    for x, r in zip(got, ref):
        x = x.detach().to(r.dtype)
        if not torch.isfinite(x).all():
            return float("nan")
        worst = max(worst, ((x - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


# --------------------------------------------------------------------- measuring


def _row(bench: OpBench, impl: Impl, shape: dict, mode: str) -> dict:
    return {"impl": impl.name, "kind": impl.kind, "backend": impl.backend, "mode": mode,
            "shape": shape, bench.x: shape[bench.x], "status": "ok"}


def _check_row(bench: OpBench, impl: Impl, shape: dict, mode: str, sets: list,
               ref: list[Tensor] | None, cfg: Config) -> dict:
    """The row of one implementation at one size after its correctness check, which is
    also its warm-up call. ``ref`` is None when the implementation, run in the benchmark
    dtype, made the reference itself: that run was its check and warm-up."""
    row = _row(bench, impl, shape, mode)
    if ref is None:
        return row
    try:
        row["max_rel_error"] = check(impl, sets[0], ref, mode)
    except Exception as e:  # noqa: BLE001  an implementation that fails gets no number
        return _failed(row, e)
    if not row["max_rel_error"] <= TOLERANCE[dtype_of(cfg.dtype)]:
        row["status"] = "wrong"
    return row


def _failed(row: dict, e: Exception) -> dict:
    row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _time_rows(bench: OpBench, impls: list[Impl], rows: list[dict], sets: list, mode: str,
               cfg: Config, device: torch.device, peak: float) -> None:
    """Time the implementations whose rows passed the check (and on CUDA measure their
    memory): on CPU interleaved, round by round; on CUDA one after another."""
    calls = {}
    for impl, row in zip(impls, rows):
        if row["status"] == "ok":
            inputs = itertools.cycle(sets)
            calls[impl.name] = (row, lambda impl=impl, inputs=inputs: run_once(
                impl, *next(inputs), mode))
    if device.type == "cuda":
        timings: dict[str, Timing | Exception] = {}
        for name, (row, call) in calls.items():
            try:
                timings[name] = time_cuda(call, cfg.quick)
                row["extra_mem_mib"] = _cuda_extra_memory(call)
            except Exception as e:  # noqa: BLE001
                timings[name] = e
    else:
        timings = time_cpu_interleaved({name: call for name, (_, call) in calls.items()},
                                       budget_s=0.05 if cfg.quick else CPU_BUDGET_S)
    work = bench.work(rows[0]["shape"], cfg, mode)
    for name, (row, _) in calls.items():
        t = timings[name]
        if isinstance(t, Exception):
            _failed(row, t)
            continue
        rate = work / (t.p50 * 1e-3) / bench.rate_scale
        row.update({"time_ms": asdict(t), bench.work_key: work, bench.rate_key: rate,
                    "pct_peak": 100 * rate / peak})


def _cuda_extra_memory(call: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del result
    return extra / 2 ** 20


def _progress(row: dict, x: str, start: float) -> None:
    if row["status"] == "ok":
        what = f"{row['time_ms']['p50']:9.2f} ms"
    else:
        what = row["status"] + (f": {row['error']}" if "error" in row else
                                f" (max rel error {row['max_rel_error']:.2e})")
    print(f"  [{time.perf_counter() - start:5.1f} s] {row['impl']:<16} {x}={row[x]:<6} "
          f"{row['mode']:<8} {what}", file=sys.stderr, flush=True)


def measure(cfg: Config) -> dict:
    """Correctness check and timing of every implementation at every size and mode, in
    this process. Returns ``{"peak": ..., "rows": [...], "skipped": {...}, "threads": n}``."""
    cfg = cfg.resolve()
    start = time.perf_counter()
    bench, device, dtype = OPS[cfg.op], torch.device(cfg.device), dtype_of(cfg.dtype)
    impls, skipped = bench.impls(device, cfg)
    peak = bench.peak(device, dtype, cfg.quick)
    # fwd+bwd first: it repeats the reference call's allocations, so the heap it grew
    # serves the timed calls; the forward's smaller allocations then fit into it.
    modes = sorted(cfg.modes, key=MODES.index, reverse=True)
    rows = []
    for shape in bench.shapes(device, cfg):
        sets = [bench.inputs(shape, dtype, device, seed) for seed in range(N_INPUT_SETS)]
        # One reference run serves both modes: output and gradients.
        ref, ref_impl = reference(impls, *sets[0], modes[0])
        for mode in modes:
            if ref is None:
                group = [{**_row(bench, impl, shape, mode), "status": "error",
                          "error": "no reference could be computed"} for impl in impls]
            else:
                group = [_check_row(bench, impl, shape, mode, sets,
                                    None if impl is ref_impl and ref[0].dtype == dtype else ref,
                                    cfg) for impl in impls]
                for row in group:
                    row["reference"] = f"{ref_impl.name} in {dtype_name(ref[0].dtype)}"
                _time_rows(bench, impls, group, sets, mode, cfg, device, peak[bench.rate_key])
            for row in group:
                _progress(row, bench.x, start)
            rows += group
        del sets, ref
    rows.sort(key=lambda r: (cfg.sizes.index(r[bench.x]), MODES.index(r["mode"])))  # stable
    return {"peak": peak, "rows": rows, "skipped": skipped, "threads": torch.get_num_threads()}


# ------------------------------------------------------------ CPU memory (forked)


def _memory_job(job: dict) -> dict:
    """In a fresh forked process: extra peak RSS of one call, in MiB."""
    cfg, shape, device = Config(**job["config"]), job["shape"], torch.device("cpu")
    bench, dtype = OPS[cfg.op], dtype_of(cfg.dtype)
    impl = next(i for i in bench.impls(device, cfg)[0] if i.name == job["impl"])
    tiny = {**shape, bench.x: min(shape[bench.x], 64)}
    run_once(impl, *bench.inputs(tiny, dtype, device, seed=1), job["mode"])  # warm-up
    inputs, dout = bench.inputs(shape, dtype, device, seed=0)
    with contextlib.suppress(OSError):   # reset the peak to now (Linux ≥ 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    run_once(impl, inputs, dout, job["mode"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    return {"extra_mem_mib": max(0, peak - before) / 2 ** 20}


def _memory_server() -> None:
    """Entry point of the memory process. It has imported torch and fastattn and runs no
    op itself, so each fork starts clean. Reads all jobs (JSON lines) until stdin closes,
    runs up to ``MEMORY_WORKERS`` forks at a time, answers ``[index, answer]`` lines."""
    import torch._dynamo  # noqa: F401  a custom op's first call imports it: once, here
    print(json.dumps({"ready": True}), flush=True)
    pending = list(enumerate(json.loads(line) for line in sys.stdin))
    running: dict[int, tuple[int, int]] = {}          # pid -> (job index, pipe)
    while pending or running:
        while pending and len(running) < MEMORY_WORKERS:
            index, job = pending.pop(0)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:   # the measuring process: never returns into this loop
                try:
                    os.close(r)
                    try:
                        answer = _memory_job(job)
                    except BaseException as e:  # noqa: BLE001  reported to the parent
                        answer = {"error": f"{type(e).__name__}: {e}"}
                    os.write(w, json.dumps(answer).encode())   # small: fits the pipe
                finally:
                    os._exit(0)
            os.close(w)
            running[pid] = (index, r)
        pid, status = os.wait()
        index, r = running.pop(pid)
        with os.fdopen(r, "rb") as f:
            data = f.read().decode()
        answer = json.loads(data) if data else {"error": f"the process died ({status})"}
        print(json.dumps([index, answer]), flush=True)


class _MemoryServer:
    """The parent's handle on ``_memory_server``: started early so that its imports
    overlap other work, then given all jobs at once."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HEAP_RETENTION_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fastattn.benchmark import _memory_server as m; m()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _line(self) -> Any:
        ready, _, _ = select.select([self.proc.stdout], [], [], MEMORY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("no answer from the memory process "
                               f"(exit status {self.proc.poll()})")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._line()

    def measure(self, jobs: list[dict]) -> list[dict]:
        self.proc.stdin.write("".join(json.dumps(job) + "\n" for job in jobs))
        self.proc.stdin.close()
        answers: list[dict] = [{"error": "not measured"}] * len(jobs)
        try:
            for _ in jobs:
                index, answer = self._line()
                answers[index] = answer
        except RuntimeError as e:
            answers = [a if "error" not in a else {"error": str(e)} for a in answers]
        return answers


def _cpu_memory(server: _MemoryServer, cfg: Config, rows: list[dict]) -> None:
    """Fill in ``extra_mem_mib`` (or ``mem_error``) of every row that has a time."""
    todo = [r for r in rows if r["status"] == "ok"]
    # Largest first, so that the slow naive jobs do not end up alone at the end.
    todo.sort(key=lambda r: (r["kind"] == "naive", r["time_ms"]["p50"]), reverse=True)
    answers = server.measure([{"config": asdict(cfg), "shape": r["shape"], "impl": r["impl"],
                               "mode": r["mode"]} for r in todo])
    for row, answer in zip(todo, answers):
        if "error" in answer:
            row["mem_error"] = answer["error"]
        else:
            row["extra_mem_mib"] = answer["extra_mem_mib"]


# ------------------------------------------------------- CPU timing in a child


def heap_retention_active() -> bool:
    return all(os.environ.get(k) == v for k, v in HEAP_RETENTION_ENV.items())


def _timing_child() -> None:
    """Entry point of the CPU timing process: Config JSON on stdin, results on stdout.
    Everything else the process prints goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = measure(Config(**json.loads(sys.stdin.read())))
    out.write(json.dumps(result))
    out.close()


def _start_timing_child(retain: bool) -> subprocess.Popen:
    """The CPU timing process, with ``HEAP_RETENTION_ENV`` if ``retain`` (else without
    it); it imports, then waits for its Config on stdin."""
    env = {k: v for k, v in os.environ.items() if k not in HEAP_RETENTION_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", "from fastattn.benchmark import _timing_child as t; t()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**env, **HEAP_RETENTION_ENV} if retain else env)


def _timing_child_result(proc: subprocess.Popen, cfg: Config) -> dict:
    out, _ = proc.communicate(json.dumps(asdict(cfg)))
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed (exit status {proc.returncode})")
    return json.loads(out)


def allocator_setting(device: str, retain: bool = True) -> dict:
    """How ``run`` allocates for the CPU timing (``retain``: ``HEAP_RETENTION_ENV``) and
    memory runs on this platform."""
    if device != "cpu":
        return {"timing": "CUDA caching allocator", "memory": "torch.cuda.max_memory_allocated"}
    linux = sys.platform == "linux"
    retained = retain if linux else heap_retention_active()
    return {"libc": " ".join(platform.libc_ver()),
            "timing": " ".join(f"{k}={v}" for k, v in HEAP_RETENTION_ENV.items())
            if retained else "default (freed large blocks go back to the OS)",
            "memory": "default malloc; peak RSS of a fresh forked process minus RSS before"
            if linux else "not measured (needs Linux)"}


# ------------------------------------------------------------------------ results


def run(cfg: Config) -> dict:
    """Measure ``cfg`` and return the results document (see ``save``). On CPU (Linux)
    the timing runs in a child process with ``HEAP_RETENTION_ENV`` (or without, if
    ``cfg.heap_retention`` is off) unless this process already has the wanted setting,
    and the memory in processes forked from a memory server."""
    cfg = cfg.resolve()
    load = load_average()           # before this run adds its own
    linux_cpu = cfg.device == "cpu" and sys.platform == "linux"
    server = _MemoryServer() if linux_cpu and cfg.memory else None
    in_child = linux_cpu and heap_retention_active() != cfg.heap_retention
    child = _start_timing_child(cfg.heap_retention) if in_child else None
    clock = [time.perf_counter()]
    try:   # the two processes import at the same time; the timing starts when both did
        if server is not None:
            server.wait_ready()
        measured = _timing_child_result(child, cfg) if child else measure(cfg)
        clock.append(time.perf_counter())
        if server is not None:
            _cpu_memory(server, cfg, measured["rows"])
        clock.append(time.perf_counter())
    finally:
        for proc in (child, server and server.proc):
            if proc is not None:
                if proc.poll() is None:    # done with it (or failed): do not wait for it
                    proc.kill()
                    proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None and not pipe.closed:
                        pipe.close()
    bench = OPS[cfg.op]
    add_ratios(measured["rows"], bench.x)
    shapes = bench.shapes(torch.device(cfg.device), cfg)
    return {"schema": 1, "op": cfg.op, "x": bench.x, "unit": bench.unit,
            "work_key": bench.work_key, "rate_key": bench.rate_key,
            "config": asdict(cfg), "shapes": shapes,
            "provenance": provenance(cfg, measured["threads"], load), "peak": measured["peak"],
            "skipped": measured["skipped"], "rows": measured["rows"],
            "durations_s": {"start_and_timing": round(clock[1] - clock[0], 1),
                            "memory": round(clock[2] - clock[1], 1)}}


def add_ratios(rows: list[dict], x: str) -> None:
    """Speed and memory ratios of each row against the naive and the torch rows at the
    same size and mode: ``speedup_vs_naive`` = naive time / time (higher is faster),
    ``mem_ratio_vs_naive`` = naive extra memory / extra memory (higher uses less);
    ``*_vs_torch`` likewise against torch's built-in (SDPA for attention)."""
    for row in rows:
        for kind, tag in (("naive", "naive"), ("torch", "torch")):
            base = next((r for r in rows if r["kind"] == kind and r[x] == row[x]
                         and r["mode"] == row["mode"] and r["shape"] == row["shape"]), None)
            if base is None:
                continue
            if "time_ms" in base and "time_ms" in row:
                row[f"speedup_vs_{tag}"] = base["time_ms"]["p50"] / row["time_ms"]["p50"]
            if base.get("extra_mem_mib") and row.get("extra_mem_mib"):
                row[f"mem_ratio_vs_{tag}"] = base["extra_mem_mib"] / row["extra_mem_mib"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {cpu_count()} cores"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_slug(device: str) -> str:
    """``cpu-intel-xeon-processor-2c``, ``nvidia-h100-80gb-hbm3``: the results folder."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name())
    model = device_name("cpu").rsplit(",", 1)[0]
    model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", model, flags=re.I)
    return f"cpu-{_slug(model)}-{cpu_count()}c"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_state() -> dict:
    """Commit of the checkout fastattn runs from, and whether its code differs from it:
    changed or untracked files outside ``benchmarks/results`` (a fresh results file is
    not a code change)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", ".", ":!benchmarks/results")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def provenance(cfg: Config, threads: int, load: list[float] | None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(cfg.device), "device_slug": device_slug(cfg.device),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform(),
        "fastattn": fastattn.__version__, **git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": cfg.dtype, "threads": threads,
        "allocator": allocator_setting(cfg.device, getattr(cfg, "heap_retention", True)),
        "cpu_cores": cpu_count(), "load_average_at_start": load,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: more than the core count means other work
    shared the CPU and the CPU times are noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def default_results_dir(device: str) -> Path:
    """``benchmarks/results/<device slug>/`` of the checkout (or of the working dir)."""
    root = REPO_ROOT if (REPO_ROOT / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / device_slug(device)


def save(results: dict, directory: Path | str | None = None) -> tuple[Path, Path | None, str]:
    """Write ``<op>.json`` and ``<op>.png`` into ``directory`` (a ``run_sweep`` document:
    ``<op>_sweep.*``). Returns the paths and a note (why there is no plot, or "")."""
    directory = Path(directory or default_results_dir(results["config"]["device"]))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{results['op']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    png = directory / f"{results['op']}.png"
    try:
        (plot_sweep if "runs" in results else plot)(results, png)
    except ImportError:
        return path, None, "no plot: matplotlib is not installed (pip install matplotlib)"
    return path, png, ""


# --------------------------------------------------------------- tables and plots


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ratio":
        return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×"
    if kind == "pct":
        return f"{value:.1f}"
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, cells and footnotes of the results table (shared by text and markdown)."""
    x, rows, rate_key = results["x"], results["rows"], results.get("rate_key", "tflops")
    show_batch = len({r["shape"].get("B") for r in rows}) > 1
    builtin = next((r["impl"] for r in rows if r["kind"] == "torch"), "torch")
    header = ["impl", *(["B"] if show_batch else []), x, "mode", "time ms",
              results["unit"], "% peak", "extra MiB", "speed vs naive", "mem naive/x",
              f"speed vs {builtin}", f"mem {builtin}/x"]
    cells, notes = [], []
    for r in rows:
        ok = r["status"] == "ok"
        if ok:
            time_cell = _fmt(r["time_ms"]["p50"], "num")
        elif r["status"] == "wrong":
            time_cell = f"WRONG (err {r['max_rel_error']:.1e})"
        else:
            time_cell = "ERROR"
            notes.append(f"{r['impl']} {x}={r[x]} {r['mode']}: {r['error']}")
        if r.get("mem_error"):
            notes.append(f"{r['impl']} {x}={r[x]} {r['mode']} memory: {r['mem_error']}")
        faults = (r.get("time_ms") or {}).get("faults_per_call") or 0
        if faults > FAULTS_NOTE:
            notes.append(f"{r['impl']} {x}={r[x]} {r['mode']}: {faults:.0f} page faults per "
                         "timed call (fresh memory from the OS: its first-touch cost is in "
                         "the time)")
        cells.append([r["impl"], *([str(r["shape"]["B"])] if show_batch else []), str(r[x]),
                      r["mode"], time_cell,
                      _fmt(r.get(rate_key), "num"), _fmt(r.get("pct_peak"), "pct"),
                      _fmt(r.get("extra_mem_mib"), "num"),
                      _fmt(r.get("speedup_vs_naive"), "ratio"),
                      _fmt(r.get("mem_ratio_vs_naive"), "ratio"),
                      _fmt(r.get("speedup_vs_torch"), "ratio"),
                      _fmt(r.get("mem_ratio_vs_torch"), "ratio")])
    notes += [f"{name}: not run ({why})" for name, why in results.get("skipped", {}).items()]
    return header, cells, notes


LEGEND = ("speed vs X = X's time / this time (higher is faster); "
          "mem X/x = X's extra peak memory / this one's (higher uses less)")


def format_table(results: dict, markdown: bool = False) -> str:
    header, cells, notes = table_rows(results)
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + [""] + [f"- {n}" for n in [LEGEND, *notes]])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    left = {header.index("impl"), header.index("mode")}

    def line(c: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(c, widths))).rstrip()
    lines = [line(header), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]
    return "\n".join(lines + [LEGEND, *notes])


def summary(results: dict) -> list[str]:
    """One line per fastattn implementation and mode at the largest size: how much
    faster than naive and with how much less extra memory."""
    x, rows = results["x"], results["rows"]
    largest = max((r[x] for r in rows), default=None)
    lines = []
    for r in rows:
        if r["kind"] == "fastattn" and r[x] == largest and r["status"] == "ok":
            ratios = [f"{r[k]:.1f}× {what}" for k, what in (
                ("speedup_vs_naive", "faster"), ("mem_ratio_vs_naive", "less extra memory"))
                if k in r]
            lines.append(f"{r['impl']} at {x}={largest} {r['mode']}: "
                         f"{', '.join(ratios) or 'no ratio'} than naive")
    return lines


def describe(results: dict) -> str:
    """One line: what was measured where, with what (the table's caption)."""
    cfg, prov, peak, x = results["config"], results["provenance"], results["peak"], results["x"]
    shapes = [r["shape"] for r in results["rows"]] or results.get("shapes", [])
    fixed = ", ".join(f"{k}={v}" for k, v in shapes[0].items()
                      if k != x and all(s[k] == v for s in shapes)) if shapes else ""
    commit = (prov["commit"] or "no commit")[:10] + (" (dirty)" if prov["dirty"] else "")
    return "; ".join([
        f"{results['op']} on {prov['device']}",
        f"{cfg['dtype']}, {'causal' if cfg['causal'] else 'not causal'}, {fixed}",
        f"peak {peak[results.get('rate_key', 'tflops')]:.3g} {results['unit']} "
        f"({peak['how']})",
        f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov['cuda']}, "
        f"{prov['threads']} threads",
        f"allocator: {prov['allocator']['timing']}",
        f"load average at start {prov.get('load_average_at_start')} on "
        f"{prov.get('cpu_cores')} cores",
        f"commit {commit}, {prov['date']}"])


def plot(results: dict, path: Path) -> None:
    """Time and extra memory against size, one line per implementation and a row of
    panels per mode. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, rows = results["x"], [r for r in results["rows"] if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.8 * len(modes)), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for (ax_t, ax_m), mode in zip(axes, modes):
        for impl in impls:
            mine = [r for r in rows if r["impl"] == impl and r["mode"] == mode]
            xs = [r[x] for r in mine]
            ax_t.plot(xs, [r["time_ms"]["p50"] for r in mine], "o-", label=impl)
            mem = [(r[x], r["extra_mem_mib"]) for r in mine if r.get("extra_mem_mib")]
            if mem:
                ax_m.plot(*zip(*mem), "o-", label=impl)
        for ax, what in ((ax_t, "time (ms, median)"), (ax_m, "extra peak memory (MiB)")):
            ax.set(yscale="log", xlabel=x, ylabel=what, title=f"{mode}: {what}")
            ax.set_xscale("log", base=2)
            sizes = sorted({r[x] for r in rows})
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
            if ax.lines:
                ax.legend()
    prov, cfg = results["provenance"], results["config"]
    dims = ", ".join(f"{k}={v}" for k, v in rows[0]["shape"].items() if k != x) if rows else ""
    fig.suptitle(f"{results['op']} on {prov['device']}: {cfg['dtype']}, "
                 f"{'causal' if cfg['causal'] else 'not causal'}, {dims}; torch "
                 f"{prov['torch']}, {prov['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- sweeps

# The settings a sweep crosses, per op and device; every combination is one ``run``.
_SWEEP_AXES = {
    "attention": {"cpu": {"head_dim": [32, 64, 128], "causal": [True, False],
                          "dtype": ["float32", "bfloat16"]},
                  "cuda": {"head_dim": [64, 128, 256], "causal": [True, False],
                           "dtype": ["bfloat16", "float16"]}},
    "rowwise": {"cpu": {"dtype": ["float32", "bfloat16"]},
                "cuda": {"dtype": ["bfloat16", "float16", "float32"]}},
}
# One representative size per sweep (the size axis has its own runs): attention T, or
# the row width of the bandwidth-bound ops.
_SWEEP_SIZES = {"attention": {"cpu": [2048], "cuda": [8192]},
                "rowwise": {"cpu": [4096], "cuda": [8192]}}


def sweep_axes(op: str, device: str) -> dict[str, list]:
    """{setting: values} that ``run_sweep`` crosses for ``op`` on ``device``."""
    return _SWEEP_AXES["attention" if op == "attention" else "rowwise"][device]


def run_sweep(cfg: Config, axes: dict[str, list] | None = None,
              on_run: Callable[[dict], None] | None = None) -> dict:
    """``run`` once per combination of ``axes`` (default ``sweep_axes``) on top of
    ``cfg``, at ``cfg.sizes`` or one representative size. Returns a document whose
    ``runs`` are the runs' own documents, so every number keeps its provenance;
    ``on_run(doc)`` is called after each run (progress)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = "attention" if cfg.op == "attention" else "rowwise"
    base = Config(**{**asdict(cfg), "device": device,
                     "sizes": cfg.sizes or _SWEEP_SIZES[kind][device]}).resolve()
    axes = axes or sweep_axes(cfg.op, device)
    unknown = [a for a in axes if a not in ("head_dim", "causal", "dtype", "heads", "batch")]
    if unknown:
        raise ValueError(f"sweep axes must be among head_dim, causal, dtype, heads, batch; "
                         f"got {unknown}")
    load, start, runs = load_average(), time.perf_counter(), []
    for values in itertools.product(*axes.values()):
        doc = run(Config(**{**asdict(base), **dict(zip(axes, values))}))
        doc["sweep_point"] = dict(zip(axes, values))
        runs.append(doc)
        if on_run is not None:
            on_run(doc)
    bench = OPS[cfg.op]
    prov = dict(runs[0]["provenance"], load_average_at_start=load)
    return {"schema": 1, "op": f"{cfg.op}_sweep", "sweep_of": cfg.op, "x": bench.x,
            "unit": bench.unit, "rate_key": bench.rate_key, "axes": axes,
            "config": asdict(base), "provenance": prov, "runs": runs,
            "durations_s": {"total": round(time.perf_counter() - start, 1)}}


def sweep_rows(doc: dict) -> list[dict]:
    """The fastattn rows of every run, each with its sweep point: what the sweep table
    and plot show (the naive and torch rows are in the ratios)."""
    rows = []
    for run_doc in doc["runs"]:
        for r in run_doc["rows"]:
            if r["kind"] == "fastattn":
                rows.append({**run_doc["sweep_point"], **r})
    return rows


def format_sweep_table(doc: dict, markdown: bool = False) -> str:
    """One line per sweep point, size, mode and fastattn backend."""
    axes, x, rate = list(doc["axes"]), doc["x"], doc.get("rate_key", "tflops")
    header = [*axes, x, "mode", "impl", "time ms", doc["unit"], "% peak", "speed vs naive",
              "speed vs torch", "mem naive/x"]
    cells = []
    for r in sweep_rows(doc):
        ok = r["status"] == "ok"
        cells.append([*(("yes" if r[a] else "no") if a == "causal" else str(r[a])
                        for a in axes),
                      str(r[x]), r["mode"], r["impl"],
                      _fmt(r["time_ms"]["p50"], "num") if ok else r["status"].upper(),
                      _fmt(r.get(rate), "num"), _fmt(r.get("pct_peak"), "pct"),
                      _fmt(r.get("speedup_vs_naive"), "ratio"),
                      _fmt(r.get("speedup_vs_torch"), "ratio"),
                      _fmt(r.get("mem_ratio_vs_naive"), "ratio")])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" for _ in header) + "|",
                 *("| " + " | ".join(c) + " |" for c in cells)]
        return "\n".join(lines + ["", f"- {LEGEND}"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda c: "  ".join(v.rjust(w) for v, w in zip(c, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells),
                      LEGEND])


def describe_sweep(doc: dict) -> str:
    """The sweep table's caption: what was crossed, at which size, where."""
    first, prov = doc["runs"][0], doc["provenance"]
    x = doc["x"]
    shape = first["rows"][0]["shape"] if first["rows"] else first["shapes"][0]
    swept = {{"head_dim": "D", "heads": "H", "batch": "B"}.get(a) for a in doc["axes"]}
    fixed = ", ".join(f"{k}={v}" for k, v in shape.items() if k != x and k not in swept)
    crossed = "; ".join(f"{a} ∈ {{{', '.join(map(str, v))}}}" for a, v in doc["axes"].items())
    commit = (prov["commit"] or "no commit")[:10] + (" (dirty)" if prov["dirty"] else "")
    return (f"{doc['sweep_of']} sweep on {prov['device']}: {crossed}; {x} = "
            f"{', '.join(str(s) for s in doc['config']['sizes'])}, {fixed}; every point is a "
            f"full `fastattn bench` run (naive, torch and fastattn, checked, then timed); "
            f"torch {prov['torch']}, {prov['threads']} threads; allocator: "
            f"{prov['allocator']['timing']}; commit {commit}, {prov['date']}")


def plot_sweep(doc: dict, path: Path) -> None:
    """Speed of each fastattn backend against naive and torch, one bar per sweep point,
    a panel per mode. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in sweep_rows(doc) if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    impls = {r["impl"] for r in rows}
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

    def label(r: dict) -> str:
        parts = [("causal" if r[a] else "full") if a == "causal" else
                 f"D{r[a]}" if a == "head_dim" else short.get(r[a], f"{a}={r[a]}")
                 for a in doc["axes"]]
        return "\n".join(parts + ([r["impl"].removeprefix("fastattn/")] if len(impls) > 1
                                   else []))
    width = max(11.0, 0.7 * len(rows) / max(1, len(modes)))
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.8 * len(modes)), squeeze=False)
    for (ax,), mode in zip(axes, modes):
        mine = [r for r in rows if r["mode"] == mode]
        labels = [label(r) for r in mine]
        pos = range(len(mine))
        ax.bar([p - 0.2 for p in pos], [r.get("speedup_vs_naive", 0) for r in mine], 0.4,
               label="speed vs naive")
        ax.bar([p + 0.2 for p in pos], [r.get("speedup_vs_torch", 0) for r in mine], 0.4,
               label="speed vs torch")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(pos), labels, fontsize=8)
        ax.set(ylabel="× (higher is faster)", title=f"{doc['sweep_of']} {mode}")
        ax.legend()
    prov = doc["provenance"]
    fig.suptitle(f"{doc['sweep_of']} sweep on {prov['device']}, torch {prov['torch']}, "
                 f"{prov['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
