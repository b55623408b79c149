"""``fastattn profile``: where the time and the memory of a training step go.

    fastattn profile                                  # GPT training steps (tiny on CPU)
    fastattn profile --variant naive --seq 1024       # the textbook GPT, to compare
    fastattn profile --op attention --backend torch   # forward + backward of one op

It runs ``--warmup`` steps, then ``--steps`` profiled ones, under ``torch.profiler``
(``schedule(warmup=..., active=...)``, so start-up work and the profiler's own start
stay out of the numbers). A GPT step is ``fastattn.models.optim.train_step``:
forward and loss under autocast (bf16 on CUDA), backward, gradient clipping, the AdamW
step of ``configure_optimizer``, ``zero_grad``, on one fixed batch of random tokens
(data loading is not profiled). An op step is the forward and backward of
``fastattn.flash_attention`` / ``layer_norm`` / ``bias_gelu`` on the shapes the
preset's GPT gives it: attention on (B, n_head, T, head_dim), LayerNorm on
(B, T, n_embd), bias-GELU on (B, T, mlp_hidden).

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
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

import fastattn
from fastattn import backends
from fastattn.models.gpt import ATTENTION, GPT, PRESETS, GPTConfig
from fastattn.models.optim import Precision, choose_precision, configure_optimizer, train_step
from fastattn.models.train_config import DEFAULTS, TRAIN_PRESETS

OPS = ("gpt", "attention", "layer_norm", "bias_gelu")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_PRESET = {"cpu": "tiny", "cuda": "gpt2"}
DEFAULT_OUT = "fastattn-profile"
DEFAULT_STEPS, DEFAULT_WARMUP, DEFAULT_TOP = 3, 1, 15
MEMORY_ENTRIES = 100_000           # allocation events the CUDA snapshot keeps (a few KB each)
TRACE_FILE, SNAPSHOT_FILE = "trace.json", "memory_snapshot.pickle"
MEMORY_VIZ, PERFETTO = "https://pytorch.org/memory_viz", "https://ui.perfetto.dev"


@dataclass
class Row:
    """One op (CPU) or kernel (CUDA) of the table, summed over the profiled steps."""
    name: str
    calls: int
    self_ms: float
    share: float                   # % of the profiled time
    ms_per_step: float


@dataclass
class ProfileResult:
    """What ``profile`` measured. Times in milliseconds, memory in bytes."""
    op: str
    variant: str | None            # "fast" / "naive" for the GPT, None for an op
    preset: str
    shape: dict[str, int]
    device: str
    dtype: str
    backend: str                   # the forced backend, or "default (<name> on <device>)"
    steps: int
    warmup: int
    time_kind: str                 # "self CPU time" (ops) or "self CUDA time" (kernels)
    rows: list[Row]                # every op/kernel with self time > 0, longest first
    profiled_ms: float             # the sum of all self times
    step_ms: float                 # mean step time (timers, under the profiler)
    phase_ms: dict[str, float]     # mean per step: forward, backward[, optimizer]
    phase_share: dict[str, float]  # % of step_ms
    peak_memory: int                # bytes; see memory_note
    memory_note: str
    trace: Path
    snapshot: Path | None = None
    notes: list[str] = field(default_factory=list)


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


def _op_inputs(op: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
               approximate: str) -> tuple[Callable, tuple[torch.Tensor, ...], torch.Tensor]:
    """The op as a function of its inputs, the inputs (requiring grad) and a gradient
    for its output, random, on ``shape``."""
    g = torch.Generator(device).manual_seed(0)

    def randn(*size: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(size, generator=g, device=device) * scale).to(dtype)
        return t.requires_grad_(grad)

    b, t = shape["B"], shape["T"]
    if op == "attention":
        h, hkv, d = shape["H"], shape["H_kv"], shape["D"]
        inputs = (randn(b, h, t, d), randn(b, hkv, t, d), randn(b, hkv, t, d))
        dy = randn(b, h, t, d, grad=False)

        def fn(q, k, v):
            return fastattn.flash_attention(q, k, v, causal=True)
    elif op == "layer_norm":
        c = shape["C"]
        weight = (1 + randn(c, scale=0.1, grad=False)).requires_grad_()
        inputs, dy = (randn(b, t, c), weight, randn(c, scale=0.1)), randn(b, t, c, grad=False)

        def fn(x, w, bias):
            return fastattn.layer_norm(x, (c,), w, bias)
    else:
        n = shape["N"]
        inputs, dy = (randn(b, t, n), randn(n, scale=0.1)), randn(b, t, n, grad=False)

        def fn(x, bias):
            return fastattn.bias_gelu(x, bias, approximate)
    return fn, inputs, dy


def _op_step(op: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
             approximate: str) -> Step:
    """Forward and backward of one op; gradients of every input, not accumulated."""
    fn, inputs, dy = _op_inputs(op, shape, dtype, device, approximate)

    def step(timer: PhaseTimer) -> None:
        with timer.phase("forward"):
            y = fn(*inputs)
        with timer.phase("backward"):
            torch.autograd.grad(y, inputs, dy)
    return step


def _shape(op: str, config: GPTConfig, batch: int) -> dict[str, int]:
    b, t = batch, config.block_size
    if op == "attention":
        return {"B": b, "H": config.n_head, "H_kv": config.kv_heads, "T": t,
                "D": config.head_dim}
    if op == "layer_norm":
        return {"B": b, "T": t, "C": config.n_embd}
    if op == "bias_gelu":
        return {"B": b, "T": t, "N": config.mlp_hidden or 4 * config.n_embd}
    return {"B": b, "T": t, "L": config.n_layer, "C": config.n_embd, "H": config.n_head,
            "V": config.vocab_size}


# ------------------------------------------------------------------ validation


def _positive(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {what} integer, got {value!r}")


def _device(device: str | None) -> torch.device:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' is not available (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda})")
    return torch.device(name)


def _op_backends(op: str, variant: str) -> dict[str, tuple[str, ...]]:
    """The fastattn ops a run calls, and the backends each implements."""
    from fastattn.ops import flash_attention, gelu, layer_norm
    table = {"attention": flash_attention.BACKENDS, "layer_norm": layer_norm.BACKENDS,
             "bias_gelu": gelu.BACKENDS}
    if op != "gpt":
        return {op: table[op]}
    return table if variant == "fast" else {}


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
    dev = _device(device)
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
            step = _op_step(op, shape, precision.dtype, dev, config.approximate)
        timer = PhaseTimer(dev)
        prof, cuda_memory = _run(step, timer, steps, warmup, dev, out, memory_entries)
    trace = out / TRACE_FILE
    prof.export_chrome_trace(str(trace))
    rows, total_us, kind = _table(prof.key_averages(), dev, steps)
    times = timer.mean_ms(steps)
    step_ms = times.pop("step")
    result = ProfileResult(
        op=op, variant=variant if op == "gpt" else None, preset=preset, shape=shape,
        device=dev.type, dtype=str(precision.dtype).removeprefix("torch."),
        backend=backend_name, steps=steps, warmup=warmup, time_kind=kind, rows=rows,
        profiled_ms=total_us / 1e3, step_ms=step_ms, phase_ms=times,
        phase_share={k: 100 * v / step_ms for k, v in times.items()}, peak_memory=0,
        memory_note="", trace=trace)
    _add_memory(result, cuda_memory)
    return result


def _check_args(op: str, variant: str, dtype: str, seq: int | None, batch: int | None,
                steps: int, warmup: int, memory_entries: int) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
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


def _add_memory(result: ProfileResult, cuda_memory: dict | None) -> None:
    """Peak memory, what it counts, the snapshot, and on CUDA how busy the GPU was."""
    r = result
    if cuda_memory is None:
        r.peak_memory = _cpu_peak(r.trace)
        r.memory_note = ("allocated during the profiled steps (profiler memory events: "
                         "what was live before them, such as parameters, optimizer state "
                         "and inputs, is not counted)")
        r.notes.append("memory snapshot: CUDA-only (torch.cuda.memory._record_memory_history)")
        return
    r.peak_memory, r.snapshot = cuda_memory["peak"], cuda_memory["snapshot"]
    r.memory_note = (f"allocated (torch.cuda.max_memory_allocated), "
                     f"{_mib(cuda_memory['before'])} of it before the first step "
                     "(parameters, inputs)")
    busy = r.profiled_ms / r.steps / r.step_ms if r.step_ms > 0 else 0.0
    r.notes.append(f"kernels kept the GPU busy {100 * busy:.0f} % of the step time (the "
                   "rest: waiting for the CPU to launch work)")


def _self_device_us(event) -> float:
    # torch >= 2.4 says "device", older versions "cuda".
    value = getattr(event, "self_device_time_total", None)
    return value if value is not None else getattr(event, "self_cuda_time_total", 0)


def _table(events, device: torch.device, steps: int) -> tuple[list[Row], float, str]:
    """Rows by self time: CPU ops on CPU, GPU kernels on CUDA (the GPU's user-annotation
    copies of the record_function ranges are left out, as torch's own table does)."""
    if device.type == "cuda":
        kind = "self CUDA time"
        timed = [(e, _self_device_us(e)) for e in events if e.device_type == DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)]
    else:
        kind = "self CPU time"
        timed = [(e, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    timed = [(e, us) for e, us in timed if us > 0]
    total = sum(us for _, us in timed)
    timed.sort(key=lambda pair: (-pair[1], pair[0].key))
    rows = [Row(e.key, e.count, us / 1e3, 100 * us / total, us / 1e3 / steps)
            for e, us in timed]
    return rows, total, kind


def _cpu_peak(trace: Path) -> int:
    """Peak "Total Allocated" of the profiler's CPU memory events in a Chrome trace."""
    events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


# -------------------------------------------------------------------- reporting


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(result: ProfileResult) -> str:
    """One line: what ran, on what."""
    r = result
    what = f"GPT ({r.variant})" if r.op == "gpt" else r.op
    shape = ", ".join(f"{k}={v}" for k, v in r.shape.items())
    return (f"{what}, preset {r.preset}: {shape}; {r.device} {r.dtype}, backend "
            f"{r.backend}; {r.steps} profiled steps after {r.warmup} warm-up")


def format_report(result: ProfileResult, top: int = DEFAULT_TOP) -> str:
    """The phase shares, the top ``top`` rows of the table, memory and the files."""
    r = result
    lines = [describe(r), "",
             f"step time {r.step_ms:.2f} ms (mean of {r.steps} steps, under the profiler)"]
    for name, ms in r.phase_ms.items():
        lines.append(f"  {name:<10} {r.phase_share[name]:5.1f} %  {ms:9.2f} ms")
    rest = r.step_ms - sum(r.phase_ms.values())
    lines.append(f"  {'other':<10} {100 * rest / r.step_ms:5.1f} %  {rest:9.2f} ms")
    lines += ["", (f"top {min(top, len(r.rows))} of {len(r.rows)} by {r.time_kind} "
                   f"({r.profiled_ms:.2f} ms over {r.steps} steps):")]
    width = max([len("name")] + [len(row.name) for row in r.rows[:top]])
    width = min(width, 60)
    lines.append(f"{'name':<{width}}  {'calls':>6}  {'self ms':>9}  {'%':>6}  {'ms/step':>9}")
    for row in r.rows[:top]:
        name = row.name if len(row.name) <= width else row.name[:width - 1] + "…"
        lines.append(f"{name:<{width}}  {row.calls:>6}  {row.self_ms:>9.3f}  "
                     f"{row.share:>6.1f}  {row.ms_per_step:>9.3f}")
    ranges = [row.name for row in r.rows[:top] if row.name in (*r.phase_ms, "ProfilerStep*")]
    if ranges:
        lines.append(f"({', '.join(ranges)}: time in that range outside any op: Python, "
                     "the profiler)")
    lines.append("")
    lines.append(f"peak memory {_mib(r.peak_memory)} {r.memory_note}")
    lines += r.notes
    lines.append(f"trace: {r.trace} (chrome://tracing or {PERFETTO})")
    if r.snapshot is not None:
        lines.append(f"memory snapshot: {r.snapshot} (drop it into {MEMORY_VIZ})")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="where a training step's time and memory go (torch.profiler)",
        description="Run a few GPT training steps (or the forward and backward of one op) "
                    "under torch.profiler; print the share of the step per phase "
                    "(forward, backward, optimizer) and the top ops/kernels by self time, "
                    "write a Chrome trace and, on CUDA, a memory snapshot for "
                    f"{MEMORY_VIZ}.")
    p.add_argument("--op", choices=OPS, default="gpt",
                   help="gpt: training steps; an op: its forward + backward (default gpt)")
    p.add_argument("--variant", choices=ATTENTION, default="fast",
                   help="the GPT's blocks: fastattn's (fast) or textbook (naive); "
                        "--op gpt only (default fast)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model shape (default: tiny on cpu, gpt2 on cuda); for an op, the "
                        "shapes that preset's GPT gives it")
    p.add_argument("--seq", type=_int_at_least(1), metavar="T",
                   help="sequence length (default: the preset's block_size)")
    p.add_argument("--batch", type=_int_at_least(1), metavar="B",
                   help="batch size (default: fastattn train's for the preset, 16)")
    p.add_argument("--steps", type=_int_at_least(1), default=DEFAULT_STEPS, metavar="N",
                   help=f"profiled steps (default {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=_int_at_least(0), default=DEFAULT_WARMUP, metavar="N",
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
    p.add_argument("--top", type=_int_at_least(1), default=DEFAULT_TOP, metavar="N",
                   help=f"rows of the table (default {DEFAULT_TOP})")
    p.add_argument("--memory-entries", type=_int_at_least(1), default=MEMORY_ENTRIES,
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


__all__ = ["OPS", "PhaseTimer", "ProfileResult", "Row", "add_profile_parser", "describe",
           "format_report", "profile"]
