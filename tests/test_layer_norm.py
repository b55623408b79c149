"""LayerNorm / RMSNorm (``fastattn.ops.layer_norm``) on every backend against float64.

Tolerances (flash-attention's rule): fastattn's max abs error against float64 may be at
most 2× that of eager torch at the same dtype (``F.layer_norm`` / ``F.rms_norm`` on the
same tensors, gradients by autograd), plus a floor for cases where eager torch happens to
round well: ``floor · size`` with ``size = max |float64 reference| + 1e-3`` (the 1e-3
gives results that cancel to about zero a scale; 1 at width 1, where every result is
rounding noise amplified by 1/√eps) and floor
* fp32: 1e-4. Every backend keeps statistics and sums in fp32; the gap to float64 is fp32
  rounding over sums of up to 65536 terms (about 1e-6 · size in practice).
* fp16: 2e-3 and bf16: 1.6e-2, about two ulps of an output near ``size``.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICE, available_backends
from fastattn import backends, reference
from fastattn.ops import gelu as gelu_ops
from fastattn.ops import layer_norm as ln
from tolerances import FLOOR, assert_close

BACKENDS = available_backends(("triton", "ext", "torch"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]

# (rows, width, variant). Widths 1 and 3 (tiny, odd), 1000 (one block, masked tail), 4097
# (one past a power of two) and 65536 (the chunked path); the wide ones with few rows.
VARIANTS = ("affine", "no_affine", "weight_only", "residual", "rms", "rms_no_weight",
            "rms_residual")
CASES = [
    (5, 1, "affine"), (5, 1, "rms"), (7, 3, "affine"), (7, 3, "rms_residual"),
    *((33, 1000, v) for v in VARIANTS),
    (3, 4097, "residual"), (3, 4097, "rms"),
    (2, 65536, "affine"), (2, 65536, "rms_residual"),
]


def _triton_kernels():
    from fastattn.kernels import layer_norm
    return layer_norm


def _inputs(rows, width, variant, dtype, scale=1.0, offset=0.0, param_dtype=None, seed=0):
    """x, weight, bias, residual (None where the variant has none), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    rms = variant.startswith("rms")
    x = torch.randn(rows, width, generator=g) * scale + offset
    w = 1 + 0.5 * torch.randn(width, generator=g)
    b = 0.5 * torch.randn(width, generator=g)
    r = torch.randn(rows, width, generator=g) * scale
    x = x.to(DEVICE, dtype).requires_grad_()
    w = (w.to(DEVICE, param_dtype).requires_grad_()
         if variant not in ("no_affine", "rms_no_weight") else None)
    b = b.to(DEVICE, param_dtype).requires_grad_() if variant in ("affine", "residual") else None
    r = r.to(DEVICE, dtype).requires_grad_() if variant.endswith("residual") else None
    return x, w, b, r, rms


def _run(backend, x, w, b, r, rms, eps=1e-5):
    """Forward (y, h) with fastattn, then grads of (x, w, b, r) for fixed random dy, dh."""
    with fastattn.use_backend(backend):
        if rms:
            y, h = ln.rms_norm(x, x.shape[-1], w, eps, residual=r, return_residual=True)
        else:
            y, h = ln.layer_norm(x, x.shape[-1], w, b, eps, residual=r, return_residual=True)
    return y, h, _grads(y, h, x, w, b, r)


def _grads(y, h, x, w, b, r):
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    outs, grads_out = [y], [dy]
    if r is not None:  # the returned residual stream gets its own gradient
        outs.append(h)
        grads_out.append(torch.randn(h.shape, generator=g).to(h.device, h.dtype))
    leaves = [t for t in (x, w, b, r) if t is not None]
    return torch.autograd.grad(outs, leaves, grads_out)


def _eager(x, w, b, r, rms, dtype, eps=1e-5):
    """The same computation with torch's own functions in ``dtype`` (float64: the ground
    truth, via fastattn.reference). Returns (y, grads)."""
    xs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b, r)]
    xe, we, be, re = xs
    if dtype == torch.float64:
        y = (reference.rms_norm(xe, we, eps, re) if rms
             else reference.layer_norm(xe, we, be, eps, re))
    else:
        h = xe if re is None else xe + re
        y = (F.rms_norm(h, (h.shape[-1],), we, eps) if rms
             else F.layer_norm(h, (h.shape[-1],), we, be, eps))
    h = xe if re is None else xe + re
    return y, _grads(y, h, *xs)


