"""The C++/CUDA extension's ops (``torch.ops.fastattn_ext``), called directly.

The extension is built once per session with ``fastattn.ext.load()`` (a JIT build cached
in ``fastattn.ext.default_build_directory()``, or ``$FASTATTN_EXT_BUILD_DIR``) unless an
installed build (``fastattn._C``) is importable. A failed build fails the tests: this
file is what CI uses to build-check the CPU extension. Without a C++ compiler they skip.

Every op is compared, forward and backward, with the float64 formulas of
``fastattn.reference`` (gradients by autograd on them). Tolerance, per output: the max
error may be at most 2x that of eager torch at the same dtype, plus 4 ulp of the dtype
at the output's scale (flash-attention's rule).

``test_cuda_sources_compile`` compiles ``csrc/cuda`` with nvcc for sm_80 and sm_90 (no GPU
needed); it is marked slow (``-m "not slow"`` deselects it) and skips without nvcc.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from fastattn import _ext_build, ext, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (1, 3, 768, 1000, 4097)
ROWS = 67  # not a multiple of any block size; 4097-wide rows use several row blocks
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ build


@pytest.fixture(scope="session")
def ops():
    """torch.ops.fastattn_ext, building the extension first if it is not loaded."""
    if not ext.is_available():
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            pytest.skip(f"no C++ compiler ({compiler!r} not on PATH): cannot build the extension")
        start = time.perf_counter()
        ext.load()  # raises with the compiler's output when the build fails
        print(f"\nfastattn_ext built/loaded in {time.perf_counter() - start:.1f}s "
              f"({ext.default_build_directory()})")
    return torch.ops.fastattn_ext


# ------------------------------------------------------------------------------ helpers


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor) -> None:
    """out (the extension) against ref (float64): at most 2x eager torch's error + 4 ulp."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype}, eager torch gives {eager.dtype}"
    if ref.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    floor = 4 * torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_eager + floor, (
        f"{name}: max error {err:.3g} > 2 x eager torch's {err_eager:.3g} + {floor:.3g}")


def _grads(y: torch.Tensor, inputs: list, dy: torch.Tensor) -> list:
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
    return [None if t is None else next(got) for t in inputs]


def _leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_()


# LayerNorm variants: (weight, bias, residual, rms_norm, float32 parameters)
LN_MODES = {
    "plain": (False, False, False, False, False),
    "affine": (True, True, False, False, False),
    "affine_residual": (True, True, True, False, False),
    "fp32_params": (True, True, False, False, True),
    "rms": (True, False, False, True, False),
    "rms_bias_residual": (True, True, True, True, False),
}


def _layer_norm_inputs(mode, n, dtype, device, m=ROWS, seed=0):
    has_w, has_b, has_r, rms, fp32_params = LN_MODES[mode]
    g = torch.Generator().manual_seed(seed)
    pdtype = torch.float32 if fp32_params else dtype

    def rand(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt).to(device)

    x = rand(m, n, scale=2.0, shift=0.5)
    w = rand(n, dt=pdtype, shift=1.0) if has_w else None
    b = rand(n, dt=pdtype) if has_b else None
    r = rand(m, n) if has_r else None
    dy = rand(m, n)
    dres = rand(m, n) if has_r else None
    eps = 1e-6 if rms else 1e-5
    return x, w, b, r, dy, dres, eps, rms


def _layer_norm_ref(x, w, b, r, eps, rms, dtype=torch.float64):
    """The formula (float64 reference) or eager torch (dtype = the input's) with leaves."""
    xl, wl, bl, rl = (_leaf(t, dtype) for t in (x, w, b, r))
    if dtype == torch.float64:
        if rms:
            y = reference.rms_norm(xl, wl, eps, rl)
            y = y if bl is None else y + bl
        else:
            y = reference.layer_norm(xl, wl, bl, eps, rl)
    else:  # eager torch, parameters in the input's dtype as a user of F.* would pass them
        h = xl if rl is None else xl + rl
        wd = None if wl is None else wl.to(dtype)
        bd = None if bl is None else bl.to(dtype)
        if rms:
            y = F.rms_norm(h, (x.shape[1],), wd, eps)
            y = y if bd is None else y + bd
        else:
            y = F.layer_norm(h, (x.shape[1],), wd, bd, eps)
    return y, [xl, wl, bl, rl]


