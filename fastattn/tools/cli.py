"""The ``fastattn`` command line (also ``python -m fastattn``).

    fastattn bench [--op flash_attention|...|gpt] [--device cpu|cuda] [--seq 1024,2048] [--save]
    fastattn bench --sweep [--op flash_attention]
    fastattn info
    fastattn train / fastattn sample
    fastattn profile [--op gpt|flash_attention|layer_norm|...]
    fastattn check-kernels [--arch 80,90] [--op flash_attention,...] [--json]

Each subcommand is an ``add_<name>_parser(subparsers)`` function, listed in ``COMMANDS``,
that registers its arguments and sets ``func`` (called with the parsed arguments,
returns the exit status) and ``parser`` (for errors); ``main`` dispatches. The commands
that measure live in ``fastattn.tools`` and take their ops from the registry
(``fastattn.ops.registry``), so a new op appears in ``--op`` without editing this file.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from fastattn.tools.common import positive_int, positive_ints

_HELP_SUFFIX = "Run `fastattn <command> --help` for the options of a command."


def _modes(text: str) -> list[str]:
    from fastattn.ops.registry import MODES
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


# ------------------------------------------------------------------------- bench


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from fastattn.ops import registry
    p = sub.add_parser(
        "bench", help="compare fastattn with naive attention and torch on this machine",
        description="Time, TFLOP/s or GB/s and extra peak memory of an op's naive "
                    "baseline, torch's built-in and every fastattn backend that runs on "
                    "the device, after checking each against the baseline. "
                    "flash_attention's defaults on CPU: B=1, H=8, D=64, float32, causal, "
                    "T=1024,2048,4096; on CUDA: bfloat16, H=16, D=128, T=1024..16384 with "
                    "B·T = 16384.")
    p.add_argument("--op", choices=[*registry.names(), "gpt", "overhead", "decode"],
                   default="flash_attention",
                   help="op to benchmark; gpt: naive vs fast GPT training tokens/s (a "
                        "4-layer width-256 model on cpu, GPT-2 small on cuda; --seq, "
                        "--batch, --heads, --dtype, --quick, --save apply; "
                        "python benchmarks/bench_gpt.py has every knob); overhead: host "
                        "time per call vs torch on tiny tensors, fwd and fwd+bwd; decode: "
                        "GPT.generate tokens/s, fast vs naive, with and without compile "
                        "(overhead and decode take --device, --quick, --save)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seq", "--sizes", type=positive_ints, metavar="N[,N...]",
                   help="the sizes swept, along the op's size axis (" + ", ".join(
                       f"{s.name}: {s.x}" for s in registry.specs()) + "; default: the "
                   "op's sizes for the device)")
    p.add_argument("--batch", type=positive_int, help="batch size B, or rows M of a "
                   "row-wise op (attention default: 1 on cpu, 16384 // T on cuda)")
    p.add_argument("--heads", type=positive_int, help="heads (attention; default: 8 cpu, "
                   "16 cuda)")
    p.add_argument("--head-dim", type=positive_int, help="head dim (attention; default: 64 "
                   "cpu, 128 cuda)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal mask, for ops that take one (default: on)")
    p.add_argument("--mode", type=_modes, default=None, metavar="MODES",
                   help="fwd and/or fwd+bwd, comma-separated (default: every mode the op has)")
    p.add_argument("--sweep", action="store_true",
                   help="cross the settings instead of one run: head dim (if the op's "
                        "shape has one; cpu: D 32,64,128, cuda: 64,128,256) x causal (if "
                        "the op takes it) x dtype (cpu: float32/bfloat16; cuda: "
                        "bfloat16/float16, and float32 for bandwidth-bound ops) at one size "
                        "(the second largest default: flash_attention T=2048 on cpu, 8192 "
                        "on cuda). A setting given (--head-dim, --dtype, --no-causal, "
                        "--seq) is held fixed instead; --save writes <op>_sweep.json/png")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="DIR",
                   help="write <op>.json and <op>.png into DIR (default: "
                        "benchmarks/results/<device>/)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats and a small peak matmul: a smoke test, not a measurement")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement")
    p.add_argument("--malloc", choices=["retain", "default"], default="retain",
                   help="CPU timing allocator: 'retain' keeps freed memory in glibc's heap "
                        "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 1 TiB, as DESIGN.md "
                        "asks); 'default' leaves glibc as it is, so every large output is "
                        "page-faulted again on each call (default: retain)")
    p.add_argument("--ext", dest="load_ext", action="store_true",
                   help="JIT-build (or load the cached build of) the C++ extension first, "
                        "so the ext backend is measured too (ops that have one)")
    p.set_defaults(func=_run_bench, parser=p)


def _run_gpt_bench(args: argparse.Namespace) -> int:
    from fastattn.tools import bench_gpt

    not_for_gpt = [flag for flag, given in (("--head-dim", args.head_dim is not None),
                                            ("--no-causal", not args.causal),
                                            ("--mode", args.mode is not None),
                                            ("--ext", args.load_ext),
                                            ("--malloc", args.malloc != "retain"),
                                            ("--sweep", args.sweep)) if given]
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        args.parser.error("--device cuda: torch sees no CUDA device here")
    if not_for_gpt:
        args.parser.error(f"{', '.join(not_for_gpt)} do(es) not apply to --op gpt (it times "
                          "causal training steps: forward, backward and AdamW)")
    return bench_gpt.bench_and_report(
        " ".join(["fastattn", *args.argv]), seq_lens=args.seq, device=args.device,
        dtype=args.dtype, quick=args.quick, memory=args.memory, save_dir=args.save,
        n_head=args.heads, batch=args.batch)


def _run_host_bench(args: argparse.Namespace) -> int:
    """``--op overhead`` / ``--op decode`` (fastattn.tools.bench.overhead / .decode)."""
    from fastattn.tools.bench import decode, overhead

    given = [flag for flag, on in (("--seq", args.seq is not None),
                                   ("--batch", args.batch is not None),
                                   ("--heads", args.heads is not None),
                                   ("--head-dim", args.head_dim is not None),
                                   ("--dtype", args.dtype is not None),
                                   ("--no-causal", not args.causal),
                                   ("--mode", args.mode is not None),
                                   ("--ext", args.load_ext),
                                   ("--malloc", args.malloc != "retain"),
                                   ("--sweep", args.sweep)) if on]
    if given:
        args.parser.error(f"{', '.join(given)} do(es) not apply to --op {args.op} (it takes "
                          "--device, --quick and --save)")
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        args.parser.error("--device cuda: torch sees no CUDA device here")
    module = overhead if args.op == "overhead" else decode
    return module.bench_and_report(" ".join(["fastattn", *args.argv]), args.device,
                                   args.quick, args.save)


def _save(args: argparse.Namespace, doc: dict) -> None:
    """``--save [DIR]``: write the results document and its plot, say where."""
    from fastattn.tools.bench.results import save

    if args.save is not None:
        json_path, png_path, note = save(doc, args.save or None)
        print(f"\nsaved {json_path}" + (f" and {png_path}" if png_path else f" ({note})"))


def _run_sweep(args: argparse.Namespace, cfg) -> int:
    import time

    from fastattn.tools.bench import report
    from fastattn.tools.bench.sweep import run_sweep, sweep_axes
    from fastattn.tools.common import default_device

    cfg.resolve()                                   # a bad setting fails before any run
    device = cfg.device or default_device()
    fixed = {"head_dim": args.head_dim is not None, "dtype": args.dtype is not None,
             "causal": not args.causal}
    axes = {a: v for a, v in sweep_axes(cfg.op, device).items() if not fixed.get(a)}
    if not axes:
        args.parser.error("--sweep has nothing left to cross: every swept setting is fixed")
    start = time.perf_counter()
    print(f"fastattn bench --sweep: {cfg.op} on {device}, crossing "
          + "; ".join(f"{a} {v}" for a, v in axes.items()) + "; progress on stderr",
          flush=True)
    point = lambda doc: ", ".join(f"{a}={v}" for a, v in doc["sweep_point"].items())  # noqa: E731
    doc = run_sweep(cfg, axes, on_run=lambda d: print(
        f"  done: {point(d)}", file=sys.stderr, flush=True))
    doc["provenance"]["command"] = " ".join(["fastattn", *args.argv])
    print()
    print(report.describe_sweep(doc))
    print()
    print(report.format_sweep_table(doc))
    _save(args, doc)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    wrong = any(r["status"] == "wrong" for run in doc["runs"] for r in run["rows"])
    return 1 if wrong else 0


def _run_bench(args: argparse.Namespace) -> int:
    import time

    from fastattn.tools.bench import report
    from fastattn.tools.bench.config import Config
    from fastattn.tools.bench.provenance import cpu_count, load_average
    from fastattn.tools.bench.run import run

    if args.op == "gpt":
        return _run_gpt_bench(args)
    if args.op in ("overhead", "decode"):
        return _run_host_bench(args)

    cfg = Config(op=args.op, device=args.device, dtype=args.dtype, sizes=args.seq,
                 batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                 causal=args.causal, modes=args.mode, quick=args.quick,
                 memory=args.memory, heap_retention=args.malloc == "retain",
                 load_ext=args.load_ext)
    try:
        if args.sweep:
            return _run_sweep(args, cfg)
        cfg = cfg.resolve()
    except ValueError as e:
        args.parser.error(str(e))
    start = time.perf_counter()
    print(f"fastattn bench: {cfg.op} on {cfg.device} ({cfg.dtype}), {cfg.spec.x} = "
          f"{', '.join(map(str, cfg.sizes))}, {' and '.join(cfg.modes)}; progress on "
          "stderr", flush=True)
    load = load_average()
    if cfg.device == "cpu" and load and load[0] > cpu_count() / 2:
        print(f"note: the machine is busy (load average {load[0]} on {cpu_count()} "
              "cores): CPU timings will be noisy", flush=True)
    results = run(cfg)
    results["provenance"]["command"] = " ".join(["fastattn", *args.argv])
    print()
    print(report.describe(results))
    print()
    print(report.format_table(results))
    print()
    print("\n".join(report.summary(results)))
    _save(args, results)
    phases = ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in results["durations_s"].items())
    print(f"\ndone in {time.perf_counter() - start:.1f} s ({phases})")
    return 1 if any(r["status"] == "wrong" for r in results["rows"]) else 0


# -------------------------------------------------------------------------- info


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, devices and which backends can run where",
                       description="Versions (python, torch, triton, CUDA), devices, and "
                                   "for each backend whether it runs on each device and "
                                   "why not.")
    p.set_defaults(func=_run_info, parser=p)


def _run_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import fastattn
    from fastattn import backends
    from fastattn.ops import registry
    from fastattn.tools.bench.provenance import device_name

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastattn {fastattn.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__}")
    print(f"triton   {triton_version}")
    print(f"CUDA     {torch.version.cuda or 'none (CPU-only torch build)'}")
    print("\ndevices:")
    print(f"  cpu     {device_name('cpu')}, {torch.get_num_threads()} threads")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}  {torch.cuda.get_device_name(i)}")
        devices.append(torch.device("cuda"))
    else:
        print("  cuda    none available")
    print("\nops (fastattn.ops.registry) and the backends each implements:")
    for spec in registry.specs():
        print(f"  {spec.name:<20} {', '.join(spec.backends)}")
    print("backends (default: triton on cuda, torch on cpu):")
    for name in backends.BACKENDS:
        for device in devices:
            ok, why = backends.available(name, device)
            print(f"  {name:<7} {device.type:<5} {'yes' if ok else 'no ':<4} {why}")
        if not torch.cuda.is_available():
            print(f"  {name:<7} {'cuda':<5} {'no ':<4} no CUDA device")
    return 0


# -------------------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_bench_parser,
                                                                 add_info_parser]


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from fastattn.models.train import train_main
    from fastattn.models.train_config import add_train_arguments
    p = sub.add_parser("train", help="train a GPT on fastattn's kernels",
                       description="Train a GPT (fastattn.models.gpt) on a text file or "
                                   "folder; by default on the Python standard library's "
                                   "sources with a byte-level tokenizer.")
    add_train_arguments(p)
    p.set_defaults(func=train_main, parser=p)


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    from fastattn.models.sample import add_sample_arguments, sample_main
    p = sub.add_parser("sample", help="generate text from a training checkpoint",
                       description="Generate from a checkpoint written by fastattn train "
                                   "(KV-cache decoding).")
    add_sample_arguments(p)
    p.set_defaults(func=sample_main, parser=p)


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    from fastattn.tools.profile import add_profile_parser as add
    add(sub)


def add_check_kernels_parser(sub: argparse._SubParsersAction) -> None:
    from fastattn.tools.check_kernels import add_parser
    add_parser(sub)


COMMANDS += [add_train_parser, add_sample_parser, add_profile_parser,
             add_check_kernels_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn", epilog=_HELP_SUFFIX,
        description="fastattn: readable Triton kernels for causal flash-attention, "
                    "LayerNorm and GELU.")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return args.func(args)
