"""``fastattn check-kernels``: compile every Triton kernel for real GPUs, without one.

    fastattn check-kernels                        # every op, dtype, config on sm_80, sm_90
    fastattn check-kernels --op flash_attention --dtype bfloat16 --head-dim 128 --arch 90
    fastattn check-kernels --configs first --json # the FASTATTN_AUTOTUNE=0 configs only

How: each op's launchers (``OpSpec.launch_kernels``) run on empty CPU tensors once per
arch, ``launch`` intercepted (the attention launchers take TMA where that GPU would,
``arch_paths``: the sm_90 rows are an aligned launch's TMA kernels). Each recorded
launch goes to the kernel's ``warmup``, which specialises the arguments as a launch does
and compiles for the arch a stub driver reports (``_TargetDriver``), on no device. An
autotuned kernel is compiled with each config; the first, marked ``*``, is the one
``FASTATTN_AUTOTUNE=0`` launches.

Reported per kernel, dtype, size, config and arch: shared memory (Triton's dynamic plus
the cubin's static) against the most one block may opt in to (``SMEM_LIMIT``); registers
and spill bytes per thread (``cuobjdump -res-usage`` REG and STACK: Triton kernels keep
no local arrays); matmuls (``wgmma`` on sm_90 needs 64-row tiles per warpgroup, else
``mma.sync``; fp32 ``ieee`` dots: none) and TMA copies (``cp.async.bulk.tensor``): PTX.

Problems (exit status 1): a launch shape with no config that fits shared memory, a first
config that does not fit (a launch would fail) or spills on sm_90 in fp16/bf16, an sm_90
fp16/bf16 first config of the attention matmul kernels at ``HOPPER_SIZES`` without wgmma
or TMA (of the plain kernels), a kernel that does not compile. D64+16: D in two pieces.

Workers compile in parallel, without ``TRITON_INTERPRET`` (fixed at Triton's import; the
tests set it) and ``FASTATTN_AUTOTUNE`` (it hides all but the first config). Results are
cached on disk, keyed by the Triton version, the kernel's source hash (``JITFunction.
cache_key``, with the jit functions it calls), the arguments, the config and the arch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from fastattn.ops import registry
from fastattn.tools.common import positive_int, positive_ints, render_table

# Shared memory one block may opt in to, per compute capability (CUDA C Programming Guide)
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# The ops to compile: every registry entry that can launch its kernels (one per family).
OPS = tuple(spec.name for spec in registry.specs() if spec.launch_kernels is not None)
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = registry.get("flash_attention").launch_sizes
WIDTHS = registry.ROWWISE_LAUNCH_SIZES
NO_SPILL_ARCH, NO_SPILL_DTYPES = 90, ("float16", "bfloat16")
HOPPER_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
HOPPER_SIZES = tuple(f"D={d}" for d in (64, 80, 96, 128, 192, 256))  # 80, 96, 192: split
_VARIANT = re.compile(r"(ATOMIC_DQ|SOFTCAP)=True")


@dataclass(frozen=True)
class Case:
    """One launch shape of one op: ``size`` is the head dim (attention) or the width."""
    op: str
    dtype: str
    size: int
    causal: bool = True

    @property
    def label(self) -> str:
        return f"{registry.get(self.op).launch_dim}={self.size}"

    def launch(self) -> None:
        """Run the op's launchers for this shape (``OpSpec.launch_kernels``)."""
        import torch

        spec = registry.get(self.op)
        options = {k: self.causal if k == "causal" else v for k, v in spec.options.items()}
        spec.launch_kernels(self.size, getattr(torch, self.dtype), **options)


def cases(ops: Sequence[str], dtypes: Sequence[str], head_dims: Sequence[int],
          widths: Sequence[int], causal: bool = True) -> list[Case]:
    """Every (op, dtype, size) launch shape to compile: ``head_dims`` for ops whose size
    is a head dim ("D"), ``widths`` for the others."""
    return [Case(op, dtype, size, causal) for op in ops for dtype in dtypes
            for size in (head_dims if registry.get(op).launch_dim == "D" else widths)]


# ----------------------------------------------------------------- the parent process


