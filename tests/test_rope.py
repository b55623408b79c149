"""Rotary position embedding (``fastattn.ops.rope``) on every backend against float64.

The float64 reference is ``fastattn.reference.rope`` on the same angles: the tables the
op was given, upcast, or, when the op computes them, ``position · inv_freq`` in float64.

Tolerances (flash-attention's rule, ``tolerances.assert_close``): the max abs error
against float64 may be at most 2× that of eager torch at the same dtype (the reference
formula run in that dtype on the same tables), plus ``floor · (max |reference| + 1)``:
* fp32: 1e-5. Each output is two products and a sum of fp32 numbers; only angles
  computed from positions add the fp32 rounding of ``position · inv_freq`` (positions
  here stay below 64, so below 1e-5 rad).
* fp16: 2e-3 and bf16: 1.6e-2, about two ulps (``tolerances.FLOOR``): the kernel rounds
  once, eager torch after every op.
"""
import pytest
import torch

import fastattn
from conftest import DEVICE, available_backends
from fastattn import backends, reference
from fastattn.ops import rope as ops
import tolerances
from tolerances import assert_close

BACKENDS = available_backends(("triton", "torch"))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
FLOOR = {**tolerances.FLOOR, torch.float32: 1e-5}
LAYOUTS = [pytest.param(False, id="neox"), pytest.param(True, id="gptj")]


def _triton_kernels():
    from fastattn.kernels import rope
    return rope


