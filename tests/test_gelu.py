"""GELU and fused bias + GELU (``fastattn.ops.gelu``) on every backend against float64.

Tolerances (flash-attention's rule): fastattn's max abs error against float64 may be at
most 2× that of eager torch at the same dtype (``F.gelu(x + bias)`` on the same tensors,
gradients by autograd), plus a floor ``floor · size`` with ``size = max |float64
reference| + 1e-3`` for cases where eager torch happens to round well:
* fp32: 1e-5. GELU is elementwise, so only dbias sums anything (over at most a few
  hundred rows, in fp32).
* fp16: 2e-3 and bf16: 1.6e-2, about two ulps of an output near ``size``. (The fused
  kernels do not round ``x + bias`` to the input dtype before the GELU, eager torch does:
  that makes fastattn more accurate, never less.)
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICE, available_backends
from fastattn import backends, reference
from fastattn.ops import gelu as gelu_ops
import tolerances
from tolerances import assert_close

BACKENDS = available_backends(("triton", "ext", "torch"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
APPROX = ["none", "tanh"]
# GELU is elementwise (nothing accumulates), so fp32 is held tighter.
FLOOR = {**tolerances.FLOOR, torch.float32: 1e-5}
SHAPES = [(1, 1), (7, 3), (33, 1000), (4, 4097)]


def _triton_kernels():
    from fastattn.kernels import gelu
    return gelu


def _inputs(rows, width, dtype, with_bias, scale=3.0, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(width, generator=g) * scale).to(DEVICE, bias_dtype or dtype)
    return x, (b.requires_grad_() if with_bias else None)


def _run(backend, x, b, approximate):
    with fastattn.use_backend(backend):
        y = (gelu_ops.gelu(x, approximate) if b is None
             else gelu_ops.bias_gelu(x, b, approximate))
    return y, _grads(y, x, b)


def _grads(y, x, b):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in (x, b) if t is not None]
    return torch.autograd.grad(y, leaves, dy.to(y.device, y.dtype))


def _eager(x, b, approximate, dtype):
    """y and grads of GELU(x + b) in ``dtype`` (float64: fastattn.reference, the truth)."""
    xe, be = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, b)]
    if dtype == torch.float64:
        y = reference.gelu(xe, approximate, be)
    else:
        y = F.gelu(xe if be is None else xe + be, approximate=approximate)
    return y, _grads(y, xe, be)


def _check_against_float64(backend, x, b, approximate, dtype):
    y, grads = _run(backend, x, b, approximate)
    y64, grads64 = _eager(x, b, approximate, torch.float64)
    ye, grads_e = _eager(x, None if b is None else b.to(dtype), approximate, dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64, "y", eager=ye, floor=FLOOR[dtype], min_size=1e-3)
    for name, got, ref, eag, leaf in zip(("dx", "dbias"), grads, grads64, grads_e, (x, b)):
        assert_close(got, ref, name, eager=eag, floor=FLOOR[dtype], min_size=1e-3)
        assert got.dtype == leaf.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["gelu", "bias_gelu"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_against_float64(backend, shape, approximate, with_bias, dtype):
    x, b = _inputs(*shape, dtype, with_bias)
    _check_against_float64(backend, x, b, approximate, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_bias_with_low_precision_input(backend, dtype):
    """An fp32 bias (master weights) with fp16/bf16 activations; dbias comes back fp32."""
    x, b = _inputs(20, 300, dtype, True, bias_dtype=torch.float32)
    _check_against_float64(backend, x, b, "tanh", dtype)


@pytest.mark.parametrize("scale", [1e4, 1e-4], ids=["large", "tiny"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_tiny_magnitudes(backend, approximate, scale):
    """|x| ~ 1e4 (tanh saturates, exp(−x²/2) underflows: no inf or nan may appear) and
    |x| ~ 1e-4 (gelu(x) ≈ x/2)."""
    x, b = _inputs(9, 300, torch.float32, True, scale=scale)
    _check_against_float64(backend, x, b, approximate, torch.float32)


def _strided(kind):
    """A (2, 5, 48) tensor with a non-contiguous layout."""
    g = torch.Generator().manual_seed(3)
    if kind == "transposed":
        return torch.randn(2, 48, 5, generator=g).transpose(1, 2).to(DEVICE)
    if kind == "row_sliced":  # unit last stride, row stride 96: the kernels read it as is
        return torch.randn(2, 5, 96, generator=g)[..., 10:58].to(DEVICE)
    return torch.randn(2, 5, 96, generator=g)[..., ::2].to(DEVICE)


@pytest.mark.parametrize("kind", ["transposed", "row_sliced", "col_strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_noncontiguous_input(backend, kind):
    """A (B, T, C) input, non-contiguous three ways, gives exactly the result of the same
    values laid out contiguously."""
    x = _strided(kind).requires_grad_()
    xc = x.detach().contiguous().requires_grad_()
    b = torch.randn(48, device=DEVICE, requires_grad=True)
    y, grads = _run(backend, x, b, "none")
    yc, grads_c = _run(backend, xc, b, "none")
    assert y.shape == (2, 5, 48) and y.is_contiguous()
    torch.testing.assert_close(y, yc, rtol=0, atol=0)
    for got, want in zip(grads, grads_c):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_f_gelu(backend, approximate):
    x = torch.randn(3, 4, 50, device=DEVICE)
    with fastattn.use_backend(backend):
        torch.testing.assert_close(gelu_ops.gelu(x, approximate),
                                   F.gelu(x, approximate=approximate))


@pytest.mark.parametrize("shape", [(), (0,), (0, 8), (4, 0)], ids=["0d", "empty", "0rows", "0cols"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_empty_inputs(backend, shape):
    """GELU is elementwise: a 0-dim tensor and tensors with no elements are fine."""
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    with fastattn.use_backend(backend):
        y = gelu_ops.gelu(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, F.gelu(x.detach()))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_with_no_rows(backend):
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    with fastattn.use_backend(backend):
        y = gelu_ops.bias_gelu(x, b)
    assert y.shape == (0, 8)
    _, db = torch.autograd.grad(y.sum(), (x, b))
    assert torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("with_bias", [False, True], ids=["gelu", "bias_gelu"])
@pytest.mark.parametrize("shape", [(7, 3), (300, 1000)], ids=["M7-N3", "M300-N1000"])
def test_outputs_are_fully_written(monkeypatch, shape, with_bias):
    """Every buffer the Triton launchers allocate starts as NaN: any element a kernel
    fails to write (a masked tail, a row block, a dbias partial row) shows up."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(_triton_kernels(), "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                dtype=dtype, device=device))
    x, b = _inputs(*shape, torch.bfloat16, with_bias)
    y, grads = _run("triton", x, b, "tanh")
    for t in (y, *grads):
        assert not t.isnan().any()