def check(todo: Sequence[Case], archs: Sequence[int], all_configs: bool | int = True,
          jobs: int | None = None, cache_dir: Path | None = None) -> list[dict]:
    """Compile every kernel launched for ``todo`` on each of ``archs``: a row per (case,
    kernel, config, arch), in order. ``all_configs`` False: each autotuned kernel's first
    config only, an int n: its first n. ``cache_dir=None`` disables the cache."""
    jobs = jobs or len(os.sched_getaffinity(0))
    spec = {"cases": [asdict(c) for c in todo], "archs": list(archs),
            "all_configs": all_configs, "cache_dir": cache_dir and str(cache_dir)}
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTATTN_AUTOTUNE")}
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp, f"rows{i}.json") for i in range(jobs)]
        # A worker's stdout goes to stderr (fd 2), so that whatever the compiler prints
        # (Triton prints the PTX when ptxas fails) stays out of --json output.
        procs = [subprocess.Popen(
            [sys.executable, "-m", __name__, "--worker",
             json.dumps({**spec, "claims": tmp, "out": str(out)})], env=env, stdout=2)
            for out in outs]
        failed = sum(p.wait() != 0 for p in procs)
        if failed:
            raise RuntimeError(f"{failed} of {jobs} compile workers failed (their error "
                               "is printed above)")
        rows = [row for out in outs for row in json.loads(out.read_text())]
    return sorted(rows, key=lambda row: row["job"])


