"""SwiGLU / GEGLU (``fastattn.ops.swiglu``) on every backend against float64.

Tolerances (flash-attention's rule, ``tolerances.assert_close``): fastattn's max abs error
against the float64 reference may be at most 2× that of eager torch at the same dtype
(``F.silu(a) * b`` / ``F.gelu(a) * b``, gradients by autograd), plus a floor
``floor · (max |reference| + 1e-3)``:
* fp32: 1e-5. Every output element is a few fp32 operations on its own inputs, no sum.
* fp16: 2e-3 and bf16: 1.6e-2, about two ulps (``tolerances.FLOOR``). The kernels round
  once, eager torch after each op, so fastattn's error is the smaller one.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICE, available_backends
from fastattn import backends, reference
from fastattn.ops import swiglu as ops
import tolerances
from tolerances import assert_close

BACKENDS = available_backends(("triton", "torch"))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
FLOOR = {**tolerances.FLOOR, torch.float32: 1e-5}
SHAPES = [(1, 1), (7, 3), (33, 1000), (3, 1031)]
# (fastattn call, eager torch, float64 reference) per activation
ACTS = {
    "silu": (ops.swiglu, lambda a, b: F.silu(a) * b, reference.swiglu),
    "gelu": (ops.geglu, lambda a, b: F.gelu(a) * b, reference.geglu),
    "gelu_tanh": (lambda a, b=None: ops.geglu(a, b, "tanh"),
                  lambda a, b: F.gelu(a, approximate="tanh") * b,
                  lambda a, b=None: reference.geglu(a, b, "tanh")),
}


def _triton_kernels():
    from fastattn.kernels import swiglu
    return swiglu


def _randn(shape, dtype, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()


def _grads(y, leaves, seed=1):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(y, leaves, dy.to(y.device, y.dtype))


def _check(backend, act, a, b, dtype):
    """Output and gradients of the fastattn call against float64, eager as the yardstick.
    b None: a packs (gate, up) in its last dim."""
    fast, eager, ref = ACTS[act]
    leaves = [t for t in (a, b) if t is not None]
    with fastattn.use_backend(backend):
        y = fast(a, b)
    grads = _grads(y, leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    y64 = ref(*exact) if b is not None else ref(exact[0])
    grads64 = _grads(y64, exact)
    low = [t.detach().requires_grad_() for t in leaves]
    ye = eager(*low) if b is not None else eager(*low[0].chunk(2, dim=-1))
    grads_e = _grads(ye, low)
    assert y.dtype == a.dtype and y.shape == y64.shape and y.is_contiguous()
    assert_close(y, y64, "y", eager=ye, floor=FLOOR[dtype], min_size=1e-3)
    for i, (got, want, eag, leaf) in enumerate(zip(grads, grads64, grads_e, leaves)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_close(got, want, f"grad {i}", eager=eag, floor=FLOOR[dtype], min_size=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_tensors_against_float64(backend, shape, act, dtype):
    _check(backend, act, _randn(shape, dtype), _randn(shape, dtype, 1.0, seed=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_gate_up_against_float64(backend, act, dtype):
    """One (…, 2N) tensor, gate first (a fused gate_up projection); 2N = 2·517."""
    _check(backend, act, _randn((2, 5, 1034), dtype), None, dtype)


@pytest.mark.parametrize("scale", [1e4, 1e-4], ids=["large", "tiny"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_tiny_magnitudes(backend, act, scale):
    """|a| ~ 1e4: σ saturates and e^(−a) overflows to inf, which must give 0 or a, never
    NaN; |a| ~ 1e-4: silu(a) ≈ a/2."""
    _check(backend, act, _randn((9, 300), torch.float32, scale),
           _randn((9, 300), torch.float32, 1.0, seed=2), torch.float32)


@pytest.mark.parametrize("kind", ["transposed", "row_sliced", "col_strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, kind):
    """(B, T, N) inputs laid out three non-contiguous ways give exactly the result of the
    same values laid out contiguously."""
    g = torch.Generator().manual_seed(3)

    def strided():
        if kind == "transposed":
            return torch.randn(2, 48, 5, generator=g).transpose(1, 2).to(DEVICE)
        if kind == "row_sliced":
            return torch.randn(2, 5, 96, generator=g)[..., 10:58].to(DEVICE)
        return torch.randn(2, 5, 96, generator=g)[..., ::2].to(DEVICE)

    a, b = strided().requires_grad_(), strided().requires_grad_()
    ac, bc = (t.detach().contiguous().requires_grad_() for t in (a, b))
    with fastattn.use_backend(backend):
        y, yc = ops.swiglu(a, b), ops.swiglu(ac, bc)
    assert y.shape == (2, 5, 48) and y.is_contiguous()
    # The kernels read strided rows as they are: bitwise equal. Eager torch (the torch
    # backend) runs strided rows through its scalar loop and dense ones vectorised,
    # whose exp differs in the last ulp.
    tol = 0 if backend == "triton" else 1e-6
    for got, want in zip((y, *_grads(y, (a, b))), (yc, *_grads(yc, (ac, bc)))):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_silu_dropin_matches_f_silu(backend):
    """``silu`` (what ``enable()`` routes ``F.silu`` to): same values and gradient; a 0-dim
    and an empty tensor are fine (elementwise)."""
    for shape in [(3, 4, 50), (), (0, 8)]:
        x = _randn(shape, torch.float32)
        with fastattn.use_backend(backend):
            y = ops.silu(x)
        torch.testing.assert_close(y, F.silu(x.detach()))
        (dx,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(dx, torch.ops.aten.silu_backward(torch.ones_like(x), x))


def test_enable_routes_f_silu():
    """transformers' SiLUActivation calls ``F.silu``: under ``enable()`` it runs the op."""
    from routing import fastattn_ops
    x = torch.randn(4, 10, device=DEVICE)
    with fastattn.enable(), fastattn_ops() as ran:
        y = F.silu(x)
    assert ran["swiglu_fwd"] == 1
    torch.testing.assert_close(y, F.silu(x))


