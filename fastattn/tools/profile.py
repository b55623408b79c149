"""``fastattn profile``: where the time and the memory of a training step go.

    fastattn profile                                  # GPT training steps (tiny on CPU)
    fastattn profile --variant naive --seq 1024       # the textbook GPT, to compare
    fastattn profile --op flash_attention --backend torch   # forward + backward of an op

It runs ``--warmup`` steps, then ``--steps`` profiled ones, under ``torch.profiler``
(``schedule(warmup=..., active=...)``, so start-up work and the profiler's own start
stay out of the numbers). A GPT step is ``fastattn.models.optim.train_step``:
forward and loss under autocast (bf16 on CUDA), backward, gradient clipping, the AdamW
step of ``configure_optimizer``, ``zero_grad``, on one fixed batch of random tokens
(data loading is not profiled). An op step is the forward and backward of a registered
op's fastattn call (``fastattn.ops.registry``: ``fast`` on ``inputs``) at the shape the
preset's GPT gives it (``model_shape``): attention on (B, n_head, T, head_dim), the
row-wise ops on (B·T, width) with the width of their place in the block.

The numbers:

* **table**: ``key_averages()`` by *self* time, so a nested op is not counted in its
  parent too. On CPU every op's self CPU time, whose sum is the wall time of the
  profiled steps (``ProfilerStep*`` is the time in a step outside any op: Python and
  the profiler); on CUDA every kernel's GPU time, whose sum is the time the GPU was busy.
* **phases** (``record_function`` ranges ``forward``, ``backward``, ``optimizer``, which
  also label the trace): timed around each phase with CUDA events on CUDA (GPU time:
  kernels run after their launch, so host time would only measure launching) and
  ``time.perf_counter`` on CPU. Shares are of the step time, the mean over profiled steps.
* **memory**: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the run and
  a memory snapshot (``torch.cuda.memory._record_memory_history``, every allocation with
  its stack) for https://pytorch.org/memory_viz. On CPU the peak of the profiler's
  memory events (``profile_memory=True``): tensors allocated during the profiled steps,
  so memory that was live before them (parameters, optimizer state) is not counted.

Writes ``trace.json`` (Chrome trace: chrome://tracing or https://ui.perfetto.dev) and,
on CUDA, ``memory_snapshot.pickle`` into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from fastattn import backends
from fastattn.models.gpt import ATTENTION, GPT, PRESETS, GPTConfig
from fastattn.models.optim import Precision, choose_precision, configure_optimizer, train_step
from fastattn.models.train_config import DEFAULTS, TRAIN_PRESETS
from fastattn.ops import registry
from fastattn.tools.common import int_at_least, resolve_device
from fastattn.tools.profile_report import (DEFAULT_TOP, MEMORY_VIZ, ProfileResult, add_memory,
                                           format_report, rows_by_self_time)

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_PRESET = {"cpu": "tiny", "cuda": "gpt2"}
DEFAULT_OUT = "fastattn-profile"
DEFAULT_STEPS, DEFAULT_WARMUP = 3, 1
MEMORY_ENTRIES = 100_000           # allocation events the CUDA snapshot keeps (a few KB each)
TRACE_FILE, SNAPSHOT_FILE = "trace.json", "memory_snapshot.pickle"


# ---------------------------------------------------------------------- timing


class PhaseTimer:
    """Times each step and each phase of it; each phase is also a ``record_function``
    range. CUDA: events on the current stream (GPU time, no sync until the end);
    CPU: ``time.perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, tuple]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        marks: dict[str, tuple] = {}
        self.steps.append(marks)
        start = self._now()
        yield
        marks["step"] = (start, self._now())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with record_function(name):
            start = self._now()
            yield
            self.steps[-1][name] = (start, self._now())

    def mean_ms(self, last: int) -> dict[str, float]:
        """Mean milliseconds of the step and of each phase over the ``last`` steps."""
        if self.cuda:
            torch.cuda.synchronize()
        steps = self.steps[-last:]
        return {name: statistics.mean(self._ms(*s[name]) for s in steps) for name in steps[0]}


