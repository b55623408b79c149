"""The attention op (``fastattn.flash_attention``) on every backend against float64.

Tolerances: fp32 backends accumulate in fp32, so they stay within 1e-4 of the float64
result (scaled by the magnitude of the values). For fp16/bf16 we follow flash-attention's
rule: fastattn's max error may be at most 2x that of eager torch at the same dtype (the
textbook attention run in that dtype), plus a small floor for cases where eager torch
happens to round well.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from conftest import DEVICE, available_backends
from fastattn import reference
from fastattn.ops import _attention_torch
from tolerances import assert_close, assert_within, attention_rounding_bound

BACKENDS = available_backends(("triton", "torch"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (causal, B, H, Hkv, Tq, Tk, D): odd lengths, Tq != Tk both ways, GQA/MQA, head dims.
CASES = [
    (True, 1, 2, 2, 1, 1, 16),
    (True, 2, 2, 2, 17, 17, 40),
    (False, 1, 2, 2, 97, 97, 64),
    (True, 1, 2, 2, 128, 128, 80),
    (True, 1, 4, 2, 33, 33, 96),
    (True, 1, 4, 1, 1, 77, 64),
    (True, 1, 2, 2, 20, 50, 128),
    (True, 1, 2, 2, 50, 20, 160),
    (False, 1, 2, 1, 30, 45, 256),
    (False, 1, 8, 8, 9, 9, 32),
]


def _inputs(b, h, hkv, tq, tk, d, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g) * scale
    k = torch.randn(b, hkv, tk, d, generator=g) * scale
    v = torch.randn(b, hkv, tk, d, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def _reference(q, k, v, do, causal, dtype=torch.float64):
    """Output, lse and grads of the textbook attention run in ``dtype``."""
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o, lse = reference.attention(*xs, causal=causal)
    grads = torch.autograd.grad(o, xs, do.to(dtype))
    return o, lse, grads


def _run(backend, q, k, v, causal, **kw):
    with fastattn.use_backend(backend):
        return fastattn.flash_attention(q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[
    f"{'causal' if c[0] else 'full'}-B{c[1]}H{c[2]}kv{c[3]}-Tq{c[4]}Tk{c[5]}-D{c[6]}" for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_against_float64(backend, case, dtype):
    causal, b, h, hkv, tq, tk, d = case
    q, k, v = _inputs(b, h, hkv, tq, tk, d, dtype)
    o, lse = _run(backend, q, k, v, causal, return_lse=True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)

    ro, rlse, rgrads = _reference(q, k, v, do, causal)
    eo, _, egrads = _reference(q, k, v, do, causal, dtype) if dtype != torch.float32 else (
        None, None, (None,) * 3)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (b, h, tq) and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(o, ro, "out", eager=eo)
    seen = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key must have lse -inf"
    assert (lse[seen].double() - rlse[seen]).abs().max() <= 1e-3 if seen.any() else True
    for name, g, rg, eg in zip("qkv", grads, rgrads, egrads):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_close(g, rg, f"d{name}", eager=eg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero(backend):
    """Causal with Tq > Tk: the first Tq - Tk rows see no key; output 0, no NaN grads."""
    q, k, v = _inputs(1, 2, 2, 24, 8, 32, torch.float32)
    o, lse = _run(backend, q, k, v, True, return_lse=True)
    assert torch.equal(o[:, :, :16], torch.zeros_like(o[:, :, :16]))
    assert torch.isneginf(lse[:, :, :16]).all() and torch.isfinite(lse[:, :, 16:]).all()
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert torch.equal(dq[:, :, :16], torch.zeros_like(dq[:, :, :16]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_scores(backend):
    """Scores of about ±1e4 must not overflow the online softmax, and lose no more
    accuracy than the fp32 rounding of such scores allows (the elementwise bound of
    ``tolerances.attention_rounding_bound``; a fixed 1e-4 failed on a fresh clone)."""
    q, k, v = _inputs(1, 2, 2, 40, 40, 64, torch.float32, scale=60.0)
    o = _run(backend, q, k, v, True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, _, rgrads = _reference(q, k, v, do, True)
    s = (q.detach().double() @ k.detach().double().transpose(-1, -2)) / 8
    assert s.abs().max() > 5e3
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    bounds = attention_rounding_bound(q.detach(), k.detach(), v.detach(), do, True, 64 ** -0.5)
    assert_within(o, ro, bounds["out"], "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_within(g, rg, bounds[name], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_odd_length(backend):
    if backend == "triton" and INTERPRET:
        pytest.skip("T=1025 is too slow for the Triton interpreter (kernel tests cover T=300)")
    q, k, v = _inputs(1, 2, 1, 1025, 1025, 64, torch.float32)
    o = _run(backend, q, k, v, True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, _, rgrads = _reference(q, k, v, do, True)
    assert_close(o, ro, "out")
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg, "grad")


def _noncontiguous_views(kind, b=2, t=19, h=4, d=32):
    g = torch.Generator().manual_seed(1)
    if kind == "transposed":   # (B, T, H, D) tensors viewed as (B, H, T, D)
        return [torch.randn(b, t, h, d, generator=g).transpose(1, 2) for _ in range(3)]
    if kind == "packed_qkv":   # slices of one (B, T, 3, H, D) projection output
        qkv = torch.randn(b, t, 3, h, d, generator=g)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    if kind == "expanded_kv":  # one KV head broadcast to every query head (stride 0)
        q = torch.randn(b, h, t, d, generator=g)
        k, v = (torch.randn(b, 1, t, d, generator=g).expand(b, h, t, d) for _ in range(2))
        return [q, k, v]
    if kind == "sliced":       # every other position of a longer sequence, a head-dim slice
        return [torch.randn(b, h, 2 * t, d + 8, generator=g)[:, :, ::2, 4:4 + d]
                for _ in range(3)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["transposed", "packed_qkv", "expanded_kv", "sliced"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_match_contiguous(backend, kind):
    views = [x.to(DEVICE).requires_grad_() for x in _noncontiguous_views(kind)]
    assert not all(x.is_contiguous() for x in views)
    dense = [x.detach().contiguous().requires_grad_() for x in views]
    o = _run(backend, *views, True)
    od = _run(backend, *dense, True)
    do = torch.randn_like(o).transpose(1, 2).contiguous().transpose(1, 2)  # strided dO too
    grads = torch.autograd.grad(o, views, do)
    dgrads = torch.autograd.grad(od, dense, do.contiguous())
    torch.testing.assert_close(o, od, atol=1e-6, rtol=1e-5)
    for g, dg in zip(grads, dgrads):
        torch.testing.assert_close(g, dg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    """GQA dK/dV sum over query heads; a race (atomics) would make reruns differ bitwise."""
    q, k, v = _inputs(1, 4, 2, 45, 45, 64, torch.float32)
    o = _run(backend, q, k, v, True)
    do = torch.randn_like(o)
    first = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [{}, {"window": (7, 3), "softcap": 3.0}])
def test_nondeterministic_backward_matches_float64(backend, variant, monkeypatch):
    """deterministic=False reaches the backend (the Triton kernels' one-pass atomic-dQ
    backward) and its gradients match float64 as the default path's do."""
    seen = []
    module = _attention_torch
    if backend == "triton":
        from fastattn.kernels import flash_attention as module
    bwd = module.attn_bwd
    monkeypatch.setattr(module, "attn_bwd",
                        lambda *a, **kw: seen.append(kw["deterministic"]) or bwd(*a, **kw))
    q, k, v = _inputs(1, 4, 2, 37, 45, 40, torch.float32)
    o = _run(backend, q, k, v, True, deterministic=False, **variant)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    assert seen == [False]
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*xs, causal=True, **variant)[0]
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, xs, do.double())):
        assert_close(g, r, f"d{name}")