def _run_layer_norm(ops, mode, n, dtype, device="cpu", m=ROWS):
    """Runs both ops for one case and checks every output against the reference."""
    x, w, b, r, dy, dres, eps, rms = _layer_norm_inputs(mode, n, dtype, device, m)
    y, h, mean, rstd = ops.layer_norm_fwd(x, w, b, r, eps, rms)
    dx, dw, db = ops.layer_norm_bwd(dy, x if r is None else h, w, mean, rstd, dres,
                                    b is not None, rms)

    ref, ref_leaves = _layer_norm_ref(x, w, b, r, eps, rms)
    eager, eager_leaves = _layer_norm_ref(x, w, b, r, eps, rms, dtype)
    _check("y", y, ref.detach(), eager.detach())
    ref_g = _grads(ref, ref_leaves, dy.double())
    eager_g = _grads(eager, eager_leaves, dy)
    dres64 = 0.0 if dres is None else dres.double()
    # dx is the gradient of x and of the residual: the VJP plus the residual stream's own.
    _check("dx", dx, ref_g[0] + dres64, eager_g[0] + (0.0 if dres is None else dres))
    if w is not None:
        _check("dweight", dw, ref_g[1], eager_g[1].to(w.dtype))
    else:
        assert dw.shape == (0,), f"dweight without weight must be empty, got {dw.shape}"
    if b is not None:
        _check("dbias", db, ref_g[2], eager_g[2].to(w.dtype if w is not None else dtype))
    else:
        assert db.shape == (0,), f"dbias without bias must be empty, got {db.shape}"

    h64 = x.double() if r is None else h.double()
    if r is not None:
        assert h.dtype == x.dtype and torch.equal(h, (x.double() + r.double()).to(x.dtype)), \
            "residual_out must be x + residual rounded to x's dtype"
    else:
        assert h.shape == (0,), f"residual_out without residual must be empty, got {h.shape}"
    if rms:
        assert mean.shape == (0,), f"mean must be empty for RMSNorm, got {mean.shape}"
        rstd64 = torch.rsqrt((h64 * h64).mean(-1) + eps)
    else:
        mean64 = h64.mean(-1)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-6)
        rstd64 = torch.rsqrt(h64.var(-1, unbiased=False) + eps)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(rstd.double(), rstd64, rtol=2e-5, atol=0)


def _gelu_inputs(n, dtype, device, has_bias, fp32_bias=False, m=ROWS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, n, generator=g) * 3).to(dtype).to(device)
    b = None
    if has_bias:
        b = torch.randn(n, generator=g).to(torch.float32 if fp32_bias else dtype).to(device)
    dy = torch.randn(m, n, generator=g).to(dtype).to(device)
    return x, b, dy


def _run_gelu(ops, n, dtype, approximate, has_bias, fp32_bias=False, device="cpu",
                   m=ROWS):
    x, b, dy = _gelu_inputs(n, dtype, device, has_bias, fp32_bias, m)
    y = ops.gelu_fwd(x, b, approximate)
    dx, db = ops.gelu_bwd(dy, x, b, approximate)

    xl, bl = _leaf(x, torch.float64), _leaf(b, torch.float64)
    ref = reference.gelu(xl, approximate, bl)
    xe, be = _leaf(x), _leaf(b, dtype)
    eager = F.gelu(xe if be is None else xe + be, approximate=approximate)
    _check("y", y, ref.detach(), eager.detach())
    ref_g = _grads(ref, [xl, bl], dy.double())
    eager_g = _grads(eager, [xe, be], dy)
    _check("dx", dx, ref_g[0], eager_g[0])
    if b is not None:
        _check("dbias", db, ref_g[1], eager_g[1].to(b.dtype))
    else:
        assert db.shape == (0,), f"dbias without bias must be empty, got {db.shape}"