Step = Callable[[PhaseTimer], None]


# ------------------------------------------------------------------- workloads


def _gpt_step(config: GPTConfig, preset: str, batch: int, device: torch.device,
              precision: Precision) -> Step:
    """One training step as ``fastattn train`` runs it (``train_step``, one micro-batch)
    on a fixed random batch, with the preset's learning rate and train's other defaults."""
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, TRAIN_PRESETS[preset]["lr"],
                                    DEFAULTS["weight_decay"],
                                    (DEFAULTS["beta1"], DEFAULTS["beta2"]),
                                    fused=device.type == "cuda")
    scaler = precision.scaler()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, config.vocab_size, (batch, config.block_size), generator=g)
            .to(device) for _ in range(2))

    def step(timer: PhaseTimer) -> None:
        train_step(model, optimizer, scaler, precision, lambda: (x, y),
                   grad_clip=DEFAULTS["grad_clip"], phase=timer.phase)
    return step


def _op_step(op: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
             config: GPTConfig) -> Step:
    """Forward and backward of a registered op's fastattn call; gradients of every input,
    not accumulated (an inference-only op: its forward). An option the GPT config also
    sets (GELU's ``approximate``) takes the config's value, as in the model."""
    spec = registry.get(op)
    options = {k: getattr(config, k, v) for k, v in spec.options.items()}
    inputs, dy = spec.inputs(shape, dtype, device, 0)

    def step(timer: PhaseTimer) -> None:
        with timer.phase("forward"):
            y = spec.fast(*inputs, **options)
        if "fwd+bwd" in spec.modes:
            with timer.phase("backward"):
                torch.autograd.grad(y, inputs, dy)
    return step


def ops() -> tuple[str, ...]:
    """What ``profile`` can profile: the GPT's training step and every registered op."""
    return ("gpt", *registry.names())


def _shape(op: str, config: GPTConfig, batch: int) -> dict[str, int]:
    if op != "gpt":
        return registry.get(op).model_shape(batch, config.block_size, config.n_embd,
                                            config.n_head, config.kv_heads,
                                            config.mlp_hidden or 4 * config.n_embd)
    return {"B": batch, "T": config.block_size, "L": config.n_layer, "C": config.n_embd,
            "H": config.n_head, "V": config.vocab_size}


# ------------------------------------------------------------------ validation