def test_silu_inplace_is_handed_to_torch_and_said_once():
    import fastattn._warnings as w
    w._SEEN.clear()
    x = torch.randn(5, device=DEVICE)
    want = F.silu(x)
    with pytest.warns(fastattn.FallbackWarning, match="inplace=True"):
        out = ops.silu(x, inplace=True)
    assert out is x
    torch.testing.assert_close(x, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for shape in [(0, 8), (4, 0)]:
        a, b = _randn(shape, torch.float32), _randn(shape, torch.float32)
        with fastattn.use_backend(backend):
            y = ops.swiglu(a, b)
        assert y.shape == shape
        da, db = torch.autograd.grad(y.sum(), (a, b))
        assert da.shape == shape and db.shape == shape


@pytest.mark.parametrize("packed", [False, True], ids=["two", "packed"])
@pytest.mark.parametrize("shape", [(7, 3), (300, 1000)], ids=["M7-N3", "M300-N1000"])
def test_outputs_are_fully_written(monkeypatch, shape, packed):
    """Every buffer the Triton launchers allocate starts as NaN: any element a kernel
    fails to write (a masked tail, a row block, one half of a packed gradient) shows up."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(_triton_kernels(), "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                dtype=dtype, device=device))
    m, n = shape
    a = _randn((m, 2 * n) if packed else shape, torch.bfloat16)
    b = None if packed else _randn(shape, torch.bfloat16, seed=2)
    with fastattn.use_backend("triton"):
        y = ops.swiglu(a, b)
    for t in (y, *_grads(y, [t for t in (a, b) if t is not None])):
        assert not t.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    """Elementwise, no reduction: two backward passes agree bit for bit."""
    a, b = _randn((70, 40), torch.float32), _randn((70, 40), torch.float32, seed=2)
    with fastattn.use_backend(backend):
        first = _grads(ops.swiglu(a, b), (a, b))
        second = _grads(ops.swiglu(a, b), (a, b))
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_torch_backend_kept_act_gives_the_recomputed_gradients():
    """The torch backend's backward gives the same gradients from a kept act(a) as from
    computing it again, and its forward skips act(a) unless asked to keep it."""
    a, b = _randn((6, 20), torch.float32), _randn((6, 20), torch.float32, seed=2)
    for activation, act_fn in (("silu", F.silu), ("gelu_tanh",
                                                  partial(F.gelu, approximate="tanh"))):
        y, act = ops._fwd(a.detach(), b.detach(), activation, False, True, "torch")
        torch.testing.assert_close(act, act_fn(a.detach()), rtol=0, atol=0)
        assert ops._fwd(a.detach(), b.detach(), activation, False, False,
                        "torch")[1].numel() == 0
        dy = torch.randn(6, 20)
        kept = ops._bwd(dy, a.detach(), b.detach(), act, activation, False, "torch")
        recomputed = ops._bwd(dy, a.detach(), b.detach(), None, activation, False, "torch")
        for x, z in zip(kept, recomputed):
            torch.testing.assert_close(x, z, rtol=0, atol=0)
    # Without b there is nothing to keep (the backward reads only a): y is act(a).
    y, act = ops._fwd(a.detach(), None, "silu", False, True, "torch")
    torch.testing.assert_close(y, F.silu(a.detach()), rtol=0, atol=0)
    assert act.numel() == 0


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_torch_backend_saves_what_its_backward_needs(activation, packed):
    """For the backward the torch backend keeps a and b, and GELU's act(a) (an erf costs
    more than storing it), not SiLU's (an exp costs less); outputs and gradients are
    eager's up to the last ulp."""
    a = _randn((6, 40 if packed else 20), torch.float32)
    b = None if packed else _randn((6, 20), torch.float32, seed=2)
    act_fn, call = ((F.silu, ops.swiglu) if activation == "silu" else (F.gelu, ops.geglu))
    saved = []
    with fastattn.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = call(a, b)
    gate, up = (a[:, :20], a[:, 20:]) if packed else (a, b)
    inputs = sorted(t.data_ptr() for t in (a, b) if t is not None)
    kept = sorted(t.data_ptr() for t in saved if t.data_ptr() in inputs)
    assert kept == inputs
    assert len(saved) == len(inputs) + (activation == "gelu")
    want = act_fn(gate) * up
    leaves = (a,) if packed else (a, b)
    dy = torch.randn(6, 20)
    for x, z in zip((y, *torch.autograd.grad(y, leaves, dy)),
                    (want, *torch.autograd.grad(want, leaves, dy))):
        torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-6)