def _where(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']} {row['size']} on sm_{row['arch']}"


def unfit_shapes(rows: Sequence[dict]) -> list[str]:
    """Launch shapes for which no compiled config fits shared memory."""
    fitting: dict[tuple, bool] = {}
    for row in rows:
        shape = (row["kernel"], row["dtype"], row["size"], row["causal"], row["arch"])
        fitting[shape] = fitting.get(shape, False) or row.get("fits", False)
    return [f"{kernel} {dtype} {size} on sm_{arch}: no config fits shared memory"
            for (kernel, dtype, size, _, arch), ok in fitting.items() if not ok]


def unfit_defaults(rows: Sequence[dict]) -> list[str]:
    """First configs (the FASTATTN_AUTOTUNE=0 ones) over the shared-memory limit."""
    return [f"{_where(r)}: first config {r['config']} needs {r['smem']:,} B of shared "
            f"memory, sm_{r['arch']} allows {r['smem_limit']:,}"
            for r in rows if r["default"] and "error" not in r and not r["fits"]]


def spilling_defaults(rows: Sequence[dict]) -> list[str]:
    """First configs that spill registers on sm_90 in fp16/bf16."""
    return [f"{_where(r)}: first config {r['config']} spills {r['spill']} B per thread"
            for r in rows if r["default"] and r["arch"] == NO_SPILL_ARCH
            and r["dtype"] in NO_SPILL_DTYPES and r.get("spill")]


def slow_defaults(rows: Sequence[dict]) -> list[str]:
    """sm_90 fp16/bf16 first configs of HOPPER_KERNELS at HOPPER_SIZES lacking wgmma/TMA
    (plain ones: the variants and the atomic-dQ backward are held to no spill only)."""
    return [f"{_where(r)}: first config {r['config']} runs {r['mma']}"
            f"{'' if r['tma'] else ', no TMA'}" for r in rows
            if r["default"] and r["arch"] == NO_SPILL_ARCH and "error" not in r
            and r["dtype"] in NO_SPILL_DTYPES and r["kernel"] in HOPPER_KERNELS
            and r["size"] in HOPPER_SIZES and not _VARIANT.search(r.get("constexprs", ""))
            and (r["mma"] != "wgmma" or not r["tma"])]


def compile_errors(rows: Sequence[dict]) -> list[str]:
    return [f"{_where(r)}, config {r['config']}: {r['error']}"
            for r in rows if "error" in r]


def problems(rows: Sequence[dict]) -> list[str]:
    """Everything that fails the check, one line each."""
    return [*compile_errors(rows), *unfit_shapes(rows), *unfit_defaults(rows),
            *spilling_defaults(rows), *slow_defaults(rows)]


_HEADER = ["kernel", "dtype", "size", "config", "arch", "smem B", "limit B", "regs", "spill",
           "mma", "tma"]


def _cells(row: dict) -> list[str]:
    config = row["config"] + (" *" if row["default"] else "")
    head = [row["kernel"], row["dtype"], row["size"], config, f"sm_{row['arch']}"]
    if "error" in row:
        return head + [f"error: {row['error'].splitlines()[0]}"] + [""] * 5
    fit = "" if row["fits"] else " !"
    regs, spill = ("?" if v is None else str(v) for v in (row["regs"], row["spill"]))
    return head + [f"{row['smem']:,}{fit}", f"{row['smem_limit']:,}", regs, spill,
                   row["mma"], "yes" if row["tma"] else "no"]


def format_table(rows: Sequence[dict]) -> str:
    """One line per (kernel, dtype, size, config, arch). ``*`` marks the first config,
    ``!`` shared memory over the limit."""
    return render_table(_HEADER, [_cells(row) for row in rows], left=range(5))


# ----------------------------------------------------------------- the worker processes


class _TargetDriver:
    """Stands in for Triton's CUDA driver while compiling: a warmup asks it only for the
    target and a device and stream to key the JIT caches on (the device is the arch, so
    each arch gets its own cache). Triton 3.2's ``triton.autotune`` also asks it for a
    benchmarker when the kernels are imported; nothing is benchmarked."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):
        def refuse(*args, **kwargs):
            raise RuntimeError("check-kernels compiles only; it cannot benchmark")
        return refuse


@dataclass
class _Job:
    index: int
    case: Case
    fn: Any       # the @triton.jit JITFunction
    args: tuple
    kwargs: dict  # the launcher's keywords, then the config's
    default: bool
    arch: int


def _launches(case: Case, arch: int) -> list[tuple[Any, tuple, dict]]:
    """(kernel, args, kwargs) of every launch the op's launchers make for ``case``, with
    the memory paths (``_device_paths``) of an sm_``arch`` GPU."""
    import importlib
    import pkgutil

    from fastattn import kernels
    from fastattn.kernels import _utils

    recorded: list[tuple[Any, tuple, dict]] = []
    modules = [importlib.import_module(f"{kernels.__name__}.{m.name}")
               for m in pkgutil.iter_modules(kernels.__path__)]
    patches = [(m, "launch", lambda kernel: _Recorder(kernel, recorded))
               for m in modules if getattr(m, "launch", None) is _utils.launch]
    patches += [(m, "_device_paths", lambda device, m=m: m.arch_paths(arch // 10))
                for m in modules if hasattr(m, "arch_paths")]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        case.launch()
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return recorded


class _Recorder:
    """``launch(kernel)`` while recording: ``[grid](*args, **kwargs)`` appends them."""

    def __init__(self, kernel, recorded: list) -> None:
        self.kernel, self.recorded = kernel, recorded

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.recorded.append((self.kernel, args, kwargs))


def _jobs(spec: dict) -> Iterator[_Job]:
    """Every (case, launch, config, arch), numbered the same way in every worker."""
    from triton.runtime.jit import JITFunction

    index, count = 0, spec["all_configs"]            # True, False (the first) or a count
    for case in (Case(**c) for c in spec["cases"]):
        seen = set()
        by_arch = {arch: _launches(case, arch) for arch in spec["archs"]}   # same kernels,
        archs = [a for a in spec["archs"] if by_arch[a]]   # order on archs with any (fp8: 90)
        for n, (kernel, _, kwargs) in enumerate(by_arch[archs[0]] if archs else []):
            launch = (id(kernel), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if launch in seen:      # made before in this case: the same binary (e.g. Δ)
                continue
            seen.add(launch)
            # An autotuned kernel is an Autotuner holding the JITFunction in .fn.
            configs = ([c.all_kwargs() for c in kernel.configs]
                       if hasattr(kernel, "configs") else [{}])
            while not isinstance(kernel, JITFunction):
                kernel = kernel.fn
            for i, config in enumerate(configs[:None if count is True else max(1, int(count))]):
                for arch in archs:
                    _, args, arch_kwargs = by_arch[arch][n]
                    yield _Job(index, case, kernel, args, {**arch_kwargs, **config},
                               i == 0, arch)
                    index += 1


def _cache_key(job: _Job) -> str:
    import torch
    import triton

    def specialisation(arg):
        if isinstance(arg, torch.Tensor):
            return f"{arg.dtype} aligned={arg.data_ptr() % 16 == 0}"
        return arg if isinstance(arg, (bool, int)) else type(arg).__name__

    key = [triton.__version__, job.fn.cache_key, job.arch,
           [specialisation(a) for a in job.args], sorted(map(repr, job.kwargs.items()))]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


_CONFIG_KEYS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})  # not variants


def _describe(job: _Job, num_warps: int, num_stages: int) -> dict:
    kw = job.kwargs  # the tiles; a head dim in two pieces (BLOCK_D2 > 0) shows as D64+16
    tiles = "".join({"BLOCK_D2": "+"}.get(n, " " + n.removeprefix("BLOCK_")) + str(kw[n])
                    for n in job.fn.arg_names if n.startswith("BLOCK_") and kw.get(n)).strip()
    return {"job": job.index, "op": job.case.op, "dtype": job.case.dtype,
            "size": job.case.label, "causal": job.case.causal, "kernel": job.fn.__name__,
            "config": f"{tiles} w{num_warps} s{num_stages}", "default": job.default,
            "constexprs": " ".join(f"{k}={v}" for k, v in sorted(job.kwargs.items())
                                   if not k.startswith("BLOCK_") and k not in _CONFIG_KEYS),
            "arch": job.arch, "smem_limit": SMEM_LIMIT[job.arch]}


def _compile(job: _Job) -> dict:
    """Compile one job; the row's measurements."""
    from triton.runtime.driver import driver

    driver.set_active(_TargetDriver(job.arch))
    kernel = job.fn.warmup(*job.args, grid=(1,), **job.kwargs)
    ptx = kernel.asm["ptx"]
    regs, spill, static_smem = _resource_usage(kernel.asm["cubin"])
    mma = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
           if op in ptx]
    return {"num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages,
            "smem": kernel.metadata.shared + static_smem, "regs": regs, "spill": spill,
            "mma": "+".join(mma) or "none", "tma": "cp.async.bulk.tensor" in ptx}


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None, int]:
    """(registers per thread, spill bytes per thread, static shared memory bytes), from
    ``cuobjdump -res-usage`` (the Triton wheel's, else PATH's); (None, None, 0) without."""
    import triton.backends.nvidia as nvidia

    shipped = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    tool = str(shipped) if shipped.exists() else shutil.which("cuobjdump")
    if tool is None:
        return None, None, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{out}")
    return tuple(int(g) for g in found.groups())