# ------------------------------------------------------------------------------ ops vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("mode", list(LN_MODES))
def test_layer_norm(ops, mode, n, dtype):
    _run_layer_norm(ops, mode, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_gelu(ops, has_bias, approximate, n, dtype):
    _run_gelu(ops, n, dtype, approximate, has_bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_bias_gelu_fp32_bias(ops, dtype):
    _run_gelu(ops, 1000, dtype, "none", True, fp32_bias=True)


@pytest.mark.parametrize("m", [1, 2049])
def test_row_counts(ops, m):
    """One row, and many rows (several row blocks and parallel chunks)."""
    _run_layer_norm(ops, "affine_residual", 768, torch.bfloat16, m=m)
    _run_gelu(ops, 768, torch.bfloat16, "tanh", True, m=m)


def test_large_output_streaming(ops):
    """Outputs of 8 MiB and more take the streaming-store path; rows of 1000 floats are
    not all 64-byte aligned, so aligned and unaligned rows mix."""
    for n in (1024, 1000):
        _run_layer_norm(ops, "affine_residual", n, torch.float32, m=2100)
        _run_gelu(ops, n, torch.float32, "none", True, m=2100)


def test_layer_norm_large_mean(ops):
    """Rows whose mean is 1e4 times their spread: the two-pass variance stays accurate
    where E[h²] - E[h]² would cancel to nothing."""
    x = torch.randn(ROWS, 1000, dtype=torch.float64) * 0.1 + 1000.0
    y, _, _, rstd = ops.layer_norm_fwd(x.float(), None, None, None, 1e-5, False)
    ref = reference.layer_norm(x.float().double(), eps=1e-5)
    _check("y", y, ref, F.layer_norm(x.float(), (1000,), eps=1e-5))
    rstd64 = torch.rsqrt(x.float().double().var(-1, unbiased=False) + 1e-5)
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-3, atol=0)


def test_empty_rows(ops):
    x = torch.empty(0, 8)
    y, h, mean, rstd = ops.layer_norm_fwd(x, torch.ones(8), None, None, 1e-5, False)
    assert y.shape == (0, 8) and h.shape == mean.shape == rstd.shape == (0,)
    dx, dw, db = ops.layer_norm_bwd(x, x, torch.ones(8), mean, rstd, None, True, False)
    assert dx.shape == (0, 8)
    assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    assert ops.gelu_fwd(x, torch.ones(8), "none").shape == (0, 8)
    dx, db = ops.gelu_bwd(x, x, torch.ones(8), "none")
    assert dx.shape == (0, 8) and torch.equal(db, torch.zeros(8))


# ------------------------------------------------------------------------------ determinism


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_backward_deterministic(ops, dtype):
    """Backward twice, and with 1 vs all threads: bitwise equal (dweight/dbias are summed
    over fixed row blocks in a fixed order, never atomically)."""
    x, w, b, r, dy, dres, eps, rms = _layer_norm_inputs("affine_residual", 1000, dtype, "cpu",
                                                        m=517)
    _, h, mean, rstd = ops.layer_norm_fwd(x, w, b, r, eps, rms)
    gx, gb, gdy = _gelu_inputs(1000, dtype, "cpu", True, m=517)

    def run():
        return (*ops.layer_norm_bwd(dy, h, w, mean, rstd, dres, True, False),
                *ops.gelu_bwd(gdy, gx, gb, "none"))

    first = run()
    for again in (run(), _with_threads(1, run)):
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_), "backward results differ between runs"


# ------------------------------------------------------------------------------ other ISAs

_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_ext
from fastattn import ext
ext.load()
ops = torch.ops.fastattn_ext
print(ops.cpu_isa())
for dtype in test_ext.DTYPES:
    for n in (3, 1000):
        for mode in ("affine_residual", "rms"):
            test_ext._run_layer_norm(ops, mode, n, dtype)
        for approximate in ("none", "tanh"):
            test_ext._run_gelu(ops, n, dtype, approximate, True)