def test_deterministic_must_be_a_bool():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(TypeError, match=r"deterministic must be a bool, got 'no'"):
        fastattn.flash_attention(q, k, v, deterministic="no")


def test_custom_scale_and_lse_is_detached():
    q, k, v = _inputs(1, 2, 2, 10, 10, 16, torch.float32)
    o, lse = fastattn.flash_attention(q, k, v, causal=True, scale=0.3, return_lse=True)
    ro, rlse = reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rlse, atol=1e-5, rtol=1e-5)
    assert not lse.requires_grad and o.requires_grad


@pytest.mark.parametrize("block", [7, 64])
@pytest.mark.parametrize("causal,tq,tk", [(True, 50, 50), (True, 13, 50), (True, 50, 13),
                                          (False, 50, 31)])
def test_blocked_torch_path(block, causal, tq, tk):
    """The device-generic blocked path (used off CPU, and on CPU for causal Tq != Tk)."""
    q, k, v = (x.detach() for x in _inputs(2, 4, 2, tq, tk, 24, torch.float32))
    o, lse = _attention_torch._blocked_fwd(q, k, v, causal, 0.2, block=block)
    ro, rlse = reference.attention(q.double(), k.double(), v.double(), causal, 0.2)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    seen = torch.isfinite(rlse)
    torch.testing.assert_close(lse.double()[seen], rlse[seen], atol=1e-5, rtol=1e-5)
    do = torch.randn_like(o)
    grads = _attention_torch._blocked_bwd(do, q, k, v, o, lse, causal, 0.2, block=block)
    _, _, rgrads = _reference(q, k, v, do, causal)
    # _reference uses the default scale: recompute with 0.2 for the gradients.
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    rgrads = torch.autograd.grad(reference.attention(*xs, causal, 0.2)[0], xs, do.double())
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), rg, atol=1e-5, rtol=1e-5)