def _positive(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {what} integer, got {value!r}")


def _op_backends(op: str, variant: str) -> dict[str, tuple[str, ...]]:
    """The fastattn ops a run calls, and the backends each implements: the fast GPT
    runs every op family (attention, LayerNorm, GELU), the naive one none."""
    if op != "gpt":
        return {op: registry.get(op).backends}
    return {s.family: s.backends for s in registry.specs()} if variant == "fast" else {}


def _backend(backend: str | None, op: str, variant: str, device: torch.device) -> str:
    """Check that ``backend`` can run every fastattn op of the run; a description."""
    if backend is None:
        name = backends.requested_backend()
        return name or f"default ({backends.default_backend(device)} on {device.type})"
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
    used = _op_backends(op, variant)
    if not used:
        raise ValueError(f"backend {backend!r} applies to fastattn's ops, and the naive GPT "
                         "runs none of them; profile variant 'fast' to choose a backend")
    for name, supported in used.items():
        if backend not in supported:
            raise ValueError(f"backend {backend!r} does not implement {name}, which op "
                             f"{op!r} runs; backends for {name}: {supported}")
    if backend == "ext":
        from fastattn import ext
        if not ext.is_available():
            # The cached JIT build, or a build now; why one failed is what
            # backends.available reports below.
            with contextlib.suppress(Exception):
                ext.load()
    ok, why = backends.available(backend, device)
    if not ok:
        raise ValueError(f"backend {backend!r} cannot run on {device.type}: {why}")
    return backend


def _config(variant: str, preset: str, seq: int | None) -> GPTConfig:
    base = PRESETS[preset]
    vocab = base.get("vocab_size", GPTConfig.vocab_size)
    # As fastattn train does for a BPE vocabulary: round up to a multiple of 64.
    vocab = vocab if vocab <= 256 else -(-vocab // 64) * 64
    return GPTConfig.from_preset(preset, vocab_size=vocab, attention=variant,
                                 block_size=seq or base.get("block_size", 256))


# ------------------------------------------------------------------- profiling


def profile(op: str = "gpt", *, variant: str = "fast", preset: str | None = None,
            seq: int | None = None, batch: int | None = None, steps: int = DEFAULT_STEPS,
            warmup: int = DEFAULT_WARMUP, device: str | None = None, dtype: str = "auto",
            out: str | Path = DEFAULT_OUT, backend: str | None = None,
            memory_entries: int = MEMORY_ENTRIES) -> ProfileResult:
    """Profile ``warmup + steps`` steps of ``op`` (``"gpt"``: training steps of the GPT
    ``variant``; an op: its forward and backward) and write ``trace.json`` (and on CUDA
    ``memory_snapshot.pickle``) into ``out``.

    ``preset`` (default ``tiny`` on CPU, ``gpt2`` on CUDA) sets the model's shape, ``seq``
    the sequence length T (default: the preset's block_size), ``batch`` B (default: the
    batch size ``fastattn train`` uses for the preset). ``dtype``: ``auto`` is bf16
    autocast on CUDA (fp16 without bf16) and float32 on CPU; the ops run in it directly.
    ``backend`` forces a fastattn backend (``fastattn.use_backend``).
    Raises ValueError for bad arguments, naming the argument, its value and what is
    allowed."""
    _check_args(op, variant, dtype, seq, batch, steps, warmup, memory_entries)
    dev = torch.device(resolve_device(device))
    preset = preset or DEFAULT_PRESET[dev.type]
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    config = _config(variant, preset, seq)
    batch = batch or TRAIN_PRESETS[preset]["batch_size"]
    backend_name = _backend(backend, op, variant, dev)
    precision = choose_precision(dev, dtype)
    shape = _shape(op, config, batch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    with backends.use_backend(backend) if backend else contextlib.nullcontext():
        if op == "gpt":
            step = _gpt_step(config, preset, batch, dev, precision)
        else:
            step = _op_step(op, shape, precision.dtype, dev, config)
        timer = PhaseTimer(dev)
        prof, cuda_memory = _run(step, timer, steps, warmup, dev, out, memory_entries)
    trace = out / TRACE_FILE
    prof.export_chrome_trace(str(trace))
    rows, total_us, kind = rows_by_self_time(prof.key_averages(), dev, steps)
    times = timer.mean_ms(steps)
    step_ms = times.pop("step")
    result = ProfileResult(
        op=op, variant=variant if op == "gpt" else None, preset=preset, shape=shape,
        device=dev.type, dtype=str(precision.dtype).removeprefix("torch."),
        backend=backend_name, steps=steps, warmup=warmup, time_kind=kind, rows=rows,
        profiled_ms=total_us / 1e3, step_ms=step_ms, phase_ms=times,
        phase_share={k: 100 * v / step_ms for k, v in times.items()}, peak_memory=0,
        memory_note="", trace=trace)
    add_memory(result, cuda_memory)
    return result


def _check_args(op: str, variant: str, dtype: str, seq: int | None, batch: int | None,
                steps: int, warmup: int, memory_entries: int) -> None:
    if op not in ops():
        raise ValueError(f"op must be one of {ops()}, got {op!r}")
    if variant not in ATTENTION:
        raise ValueError(f"variant must be one of {ATTENTION}, got {variant!r}")
    if op != "gpt" and variant != "fast":
        raise ValueError(f"variant {variant!r} applies to op 'gpt' only (an op profile "
                         f"runs fastattn's kernels), got op {op!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for name, value in (("seq", seq), ("batch", batch)):
        if value is not None:
            _positive(name, value)
    _positive("steps", steps)
    _positive("warmup", warmup, allow_zero=True)
    _positive("memory_entries", memory_entries)


def _run(step: Step, timer: PhaseTimer, steps: int, warmup: int, device: torch.device,
         out: Path, memory_entries: int) -> tuple[torch.profiler.profile, dict | None]:
    """Run the steps under the profiler, and on CUDA under the allocator's memory
    history. Returns the profiler and, on CUDA, ``peak`` and ``before`` (bytes allocated
    at most and before the first step) and the ``snapshot`` path."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    memory = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory = {"before": torch.cuda.memory_allocated(device),
                  "snapshot": out / SNAPSHOT_FILE}
        torch.cuda.memory._record_memory_history(max_entries=memory_entries)
    try:
        # CUDA memory is in the snapshot; profiler memory events would only bloat the trace.
        with torch.profiler.profile(activities=activities, schedule=schedule,
                                    profile_memory=not cuda) as prof:
            for _ in range(warmup + steps):
                with timer.step():
                    step(timer)
                prof.step()
        if cuda:
            torch.cuda.memory._dump_snapshot(str(memory["snapshot"]))
            memory["peak"] = torch.cuda.max_memory_allocated(device)
    finally:
        if cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
    return prof, memory


# -------------------------------------------------------------------------- CLI


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="where a training step's time and memory go (torch.profiler)",
        description="Run a few GPT training steps (or the forward and backward of one op) "
                    "under torch.profiler; print the share of the step per phase "
                    "(forward, backward, optimizer) and the top ops/kernels by self time, "
                    "write a Chrome trace and, on CUDA, a memory snapshot for "
                    f"{MEMORY_VIZ}.")
    p.add_argument("--op", choices=ops(), default="gpt",
                   help="gpt: training steps; an op: its forward + backward (default gpt)")
    p.add_argument("--variant", choices=ATTENTION, default="fast",
                   help="the GPT's blocks: fastattn's (fast) or textbook (naive); "
                        "--op gpt only (default fast)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model shape (default: tiny on cpu, gpt2 on cuda); for an op, the "
                        "shapes that preset's GPT gives it")
    p.add_argument("--seq", type=int_at_least(1), metavar="T",
                   help="sequence length (default: the preset's block_size)")
    p.add_argument("--batch", type=int_at_least(1), metavar="B",
                   help="batch size (default: fastattn train's for the preset, 16)")
    p.add_argument("--steps", type=int_at_least(1), default=DEFAULT_STEPS, metavar="N",
                   help=f"profiled steps (default {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int_at_least(0), default=DEFAULT_WARMUP, metavar="N",
                   help=f"steps run before them, not counted (default {DEFAULT_WARMUP})")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bf16 autocast on cuda (fp16 without bf16), float32 on cpu")
    p.add_argument("--backend", choices=backends.BACKENDS,
                   help="force a fastattn backend (default: triton on cuda, torch on cpu); "
                        "ext JIT-builds the C++ extension if needed")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for trace.json and the memory snapshot (default "
                        f"./{DEFAULT_OUT})")
    p.add_argument("--top", type=int_at_least(1), default=DEFAULT_TOP, metavar="N",
                   help=f"rows of the table (default {DEFAULT_TOP})")
    p.add_argument("--memory-entries", type=int_at_least(1), default=MEMORY_ENTRIES,
                   metavar="N",
                   help=f"CUDA: allocation events the snapshot keeps (default "
                        f"{MEMORY_ENTRIES:,})")
    p.set_defaults(func=_run_profile, parser=p)


def _run_profile(args: argparse.Namespace) -> int:
    try:
        result = profile(args.op, variant=args.variant, preset=args.preset, seq=args.seq,
                         batch=args.batch, steps=args.steps, warmup=args.warmup,
                         device=args.device, dtype=args.dtype, out=args.out,
                         backend=args.backend, memory_entries=args.memory_entries)
    except ValueError as e:
        args.parser.error(str(e))
    print(format_report(result, args.top))
    return 0


__all__ = ["PhaseTimer", "add_profile_parser", "ops", "profile"]