def _check_against_float64(backend, x, w, b, r, rms, dtype, eps=1e-5):
    # Width 1 is degenerate: h − mean is 0 (LayerNorm) and x̂² is 1 (RMSNorm) up to
    # rounding, which rstd ≈ 1/√eps ≈ 316 then amplifies, so y's and the gradients'
    # errors scale with the inputs, not with the (zero) results.
    min_size = 1.0 if x.shape[-1] == 1 else 1e-3
    y, h, grads = _run(backend, x, w, b, r, rms, eps)
    y64, grads64 = _eager(x, w, b, r, rms, torch.float64, eps)
    # Eager at the input dtype; low-precision weights for it (CUDA's torch kernels reject
    # fp32 weights with fp16/bf16 input).
    cast = [None if t is None else t.to(dtype) for t in (w, b)]
    ye, grads_e = _eager(x, cast[0], cast[1], r, rms, dtype, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, "y", eager=ye, floor=FLOOR[dtype], min_size=min_size)
    if r is not None:
        # Triton's interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even),
        # so there h may sit one bf16 step (2**-7 relative) from torch's rounded sum.
        rtol = 2.0 ** -7 if INTERPRET and backend == "triton" and dtype == torch.bfloat16 else 0
        torch.testing.assert_close(h, x.detach() + r.detach(), rtol=rtol, atol=0)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), (x, w, b, r))
             if t is not None]
    for name, got, ref, eag in zip(names, grads, grads64, grads_e):
        assert_close(got, ref, name, eager=eag, floor=FLOOR[dtype], min_size=min_size)
    for t, gr in zip([t for t in (x, w, b, r) if t is not None], grads):
        assert gr.dtype == t.dtype, f"gradient dtype {gr.dtype} != {t.dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"M{m}-N{n}-{v}" for m, n, v in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_against_float64(backend, case, dtype):
    rows, width, variant = case
    if INTERPRET and backend == "triton" and width >= 65536 and dtype != torch.float32:
        pytest.skip("interpreter: the 65536-wide path runs in fp32 only, to keep CPU time low")
    x, w, b, r, rms = _inputs(rows, width, variant, dtype)
    _check_against_float64(backend, x, w, b, r, rms, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", ["residual", "rms_residual"])
@pytest.mark.parametrize("width", [200, 8193])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_params_with_low_precision_input(backend, width, variant, dtype):
    """Mixed precision: fp32 master weights with fp16/bf16 activations; the parameter
    gradients come back in fp32. 8193 takes the chunked path."""
    x, w, b, r, rms = _inputs(17, width, variant, dtype, param_dtype=torch.float32)
    _check_against_float64(backend, x, w, b, r, rms, dtype)


@pytest.mark.parametrize("scale, offset", [(1e4, 1e3), (1e-4, 0.0)], ids=["large", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["residual", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_tiny_magnitudes(backend, variant, dtype, scale, offset):
    """|x| ~ 1e4 around 1e3 (a one-pass E[x²] − E[x]² would cancel) and |x| ~ 1e-4
    (variance far below eps)."""
    x, w, b, r, rms = _inputs(9, 300, variant, dtype, scale=scale, offset=offset)
    _check_against_float64(backend, x, w, b, r, rms, dtype)


@pytest.mark.parametrize("variant", ["residual", "rms_residual", "weight_only"])
@pytest.mark.parametrize("width", [1000, 4097])
def test_chunked_path(monkeypatch, width, variant):
    """The looped (chunked-row) kernels at widths where a cheap test reaches them: the
    single-block limit is lowered to 256, so 1000 and 4097 run 4 and 17 chunks, the last
    one partly masked (Chan's variance merge; the backward's row sums and per-chunk
    dweight / dbias column sums over blocks of several rows)."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(_triton_kernels(), "MAX_BLOCK_N", 256)
    x, w, b, r, rms = _inputs(6, width, variant, torch.float32)
    _check_against_float64("triton", x, w, b, r, rms, torch.float32)


LAYOUTS = ["transposed", "row_sliced", "col_strided"]


def _strided(kind, dtype):
    """A (2, 5, 48) tensor with a non-contiguous layout."""
    g = torch.Generator().manual_seed(3)
    if kind == "transposed":
        t = torch.randn(2, 48, 5, generator=g).transpose(1, 2)
    elif kind == "row_sliced":  # unit last stride, row stride 96: the kernels read it as is
        t = torch.randn(2, 5, 96, generator=g)[..., 10:58]
    else:
        t = torch.randn(2, 5, 96, generator=g)[..., ::2]
    return t.to(DEVICE, dtype)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_noncontiguous_input(backend, rms, kind):
    """A (B, T, C) input, non-contiguous three ways, with a non-contiguous residual, gives
    exactly the result of the same values laid out contiguously."""
    x = _strided(kind, torch.float32).requires_grad_()
    r = _strided("transposed", torch.float32).requires_grad_()
    w = torch.randn(48, device=DEVICE).requires_grad_()
    b = None if rms else torch.randn(48, device=DEVICE).requires_grad_()
    xc, rc = [t.detach().contiguous().requires_grad_() for t in (x, r)]
    y, h, grads = _run(backend, x, w, b, r, rms)
    yc, hc, grads_c = _run(backend, xc, w, b, rc, rms)
    assert y.shape == (2, 5, 48) and y.is_contiguous()
    torch.testing.assert_close(y, yc, rtol=0, atol=0)
    torch.testing.assert_close(h, hc, rtol=0, atol=0)
    for got, want in zip(grads, grads_c):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_shape_over_several_dims(backend):
    """normalized_shape (T, C) normalises each (T, C) slab, like F.layer_norm."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(4, 5, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(4, 5, generator=g).to(DEVICE).requires_grad_()
    with fastattn.use_backend(backend):
        y = ln.layer_norm(x, (4, 5), w, b)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    x64, w64, b64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(x64, (4, 5), w64, b64)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_functions(backend):
    """Defaults match F.layer_norm / F.rms_norm (rms eps=None means finfo(dtype).eps)."""
    x = torch.randn(4, 7, 24, device=DEVICE)
    w = torch.randn(24, device=DEVICE)
    with fastattn.use_backend(backend):
        torch.testing.assert_close(ln.layer_norm(x, 24), F.layer_norm(x, (24,)))
        torch.testing.assert_close(ln.rms_norm(x, [24], w), F.rms_norm(x, [24], w))
        y, h = ln.layer_norm(x, 24, return_residual=True)
    assert h is x


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    """An input with no rows gives an empty output and zero parameter gradients."""
    x = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    with fastattn.use_backend(backend):
        y = ln.layer_norm(x, 16, w, b)
    assert y.shape == (0, 3, 16)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("width, max_block", [(3, None), (1000, None), (1000, 256)],
                         ids=["N3", "N1000", "N1000-chunked"])
@pytest.mark.parametrize("variant", ["residual", "rms_residual", "weight_only"])
def test_outputs_are_fully_written(monkeypatch, variant, width, max_block):
    """Every buffer the Triton launchers allocate starts as NaN: any element a kernel
    fails to write (a masked tail, a skipped row block, a partial-sum row) shows up."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    kernels = _triton_kernels()
    monkeypatch.setattr(kernels, "_empty", _nan_empty)
    if max_block:
        monkeypatch.setattr(kernels, "MAX_BLOCK_N", max_block)
    x, w, b, r, rms = _inputs(37, width, variant, torch.float16)
    y, h, grads = _run("triton", x, w, b, r, rms)
    for t in (y, h, *grads):
        assert not t.isnan().any()


@pytest.mark.parametrize("rows, width", [(700, 96), (11, 8193)], ids=["N96", "N8193"])
def test_backward_is_deterministic(rows, width):
    """dweight/dbias are summed through per-program partial buffers in a fixed order,
    never with atomics, so two backward passes must agree bit for bit (flash-attention's
    race test). Several programs each take several row blocks here."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    x, w, b, r, rms = _inputs(rows, width, "residual", torch.float32)
    first = _run("triton", x, w, b, r, rms)[2]
    second = _run("triton", x, w, b, r, rms)[2]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- validation


def _bad_call(kind):
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    calls = {
        "dtype": lambda: ln.layer_norm(x.double(), 8),
        "int": lambda: ln.layer_norm(torch.ones(4, 8, dtype=torch.int64), 8),
        "not_tensor": lambda: ln.layer_norm([1.0, 2.0], 2),
        "shape": lambda: ln.layer_norm(x, 5),
        "shape_type": lambda: ln.layer_norm(x, "eight"),
        "shape_empty": lambda: ln.layer_norm(x, ()),
        "zero_width": lambda: ln.layer_norm(torch.randn(4, 0, device=DEVICE), 0),
        "weight_shape": lambda: ln.layer_norm(x, 8, torch.ones(7, device=DEVICE)),
        "weight_dtype": lambda: ln.layer_norm(x.half(), 8, w.double()),
        "weight_device": lambda: ln.layer_norm(x, 8, torch.ones(8, device="meta")),
        "bias_dtype": lambda: ln.layer_norm(x.half(), 8, w.half(), w.float()),
        "residual_shape": lambda: ln.layer_norm(x, 8, residual=torch.randn(2, 8)),
        "residual_dtype": lambda: ln.layer_norm(x, 8, residual=x.half()),
        "eps": lambda: ln.layer_norm(x, 8, eps=-1e-5),
        "eps_nan": lambda: ln.rms_norm(x, 8, eps=float("nan")),
        "rms_dtype": lambda: ln.rms_norm(x.double(), 8),
    }
    return calls[kind]


@pytest.mark.parametrize("kind, exc, match", [
    ("dtype", TypeError, r"input dtype must be float16, bfloat16 or float32, got torch.float64"),
    ("int", TypeError, r"input dtype must be .* got torch.int64"),
    ("not_tensor", TypeError, r"input must be a torch.Tensor, got list"),
    ("shape", ValueError, r"normalized_shape \(5,\) must equal the last 1 dim\(s\) of input, "
                          r"whose shape is \(4, 8\)"),
    ("shape_type", TypeError,
     r"normalized_shape must be an int or a sequence of ints, got 'eight'"),
    ("shape_empty", ValueError, r"normalized_shape must name at least one dimension"),
    ("zero_width", ValueError, r"normalized_shape \(0,\) has no elements"),
    ("weight_shape", ValueError, r"weight shape must be \(8,\) \(normalized_shape\), got \(7,\)"),
    ("weight_dtype", TypeError, r"weight dtype must be input's dtype torch.float16 or float32, "
                                r"got torch.float64"),
    ("weight_device", ValueError, r"weight must be on input's device .*, got meta"),
    ("bias_dtype", TypeError, r"weight and bias must share one dtype, got weight torch.float16, "
                              r"bias torch.float32"),
    ("residual_shape", ValueError, r"residual shape must equal input shape \(4, 8\), got \(2, 8\)"),
    ("residual_dtype", TypeError, r"residual dtype must equal input dtype torch.float32, "
                                  r"got torch.float16"),
    ("eps", ValueError, r"eps must be a finite number >= 0, got -1e-05"),
    ("eps_nan", ValueError, r"eps must be a finite number >= 0, got nan"),
    ("rms_dtype", TypeError, r"input dtype must be float16, bfloat16 or float32"),
])
def test_validation_errors(kind, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(kind)()


def test_unavailable_backend_is_an_error():
    ok, _ = backends.ext_status(torch.device(DEVICE))
    if ok:
        pytest.skip("the extension is built here: backend 'ext' is available")
    with fastattn.use_backend("ext"), pytest.raises(backends.BackendUnavailableError,
                                                    match="backend 'ext'.*cannot run layer_norm"):
        ln.layer_norm(torch.randn(2, 8, device=DEVICE), 8)


# ------------------------------------------------------------------ opcheck and compile


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, rms):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both ops."""
    g = torch.Generator().manual_seed(5)
    x, r, dy, dh = [torch.randn(6, 40, generator=g).to(DEVICE) for _ in range(4)]
    w, b = [torch.randn(40, generator=g).to(DEVICE) for _ in range(2)]
    fwd = torch.ops.fastattn.layer_norm_fwd.default
    bwd = torch.ops.fastattn.layer_norm_bwd.default
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    torch.library.opcheck(fwd, (*leaves, 1e-5, rms, backend))
    torch.library.opcheck(fwd, (x, None, None, None, 1e-5, rms, backend))
    _, h, mean, rstd = fwd(x, w, b, r, 1e-5, rms, backend)
    torch.library.opcheck(bwd, (dy, h, w, mean, rstd, dh, True, rms, backend))
    torch.library.opcheck(bwd, (dy, x, None, mean, rstd, None, False, rms, backend))


def test_compile_fullgraph():
    """A tiny pre-norm MLP step (layer_norm with residual, then bias_gelu) compiles with
    fullgraph=True on the torch backend (no graph breaks: fake kernels and autograd
    formulas are registered), and matches eager in value and gradient."""
    def block(x, res, w, b, bias):
        y, h = ln.layer_norm(x, (16,), w, b, residual=res, return_residual=True)
        return gelu_ops.bias_gelu(y, bias, "tanh") + h

    g = torch.Generator().manual_seed(6)
    args = [torch.randn(*s, generator=g).requires_grad_()
            for s in ((2, 3, 16), (2, 3, 16), (16,), (16,), (16,))]
    torch._dynamo.reset()
    with fastattn.use_backend("torch"):
        out = torch.compile(block, fullgraph=True)(*args)
        grads = torch.autograd.grad(out.sum(), args)
        want = block(*args)
        want_grads = torch.autograd.grad(want.sum(), args)
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp)
    assert math.isfinite(out.sum().item())


# ------------------------------------------------------------------ wide rows (N > 8192)

WIDE_VARIANTS = ("affine", "no_affine", "weight_only", "residual", "rms", "rms_no_weight",
                 "rms_residual")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", WIDE_VARIANTS)
@pytest.mark.parametrize("width", [8193, 12289])
def test_wide_rows_against_float64(monkeypatch, width, variant, dtype):
    """The chunked backward at widths just past MAX_BLOCK_N (8192 + 1, 12288 + 1: a chunk
    of one element, a half-masked one): row sums in pass 1, then dx and the dweight /
    dbias column sums chunk by chunk. 11 rows make several programs take two row blocks
    and leave the last block partly masked. Every buffer starts as NaN."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(_triton_kernels(), "_empty", _nan_empty)
    x, w, b, r, rms = _inputs(11, width, variant, dtype)
    _check_against_float64("triton", x, w, b, r, rms, dtype)