# --- bad input: a specific exception naming the argument, its value and what is allowed ---

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 4, 8, 16), _t(2, 4, 8), _t(2, 4, 8, 16)), {}, ValueError,
     r"k must have 4 dimensions .* got shape \(2, 4, 8\)"),
    ((_t(2, 4, 8, 16).int(), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, TypeError,
     r"q dtype must be one of float16, bfloat16, float32, got torch.int32"),
    ((_t(2, 4, 8, 16, dtype=torch.float64),) * 3, {}, TypeError, r"got torch.float64"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16, dtype=torch.float16), _t(2, 4, 8, 16)), {}, TypeError,
     r"q, k, v must share one dtype"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 9, 16)), {}, ValueError,
     r"k and v must have the same shape, got k \(2, 4, 8, 16\), v \(2, 4, 9, 16\)"),
    ((_t(2, 4, 8, 16), _t(3, 4, 8, 16), _t(3, 4, 8, 16)), {}, ValueError,
     r"k batch size must equal q batch size 2, got 3"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 32), _t(2, 4, 8, 32)), {}, ValueError,
     r"k head dim must equal q head dim 16, got 32"),
    ((_t(2, 4, 8, 16), _t(2, 3, 8, 16), _t(2, 3, 8, 16)), {}, ValueError,
     r"k/v heads must divide q heads 4 .*got 3"),
    ((_t(2, 4, 8, 264),) * 3, {}, ValueError,
     r"head dim must be any size from 1 to 256, got 264"),
    ((_t(2, 4, 8, 16),) * 3, {"window": (3,)}, ValueError,
     r"window must be a pair \(left, right\) of ints >= -1 .* got \(3,\)"),
    ((_t(2, 4, 8, 16),) * 3, {"window": (-2, 0)}, ValueError, r"got \(-2, 0\)"),
    ((_t(2, 4, 8, 16),) * 3, {"softcap": -1.0}, ValueError,
     r"softcap must be a finite float >= 0 \(0: no softcap\), got -1.0"),
    ((_t(2, 4, 8, 16),) * 3, {"dropout_p": 1.0}, ValueError,
     r"dropout_p must be a float in \[0, 1\), got 1.0"),
    ((_t(2, 4, 8, 16),) * 3, {"alibi": torch.ones(3)}, ValueError,
     r"alibi_slopes shape must be \(4,\) or \(2, 4\) .* got \(3,\)"),
    ((_t(2, 4, 8, 16),) * 3, {"alibi": torch.ones(4, dtype=torch.float16)}, TypeError,
     r"alibi_slopes dtype must be float32, got torch.float16"),
    ((_t(2, 4, 0, 16),) * 3, {}, ValueError, r"q is empty \(shape \(2, 4, 0, 16\)\)"),
    ((_t(2, 4, 8, 16), _t(2, 4, 0, 16), _t(2, 4, 0, 16)), {}, ValueError, r"k is empty"),
    (([1.0], _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, TypeError,
     r"q must be a torch.Tensor, got list"),
    ((_t(2, 4, 8, 16),) * 3, {"scale": float("nan")}, ValueError,
     r"scale must be a finite float or None, got nan"),
])
def test_bad_input_is_a_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastattn.flash_attention(*args, **kwargs)