def _qk(b, h, hkv, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(b, hkv, t, d, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k


def _angles(pos, r, base=10000.0):
    """(B|1, T, R/2) float64 angles of integer positions (B|1, T)."""
    inv_freq = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    return pos.double()[..., None] * inv_freq.to(pos.device)


def _full(half, interleaved):
    """transformers' full-width table of a (…, R/2) one: halves repeated (NeoX) or each
    angle twice in a row (GPT-J)."""
    return half.repeat_interleave(2, -1) if interleaved else torch.cat((half, half), -1)


def _grads(outs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, leaves, dys)


def _check(out, leaves, c64, s64, interleaved):
    """out (q_out, k_out) of leaves (q, k), and their gradients, against the reference
    in float64 on angles with cosines c64 and sines s64 (B|1, T, R/2)."""
    grads = _grads(out, leaves)
    dtype = leaves[0].dtype
    exact = [x.detach().double().requires_grad_() for x in leaves]
    ref = [reference.rope(x, c64, s64, interleaved) for x in exact]
    low = [x.detach().requires_grad_() for x in leaves]
    eager = [reference.rope(x, c64.to(dtype), s64.to(dtype), interleaved) for x in low]
    for name, got, want, eag in zip(("q", "k"), out, ref, eager):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, name, eager=eag, floor=FLOOR[dtype])
    for name, got, want, eag in zip(("dq", "dk"), grads, _grads(ref, exact), _grads(eager, low)):
        assert_close(got, want, name, eager=eag, floor=FLOOR[dtype])


SHAPES = [(1, 2, 1, 1, 16), (2, 3, 1, 17, 40), (1, 4, 2, 33, 64)]   # B, H, Hkv, T, D


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("shape", SHAPES, ids=["B{}-H{}-Hkv{}-T{}-D{}".format(*s) for s in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_per_position_against_float64(backend, shape, partial, interleaved, dtype):
    """cos/sin (B, T, R) full width, as transformers' rotary embedding returns them, in
    q's dtype; partial rotary turns the first R = D/2 (rounded to even) dims only."""
    b, h, hkv, t, d = shape
    r = (d // 2) & ~1 if partial else d
    q, k = _qk(b, h, hkv, t, d, dtype)
    pos = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(4))
    theta = _angles(pos, r)
    cos, sin = _full(theta.cos(), interleaved).to(dtype), _full(theta.sin(), interleaved).to(dtype)
    with fastattn.use_backend(backend):
        out = ops.rope(q, k, cos, sin, interleaved=interleaved)
    c64 = cos.double()[..., 0:r:2] if interleaved else cos.double()[..., :r // 2]
    s64 = sin.double()[..., 0:r:2] if interleaved else sin.double()[..., :r // 2]
    _check(out, (q, k), c64, s64, interleaved)


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("source", ["table+ids", "table+offset", "base+ids", "base+offset",
                                    "inv_freq", "half-width"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_angle_sources_against_float64(backend, source, interleaved):
    """Every way to give the angles: a (P, R) table indexed by position ids or by
    ``offset + arange(T)``, positions with a base θ or with inv_freq, a (1, T, R/2)
    half-width table broadcast over the batch."""
    b, h, hkv, t, d, r = 2, 2, 1, 9, 24, 16
    q, k = _qk(b, h, hkv, t, d, torch.float32)
    ids = torch.randint(0, 40, (b, t), generator=torch.Generator().manual_seed(4))
    offset = 7
    arange = torch.arange(offset, offset + t)[None]
    base = 500.0
    table = _angles(torch.arange(40)[None], r)[0]                       # (40, R/2)
    kwargs = {"rotary_dim": r, "interleaved": interleaved}
    if source == "table+ids":
        args = (_full(table.cos(), interleaved).float(), _full(table.sin(), interleaved).float())
        pos = ids
        kwargs["position_ids"] = ids
    elif source == "table+offset":
        args, pos = (table.cos().float(), table.sin().float()), arange
        kwargs["offset"] = offset
    elif source == "base+ids":
        args, pos = (), ids
        kwargs.update(position_ids=ids, base=base)
    elif source == "base+offset":
        args, pos = (), arange
        kwargs.update(offset=offset, base=base)
    elif source == "inv_freq":
        args, pos = (), ids
        inv_freq = 1.0 / base ** (torch.arange(0, r, 2).float() / r)
        kwargs.update(position_ids=ids, inv_freq=inv_freq.to(DEVICE))
        kwargs.pop("rotary_dim")
    else:
        half = _angles(arange - offset, r)
        args, pos = (half.cos().float(), half.sin().float()), arange - offset
    args = tuple(x.to(DEVICE) for x in args)
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"].to(DEVICE)
    with fastattn.use_backend(backend):
        out = ops.rope(q, k, *args, **kwargs)
    theta = _angles(pos, r, base if source in ("base+ids", "base+offset", "inv_freq") else 1e4)
    _check(out, (q, k), theta.cos().to(DEVICE), theta.sin().to(DEVICE), interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_offset_matches_the_full_sequence(backend):
    """Rotating the one new position at offset T−1 gives the last row of rotating all T."""
    q, k = _qk(1, 2, 1, 6, 32, torch.float32)
    with fastattn.use_backend(backend), torch.no_grad():
        full_q, full_k = ops.rope(q, k)
        step_q, step_k = ops.rope(q[:, :, -1:], k[:, :, -1:], offset=5)
    torch.testing.assert_close(step_q, full_q[:, :, -1:], rtol=0, atol=0)
    torch.testing.assert_close(step_k, full_k[:, :, -1:], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_apply_rotary_pos_emb(backend):
    """transformers' Llama rotary embedding and ``apply_rotary_pos_emb``: the same
    outputs and gradients, with (B, H, T, D) views (``unsqueeze_dim=1``) and (B, T, H, D)
    tensors (``unsqueeze_dim=2``)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randn(2, 7, 4, 16, device=DEVICE)                         # (B, T, H, D)
    kx = torch.randn(2, 7, 2, 16, device=DEVICE)
    cos, sin = llama.LlamaRotaryEmbedding(config).to(DEVICE)(x, torch.arange(7)[None].to(DEVICE))
    for dim in (1, 2):
        q = (x.transpose(1, 2) if dim == 1 else x).clone().requires_grad_()
        k = (kx.transpose(1, 2) if dim == 1 else kx).clone().requires_grad_()
        want = llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=dim)
        with fastattn.use_backend(backend):
            got = ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=dim)
        for g, w in zip((*got, *_grads(got, (q, k))), (*want, *_grads(want, (q, k)))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_keep_their_layout(backend):
    """q and k as views of one fused (B, T, (H + 2Hkv)·D) projection: read as they are,
    outputs laid out like the inputs (``empty_like``), values those of contiguous copies."""
    b, t, h, hkv, d = 2, 5, 3, 1, 16
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, device=DEVICE)
    q = qkv[..., :h * d].view(b, t, h, d).transpose(1, 2).requires_grad_()   # not a leaf view
    k = qkv[..., h * d:(h + hkv) * d].view(b, t, hkv, d).transpose(1, 2)
    cos = torch.randn(1, t, d, device=DEVICE)
    sin = torch.randn(1, t, d, device=DEVICE)
    with fastattn.use_backend(backend):
        qo, ko = ops.rope(q, k, cos, sin)
        qc, kc = ops.rope(q.contiguous(), k.contiguous(), cos, sin)
    torch.testing.assert_close(qo, qc, rtol=0, atol=0)
    torch.testing.assert_close(ko, kc, rtol=0, atol=0)
    assert qo.stride() == torch.empty_like(q).stride()


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_matches_out_of_place(backend, interleaved):
    """``inplace=True`` rewrites q and k (strided views of one buffer here) and returns
    them; the values are those of the out-of-place call, pass-through dims untouched."""
    b, t, h, hkv, d, r = 1, 11, 2, 1, 24, 16
    qkv = torch.randn(b, t, (h + hkv) * d, device=DEVICE)
    q = qkv[..., :h * d].view(b, t, h, d).transpose(1, 2)
    k = qkv[..., h * d:].view(b, t, hkv, d).transpose(1, 2)
    with fastattn.use_backend(backend):
        want_q, want_k = ops.rope(q, k, rotary_dim=r, interleaved=interleaved)
        with torch.no_grad():
            got_q, got_k = ops.rope(q, k, rotary_dim=r, interleaved=interleaved, inplace=True)
    assert got_q is q and got_k is k
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_alone(backend):
    """k=None rotates q alone and returns (q_out, None); the gradient flows to q."""
    q, _ = _qk(1, 3, 1, 5, 16, torch.float32)
    with fastattn.use_backend(backend):
        qo, ko = ops.rope(q, None, offset=2)
    assert ko is None
    theta = _angles(torch.arange(2, 7)[None], 16).to(DEVICE)
    (dq,) = _grads((qo,), (q,))
    exact = q.detach().double().requires_grad_()
    ref = reference.rope(exact, theta.cos(), theta.sin())
    assert_close(qo, ref, "q", floor=1e-5)
    assert_close(dq, _grads((ref,), (exact,))[0], "dq", floor=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_output_only(backend):
    """With only q_out (or only k_out) in the loss, the other input gets no gradient
    (None, as eager gives), and no zero gradient is rotated for it."""
    q, k = _qk(1, 2, 1, 7, 16, torch.float32)
    with fastattn.use_backend(backend):
        qo, ko = ops.rope(q, k)
        dq, dk = torch.autograd.grad(qo.sum(), (q, k), allow_unused=True)
        qo, ko = ops.rope(q, k)
        dq2, dk2 = torch.autograd.grad(ko.sum(), (q, k), allow_unused=True)
    assert dk is None and dq2 is None
    theta = _angles(torch.arange(7)[None], 16).to(DEVICE)
    for got, x in ((dq, q), (dk2, k)):
        exact = x.detach().double().requires_grad_()
        (want,) = torch.autograd.grad(reference.rope(exact, theta.cos(), theta.sin()).sum(), exact)
        assert_close(got, want, "grad", floor=1e-5)


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_outputs_are_fully_written(monkeypatch, partial):
    """Outputs start as NaN: a masked tail of positions, a head of k, a pass-through dim
    or a gradient the kernel fails to write shows up."""
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(_triton_kernels(), "_empty_like",
                        lambda x: torch.full_like(x, float("nan")))
    q, k = _qk(2, 3, 2, 37, 40, torch.bfloat16)
    with fastattn.use_backend("triton"):
        out = ops.rope(q, k, rotary_dim=24 if partial else None)
    for x in (*out, *_grads(out, (q, k))):
        assert not x.isnan().any()


def test_backward_is_deterministic():
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)
    q, k = _qk(1, 2, 1, 19, 32, torch.float32)
    with fastattn.use_backend("triton"):
        first = _grads(ops.rope(q, k), (q, k))
        second = _grads(ops.rope(q, k), (q, k))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- validation


def _bad(**kw):
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    args = {"q": q, "k": k, **kw}
    return lambda: ops.rope(**args)


@pytest.mark.parametrize("call, exc, match", [
    (_bad(q=[1.0]), TypeError, r"q must be a torch.Tensor, got list"),
    (_bad(q=torch.randn(4, 6, 16)), ValueError,
     r"q must be 4-D \(B, H, T, D\), got shape \(4, 6, 16\)"),
    (_bad(q=torch.randn(2, 4, 6, 16).double()), TypeError,
     r"q dtype must be float16, bfloat16 or float32, got torch.float64"),
    (_bad(q=torch.randn(1, 1, 1, 514), k=None), ValueError,
     r"head dim must be at most 512, got 514"),
    (_bad(k=torch.randn(2, 2, 5, 16)), ValueError,
     r"k must be \(B, Hkv, T, D\) = \(2, Hkv, 6, 16\) as q \(2, 4, 6, 16\), "
     r"got shape \(2, 2, 5, 16\)"),
    (_bad(k=torch.randn(2, 2, 6, 16).half()), TypeError,
     r"k dtype must equal q's dtype torch.float32, got torch.float16"),
    (_bad(cos=torch.randn(1, 6, 16)), ValueError, r"cos and sin must be given together"),
    (_bad(cos=torch.randn(1, 6, 16), sin=torch.randn(1, 6, 8)), ValueError,
     r"sin shape must equal cos's \(1, 6, 16\), got \(1, 6, 8\)"),
    (_bad(cos=torch.ones(1, 6, 16, dtype=torch.int32), sin=torch.ones(1, 6, 16, dtype=torch.int32)),
     TypeError, r"cos dtype must be a floating point dtype, got torch.int32"),
    (_bad(cos=torch.randn(1, 6, 18), sin=torch.randn(1, 6, 18)), ValueError,
     r"rotary dim must be even and in \[2, head dim 16\], got 18"),
    (_bad(cos=torch.randn(1, 6, 6), sin=torch.randn(1, 6, 6), rotary_dim=16), ValueError,
     r"cos width must be rotary_dim=16 or rotary_dim/2=8, got 6"),
    (_bad(cos=torch.randn(3, 6, 16), sin=torch.randn(3, 6, 16)), ValueError,
     r"cos shape must be \(2 or 1, 6, width\)"),
    (_bad(cos=torch.randn(1, 6, 16), sin=torch.randn(1, 6, 16), offset=2), ValueError,
     r"position_ids and offset index a 2-D \(positions, width\) table"),
    (_bad(cos=torch.randn(8, 16), sin=torch.randn(8, 16), offset=3), ValueError,
     r"offset must be an int in \[0, 2\] for 6 positions in a table of 8, got 3"),
    (_bad(cos=torch.randn(2, 1, 6, 16), sin=torch.randn(2, 1, 6, 16)), ValueError,
     r"cos must be 3-D \(B or 1, T, width\) or 2-D \(positions, width\)"),
    (_bad(cos=torch.randn(1, 6, 16, requires_grad=True), sin=torch.randn(1, 6, 16)), ValueError,
     r"cos must not require grad"),
    (_bad(position_ids=torch.zeros(2, 6)), TypeError, r"position_ids must be an integer tensor"),
    (_bad(position_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError,
     r"position_ids shape must be \(2, 6\) or \(1, 6\), got \(2, 5\)"),
    (_bad(position_ids=torch.zeros(2, 6, dtype=torch.long), offset=1), ValueError,
     r"offset must be 0 with position_ids"),
    (_bad(offset=-1), ValueError, r"offset must be a non-negative int, got -1"),
    (_bad(rotary_dim=7), ValueError, r"rotary dim must be even and in \[2, head dim 16\], got 7"),
    (_bad(base=0.0), ValueError, r"base must be positive, got 0.0"),
    (_bad(inv_freq=torch.ones(4), rotary_dim=16), ValueError,
     r"inv_freq length must be rotary_dim/2=8, got 4"),
    (_bad(q=torch.randn(2, 4, 6, 16, requires_grad=True), inplace=True), ValueError,
     r"inplace=True needs q and k outside autograd"),
    (_bad(q=torch.randn(1, 4, 6, 16).expand(2, 4, 6, 16), inplace=True), ValueError,
     r"inplace=True cannot write q: it has stride 0"),
    (lambda: ops.apply_rotary_pos_emb(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                                      torch.randn(1, 3, 8), torch.randn(1, 3, 8), 3),
     ValueError, r"unsqueeze_dim must be 1 \(\(B, H, T, D\) inputs\) or 2"),
    (lambda: ops.apply_rotary_pos_emb(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                                      torch.randn(3, 8), torch.randn(3, 8)),
     ValueError, r"cos must be 3-D \(B, T, rotary_dim\)"),
])
def test_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_inplace_same_memory_is_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="inplace=True needs q and k in different memory"):
        ops.rope(q, q, inplace=True)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake kernels, autograd registration and AOT dispatch of the three ops."""
    q, k = (x.detach() for x in _qk(1, 2, 1, 5, 16, torch.float32))
    c, s = torch.randn(1, 5, 6, device=DEVICE), torch.randn(1, 5, 6, device=DEVICE)
    fwd = torch.ops.fastattn.rope_fwd.default
    torch.library.opcheck(fwd, (q.clone().requires_grad_(), k.clone().requires_grad_(),
                                c, s, False, backend))
    torch.library.opcheck(fwd, (q.clone().requires_grad_(), None, c, s, True, backend))
    torch.library.opcheck(torch.ops.fastattn.rope_bwd.default, (q, k, c, s, True, backend))
    torch.library.opcheck(torch.ops.fastattn.rope_.default, (q.clone(), k.clone(), c, s,
                                                             False, backend))