"""


_OTHER_ISAS = ("avx512", "avx2", "generic")


@pytest.fixture(scope="module")
def isa_runs(ops) -> dict:
    """The checks of _ISA_SCRIPT run once per ISA in FASTATTN_EXT_CPU_ISA, in concurrent fresh
    processes (each spends most of its time importing torch and fastattn)."""
    env = dict(os.environ, FASTATTN_EXT_BUILD_DIR=ext.default_build_directory())
    script = _ISA_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    procs = {isa: subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                                   env=dict(env, FASTATTN_EXT_CPU_ISA=isa),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for isa in _OTHER_ISAS}
    results = {}
    for isa, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[isa] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("isa", _OTHER_ISAS)
def test_other_cpu_isas(isa_runs, isa):
    """The kernels compiled for the narrower ISAs (chosen at run time by CPU features;
    FASTATTN_EXT_CPU_ISA lowers the choice) pass the same checks."""
    returncode, stdout, stderr = isa_runs[isa]
    assert returncode == 0, f"checks with FASTATTN_EXT_CPU_ISA={isa} failed:\n{stdout}\n{stderr}"
    ran = stdout.split()[0]
    assert ran in (isa, "avx2", "generic"), f"asked for {isa}, ran {ran}"


# ------------------------------------------------------------------------------ status


def test_status_and_describe(ops):
    assert ext.is_available() and ext.is_available("cpu")
    ok, why = ext.status(torch.device("cpu"))
    assert ok, why
    assert ext.describe().startswith("available:")
    assert ops.cpu_isa() in ("avx512bf16", "avx512", "avx2", "generic")


def test_kernels_use_torch_threads(ops):
    """at::parallel_for is compiled into the extension: built without the threading
    runtime torch uses (OpenMP's -fopenmp), it silently runs every kernel on one thread."""
    for n in sorted({1, torch.get_num_threads()}):
        assert _with_threads(n, ops.cpu_threads) == n
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn_ext::layer_norm_fwd", "CUDA"):
        ok, why = ext.status(torch.device("cuda"))
        assert not ok and "without CUDA kernels" in why


# ------------------------------------------------------------------------------ argument checks

_X = torch.randn(4, 8)


def _fwd(x=_X, weight=None, bias=None, residual=None, eps=1e-5):
    return lambda o: o.layer_norm_fwd(x, weight, bias, residual, eps, False)


_ZEROS, _ONES = torch.zeros(4), torch.ones(4)


def _bwd(dy=_X, h=_X, mean=_ZEROS, rstd=_ONES, dresidual_out=None):
    return lambda o: o.layer_norm_bwd(dy, h, None, mean, rstd, dresidual_out, False, False)


_BAD_CALLS = {
    "ln_x_3d": (_fwd(x=torch.randn(2, 4, 8)),
                r"layer_norm_fwd: x must be 2-D \(M, N\), got shape \[2, 4, 8\]"),
    "ln_x_dtype": (_fwd(x=_X.double()), r"x must be float32, float16 or bfloat16, got Double"),
    "ln_x_strided": (_fwd(x=torch.randn(8, 4).t()), r"x must be contiguous, got strides \[1, 4\]"),
    "ln_x_empty_width": (_fwd(x=torch.randn(4, 0)), r"x must have at least one column"),
    "ln_weight_shape": (_fwd(weight=torch.ones(7)),
                        r"weight must have shape \(8,\) \(the last dim of x\), got \[7\]"),
    "ln_weight_dtype": (_fwd(x=_X.bfloat16(), weight=torch.ones(8, dtype=torch.half)),
                        r"weight must have the dtype of x \(BFloat16\) or float32, got Half"),
    "ln_bias_strided": (_fwd(bias=torch.ones(16)[::2]),
                        r"bias must be contiguous, got strides \[2\]"),
    "ln_residual_shape": (_fwd(residual=torch.randn(4, 9)),
                          r"residual must have the shape of x \[4, 8\], got \[4, 9\]"),
    "ln_residual_dtype": (_fwd(residual=_X.half()),
                          r"residual must have the dtype of x \(Float\), got Half"),
    "ln_eps_negative": (_fwd(eps=-1.0), r"eps must be a finite number >= 0, got -1"),
    "ln_eps_nan": (_fwd(eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
    "lnb_dy_shape": (_bwd(dy=torch.randn(4, 9)),
                     r"layer_norm_bwd: dy must have the shape of h \[4, 8\], got \[4, 9\]"),
    "lnb_h_strided": (_bwd(h=torch.randn(8, 4).t()), r"layer_norm_bwd: h must be contiguous"),
    "lnb_mean_dtype": (_bwd(mean=torch.zeros(4, dtype=torch.float64)),
                       r"mean must be float32, got Double"),
    "lnb_rstd_shape": (_bwd(rstd=torch.ones(5)),
                       r"rstd must have shape \(4,\) \(one per row of h\), got \[5\]"),
    "lnb_dres_dtype": (_bwd(dresidual_out=_X.bfloat16()),
                       r"dresidual_out must have the dtype of h \(Float\), got BFloat16"),
    "gelu_approximate": (lambda o: o.gelu_fwd(_X, None, "erf"),
                         r"gelu_fwd: approximate must be 'none' or 'tanh', got 'erf'"),
    "gelu_bias_shape": (lambda o: o.gelu_fwd(_X, torch.ones(4), "none"),
                        r"gelu_fwd: bias must have shape \(8,\)"),
    "gelu_x_1d": (lambda o: o.gelu_fwd(torch.randn(8), None, "none"),
                  r"gelu_fwd: x must be 2-D \(M, N\), got shape \[8\]"),
    "gelub_dy_dtype": (lambda o: o.gelu_bwd(_X.half(), _X, None, "none"),
                       r"gelu_bwd: dy must have the dtype of x \(Float\), got Half"),
    "gelub_approximate": (lambda o: o.gelu_bwd(_X, _X, None, "Tanh"),
                          r"gelu_bwd: approximate must be 'none' or 'tanh', got 'Tanh'"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_arguments(ops, case):
    call, message = _BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        call(ops)


# ------------------------------------------------------------------------------ CUDA


def _cuda_ops_or_skip(ops):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn_ext::layer_norm_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels")
    return ops


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n", WIDTHS + (8192,))
def test_cuda_ops(ops, n, dtype):
    """The CUDA kernels against the same references (warp- and block-per-row widths)."""
    ops = _cuda_ops_or_skip(ops)
    for mode in LN_MODES:
        _run_layer_norm(ops, mode, n, dtype, device="cuda")
    for approximate in ("none", "tanh"):
        for has_bias in (True, False):
            _run_gelu(ops, n, dtype, approximate, has_bias, device="cuda")


@pytest.mark.cuda
def test_cuda_backward_deterministic(ops):
    ops = _cuda_ops_or_skip(ops)
    x, w, b, r, dy, dres, eps, rms = _layer_norm_inputs("affine_residual", 4097, torch.bfloat16,
                                                       "cuda", m=3000)
    _, h, mean, rstd = ops.layer_norm_fwd(x, w, b, r, eps, rms)
    first = ops.layer_norm_bwd(dy, h, w, mean, rstd, dres, True, False)
    again = ops.layer_norm_bwd(dy, h, w, mean, rstd, dres, True, False)
    assert all(torch.equal(a, b_) for a, b_ in zip(first, again))


@pytest.mark.cuda
def test_cuda_device_mismatch(ops):
    ops = _cuda_ops_or_skip(ops)
    message = r"weight must be on the device of x \(cuda:0\), got cpu"
    with pytest.raises(RuntimeError, match=message):
        ops.layer_norm_fwd(_X.cuda(), torch.ones(8), None, None, 1e-5, False)


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None


def test_cuda_arch_flags_without_a_gpu(monkeypatch):
    """With no GPU visible and no TORCH_CUDA_ARCH_LIST (a build machine with a CUDA
    torch), the build names sm_80/sm_90 itself: torch would find no arch and fail."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _ext_build.cuda_arch_flags() == list(_ext_build.DEFAULT_ARCHS)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", "/usr/local/cuda")
    flags = _ext_build.build_options(os.path.join(REPO, "csrc"))["cuda_cflags"]
    assert [f for f in flags if "arch" in f] == list(_ext_build.DEFAULT_ARCHS)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _ext_build.cuda_arch_flags() == []


@pytest.mark.slow
def test_cuda_sources_compile():
    """Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 against torch's headers,
    and fastattn_ext.cpp compiles with its CUDA registrations (FASTATTN_WITH_CUDA). No GPU
    needed; a CPU-only torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h, so a
    stub stands in for it."""
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): CUDA sources not compile-checked")
    csrc = os.path.join(REPO, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    assert sources, "no csrc/cuda/*.cu"
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "stub", "c10", "cuda", "impl")
        os.makedirs(stub)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [f"-I{p}" for p in (csrc, os.path.join(tmp, "stub"),
                                       *cpp_extension.include_paths(),
                                       sysconfig.get_paths()["include"])]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        common = [abi, "-DFASTATTN_WITH_CUDA", "-std=c++17", *includes]
        jobs = [[nvcc, "-c", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC",
                 *_ext_build.DEFAULT_ARCHS, *cpp_extension.COMMON_NVCC_FLAGS, *common, src,
                 "-o", os.path.join(tmp, os.path.basename(src) + ".o")] for src in sources]
        compiler = os.environ.get("CXX", "c++")
        jobs.append([compiler, "-fsyntax-only", *common, os.path.join(csrc, "fastattn_ext.cpp")])

        def run(cmd):
            start = time.perf_counter()
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
            return cmd, proc, time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(run, jobs))
    failures = [f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                for cmd, proc, _ in results if proc.returncode != 0]
    assert not failures, "CUDA sources failed to compile:\n" + "\n\n".join(failures)
    for cmd, _, seconds in results:
        source = cmd[-3] if cmd[1] == "-c" else cmd[-1]
        print(f"compiled {os.path.basename(source)} in {seconds:.0f}s")