def test_torch_backend_chunks_rows(monkeypatch):
    """Rows processed in several cache-sized chunks give the one-chunk result (up to the
    last ulp: a chunk boundary moves which elements eager torch's vector loop takes)."""
    a, b = _randn((37, 50), torch.float32), _randn((37, 50), torch.float32, seed=2)
    with fastattn.use_backend("torch"):
        y1 = ops.swiglu(a, b)
        g1 = _grads(y1, (a, b))
        monkeypatch.setattr(ops, "_CHUNK", 150)            # 3 rows per chunk
        y2 = ops.swiglu(a, b)
        g2 = _grads(y2, (a, b))
    for x, z in zip((y1, *g1), (y2, *g2)):
        torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("call, exc, match", [
    (lambda a: ops.swiglu(a.double(), a.double()), TypeError,
     r"a dtype must be float16, bfloat16 or float32, got torch.float64"),
    (lambda a: ops.swiglu([1.0], None), TypeError, r"a must be a torch.Tensor, got list"),
    (lambda a: ops.swiglu(a, a[:, :3]), ValueError,
     r"b shape must equal a's shape \(4, 8\), got \(4, 3\)"),
    (lambda a: ops.swiglu(a, a.half()), TypeError,
     r"b dtype must equal a's dtype torch.float32, got torch.float16"),
    (lambda a: ops.swiglu(a, torch.ones(4, 8, device="meta")), ValueError,
     r"b must be on a's device .*, got meta"),
    (lambda a: ops.swiglu(a, 2.0), TypeError, r"b must be a torch.Tensor or None, got float"),
    (lambda a: ops.swiglu(a[:, :7]), ValueError,
     r"a must have an even last dim .* got shape \(4, 7\)"),
    (lambda a: ops.swiglu(a[0, 0]), ValueError, r"a must have an even last dim .* shape \(\)"),
    (lambda a: ops.geglu(a, a, "erf"), ValueError,
     r"approximate must be 'none' or 'tanh', got 'erf'"),
    (lambda a: ops.silu(a.long()), TypeError,
     r"input dtype must be float16, bfloat16 or float32, got torch.int64"),
])
def test_validation_errors(call, exc, match):
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(exc, match=match):
        call(a)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake kernels, autograd registration and AOT dispatch of both ops, in the
    two-tensor, packed and no-gate forms."""
    g = torch.Generator().manual_seed(5)
    a, b, dy = [torch.randn(6, 40, generator=g).to(DEVICE) for _ in range(3)]
    fwd, bwd = torch.ops.fastattn.swiglu_fwd.default, torch.ops.fastattn.swiglu_bwd.default
    save = backend == "torch"
    for args in [(a, b, "silu", False, save), (a, None, "gelu_tanh", True, save),
                 (a, None, "silu", False, save)]:
        leaves = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t
                  for t in args]
        torch.library.opcheck(fwd, (*leaves, backend))
    act = F.silu(a) if save else None
    torch.library.opcheck(bwd, (dy, a, b, act, "silu", False, backend))
    torch.library.opcheck(bwd, (dy[:, :20], a, None, None, "gelu", True, backend))


# ----------------------------------------------------------------------------- modules


def test_swiglu_mlp_matches_transformers_llama_mlp():
    """``fastattn.nn.SwiGLUMLP`` loads a ``LlamaMLP``'s state dict as is and gives its
    output and gradients."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=24, intermediate_size=56, mlp_bias=True,
                                num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    theirs = llama.LlamaMLP(config).to(DEVICE)
    ours = fastattn.nn.SwiGLUMLP(24, 56, bias=True).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 24, device=DEVICE)
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(want)
    for p, q in zip(torch.autograd.grad(got, list(ours.parameters()), dy),
                    torch.autograd.grad(want, list(theirs.parameters()), dy)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_swiglu_module(activation):
    fast, eager, _ = ACTS[activation]
    module = fastattn.nn.SwiGLU(activation)
    a, b = torch.randn(3, 10, device=DEVICE), torch.randn(3, 10, device=DEVICE)
    torch.testing.assert_close(module(a, b), eager(a, b))
    x = torch.cat((a, b), dim=-1)
    torch.testing.assert_close(module(x), eager(a, b))
    assert repr(module) == f"SwiGLU(activation='{activation}')"
    with pytest.raises(ValueError, match=r"activation must be one of .*, got 'relu'"):
        fastattn.nn.SwiGLU("relu")