def test_backward_is_deterministic():
    """dbias is summed through per-program partial buffers in a fixed order, never with
    atomics, so two backward passes must agree bit for bit (flash-attention's race test).
    Several row programs each take several row blocks here."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    x, b = _inputs(700, 40, torch.float32, True)
    first = _run("triton", x, b, "none")[1]
    second = _run("triton", x, b, "none")[1]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("call, exc, match", [
    (lambda x: gelu_ops.gelu(x.double()), TypeError,
     r"input dtype must be float16, bfloat16 or float32, got torch.float64"),
    (lambda x: gelu_ops.gelu(x.long()), TypeError, r"input dtype must be .* got torch.int64"),
    (lambda x: gelu_ops.gelu([1.0]), TypeError, r"input must be a torch.Tensor, got list"),
    (lambda x: gelu_ops.gelu(x, "erf"), ValueError,
     r"approximate must be 'none' or 'tanh', got 'erf'"),
    (lambda x: gelu_ops.bias_gelu(x, torch.ones(8), "fast"), ValueError,
     r"approximate must be 'none' or 'tanh', got 'fast'"),
    (lambda x: gelu_ops.bias_gelu(x, None), TypeError, r"bias must be a torch.Tensor, got None"),
    (lambda x: gelu_ops.bias_gelu(x, torch.ones(5)), ValueError,
     r"bias shape must be \(8,\) \(input's last dim\), got \(5,\)"),
    (lambda x: gelu_ops.bias_gelu(x, torch.ones(4, 8)), ValueError,
     r"bias shape must be \(8,\) \(input's last dim\), got \(4, 8\)"),
    (lambda x: gelu_ops.bias_gelu(x.half(), torch.ones(8, dtype=torch.bfloat16)), TypeError,
     r"bias dtype must be input's dtype torch.float16 or float32, got torch.bfloat16"),
    (lambda x: gelu_ops.bias_gelu(x, torch.ones(8, device="meta")), ValueError,
     r"bias must be on input's device .*, got meta"),
    (lambda x: gelu_ops.bias_gelu(x[0, 0], torch.ones(1)), ValueError,
     r"input must have at least one dimension"),
])
def test_validation_errors(call, exc, match):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(exc, match=match):
        call(x)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, approximate):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both ops."""
    g = torch.Generator().manual_seed(5)
    x, dy = [torch.randn(6, 40, generator=g).to(DEVICE) for _ in range(2)]
    b = torch.randn(40, generator=g).to(DEVICE)
    fwd = torch.ops.fastattn.gelu_fwd.default
    bwd = torch.ops.fastattn.gelu_bwd.default
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), b.clone().requires_grad_(),
                                approximate, backend))
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), None, approximate, backend))
    torch.library.opcheck(bwd, (dy, x, b, approximate, backend))
    torch.library.opcheck(bwd, (dy, x, None, approximate, backend))