def test_mismatched_devices_are_a_clear_error():
    q = torch.randn(1, 2, 8, 16, device="meta")
    k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got q meta"):
        fastattn.flash_attention(q, k, v)


# --- backend selection ---

def test_backend_selection_errors_are_clear():
    q = k = v = torch.randn(1, 1, 4, 16)
    with pytest.raises(fastattn.BackendUnavailableError,
                       match=r"backend 'ext' does not implement flash_attention"):
        with fastattn.use_backend("ext"):
            fastattn.flash_attention(q, k, v)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        with fastattn.use_backend("cuda"):
            pass


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU message")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, fastattn
        q = torch.randn(1, 1, 4, 16)
        try:
            with fastattn.use_backend("triton"):
                fastattn.flash_attention(q, q, q)
        except fastattn.BackendUnavailableError as e:
            print(e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "backend 'triton' (forced by use_backend()/FASTATTN_BACKEND) cannot run" in out
    assert "TRITON_INTERPRET=1" in out


def test_bad_backend_environment_variable_is_a_clear_error():
    env = dict(os.environ, FASTATTN_BACKEND="fast")
    r = subprocess.run([sys.executable, "-c", "import fastattn"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert "FASTATTN_BACKEND must be one of ('triton', 'ext', 'torch'), got 'fast'" in r.stderr


# --- torch.library integration ---

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "variants", "varlen"])
def test_opcheck(backend, variant):
    """The custom ops' schema, fake kernels and autograd registration agree with the real
    ones, for the plain call and with every variant argument set."""
    q, k, v = _inputs(1, 4, 2, 9, 12, 16, torch.float32)
    # (cu_seqlens_q, cu_seqlens_k, alibi, max_q, max_k, causal, left, right, softcap,
    #  dropout_p, seed, offset, scale, backend, deterministic)
    args = [None, None, None, 0, 0, True, -1, 0, 0.0, 0.0, 0, 0, 0.25, backend, True]
    if variant == "variants":
        args[2] = torch.rand(1, 4)
        args[6:12] = [5, 0, 2.0, 0.25, 1234, 7]
        args[-1] = False                    # the one-pass atomic backward on triton
    elif variant == "varlen":
        q, k, v = (x.detach()[0].transpose(0, 1).requires_grad_() for x in (q, k, v))
        args[:5] = [torch.tensor([0, 4, 9], dtype=torch.int32),
                    torch.tensor([0, 5, 12], dtype=torch.int32), None, 5, 7]
    fwd = torch.ops.fastattn.flash_attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, *args))
    o, lse = fwd(q, k, v, *args)
    do = torch.randn_like(o)
    bwd = torch.ops.fastattn.flash_attention_bwd.default
    torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), o.detach(),
                                lse.detach(), *args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_gradient_sums_accumulate_in_fp32_on_cpu(dtype):
    """dV of 339 queries on one key is a sum of 339 rows: summed in fp16/bf16 (PyTorch's
    reduced-precision CPU kernel) it came out 0.25 off in bf16 (flash-attn's test
    ``splitkv``); summed in fp32 and rounded once it is within one rounding of exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, t, 40, generator=g).to(dtype).requires_grad_()
               for t in (339, 1, 1))
    do = torch.randn(1, 2, 339, 40, generator=g).to(dtype)
    with fastattn.use_backend("torch"):
        dv = torch.autograd.grad(fastattn.flash_attention(q, k, v), v, do)[0]
    exact = do.double().sum(dim=2, keepdim=True)             # P = 1: dV = Σ_i dO_i
    assert ((dv.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + 1e-6).all()