def _measure(job: _Job, cache_dir: Path | None) -> dict:
    """The job's row: from the cache, or compiled (and then cached)."""
    path = cache_dir and cache_dir / f"{_cache_key(job)}.json"
    if path and path.exists():
        found, cached = json.loads(path.read_text()), True
    else:
        start = time.perf_counter()
        try:
            found = _compile(job)
        except Exception as e:  # reported as a problem of this kernel, not a crash
            found = {"num_warps": job.kwargs.get("num_warps", 4),
                     "num_stages": job.kwargs.get("num_stages", 3),
                     "error": f"{type(e).__name__}: {e}"}
        found["seconds"], cached = round(time.perf_counter() - start, 2), False
        if path and "error" not in found:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(found))
            tmp.replace(path)  # atomic: workers may write the same key
    row = _describe(job, found.pop("num_warps"), found.pop("num_stages"))
    row.update(found, cached=cached)
    if "error" not in row:
        row["fits"] = row["smem"] <= row["smem_limit"]
    return row


def _claim(claims: str, index: int) -> bool:
    """True for the one worker that creates the job's claim file first. Workers walk the
    same job list, each taking the next unclaimed job: a slow compile holds up only one."""
    try:
        os.close(os.open(os.path.join(claims, f"job{index}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _worker(spec: dict) -> None:
    """Compile the jobs this worker claims; write their rows to ``spec["out"]``."""
    import warnings

    # Triton 3.9 warns on every compile that its fp-fusion default will change; a
    # launch would compile with the same default, so the warning says nothing here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    from triton.runtime.driver import driver

    driver.set_active(_TargetDriver(spec["archs"][0]))  # before the kernels are imported
    cache_dir = spec["cache_dir"] and Path(spec["cache_dir"])
    rows = []
    for job in _jobs(spec):
        if _claim(spec["claims"], job.index):
            row = _measure(job, cache_dir)
            rows.append(row)
            state = "cached" if row["cached"] else f"{row['seconds']} s"
            print(f"  {row['kernel']} {row['dtype']} {row['size']} {row['config']} "
                  f"sm_{row['arch']}: {state}", file=sys.stderr, flush=True)
    Path(spec["out"]).write_text(json.dumps(rows))


# ----------------------------------------------------------------- the command line


def _subset(allowed: Sequence, cast=str):
    """argparse type: a comma-separated list of ``cast`` values, each in ``allowed``."""
    def parse(text: str) -> list:
        try:
            values = [cast(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{', '.join(map(str, allowed))}, got {text!r}")
        return list(dict.fromkeys(values))
    return parse


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastattn" / "check-kernels"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-kernels", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed)",
        description="Compile every Triton kernel with every autotune config for the given GPU "
                    "architectures from the launchers' argument lists; report shared memory, "
                    "registers, spills, wgmma/mma.sync and TMA. Exit 1 on a problem: no config "
                    "fits, a first (FASTATTN_AUTOTUNE=0) config does not fit or, on sm_90 in 16 "
                    "bits, spills or (attention, D 64/80/96/128/192/256) lacks wgmma or TMA.")
    p.add_argument("--arch", type=_subset(SMEM_LIMIT, int), default=[80, 90], metavar="80,90",
                   help=f"compute capabilities, of {', '.join(map(str, SMEM_LIMIT))} "
                        "(default 80,90)")
    p.add_argument("--op", type=_subset(OPS), default=list(OPS), metavar="OPS",
                   help=f"of {', '.join(OPS)} (default: all)")
    p.add_argument("--dtype", type=_subset(DTYPES), default=list(DTYPES), metavar="DTYPES",
                   help=f"of {', '.join(DTYPES)} (default: all)")
    p.add_argument("--head-dim", type=positive_ints, default=list(HEAD_DIMS), metavar="D",
                   help=f"attention head dims (default {','.join(map(str, HEAD_DIMS))})")
    p.add_argument("--width", type=positive_ints, default=list(WIDTHS), metavar="N",
                   help=f"LayerNorm/GELU row widths (default {','.join(map(str, WIDTHS))})")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="attention launches causal (default) or not")
    p.add_argument("--configs", choices=["all", "first"], default="all",
                   help="every autotune config (default) or only the first, which "
                        "FASTATTN_AUTOTUNE=0 uses")
    p.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="compile processes (default: one per CPU core)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where results are cached (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything again")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    import triton

    from fastattn.ops import flash_attention as fa  # not the kernels: no triton.autotune here

    bad = [d for d in args.head_dim if not fa.head_dim_supported(d)]
    if bad:
        args.parser.error(f"--head-dim: a head dim must be {fa.HEAD_DIMS}, got {bad}")
    start = time.perf_counter()
    rows = check(cases(args.op, args.dtype, args.head_dim, args.width, args.causal),
                 args.arch, args.configs == "all", args.jobs,
                 None if args.no_cache else args.cache_dir)
    found = problems(rows)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "smem_limit": SMEM_LIMIT,
                          "rows": rows, "problems": found}, indent=1))
        return 1 if found else 0
    compiled = sum(not r["cached"] for r in rows)
    print(format_table(rows))
    print(f"\n{len(rows)} kernel x config x arch: {compiled} compiled, "
          f"{len(rows) - compiled} from the cache, in {time.perf_counter() - start:.0f} s "
          f"(triton {triton.__version__}). * first config (FASTATTN_AUTOTUNE=0), "
          "! over the shared-memory limit.")
    print("\n".join(["", f"{len(found)} problem(s):", *found]) if found else "no problems")
    return 1 if found else 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(json.loads(sys.argv[2]))
