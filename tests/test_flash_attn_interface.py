"""flash-attn's public functions (``fastattn.flash_attn_interface``) and the attention op
with every variant, on each backend, against the float64 reference.

The backends' own variant tests (``test_flash_attention_variants_kernels.py``,
``test_attention_torch_variants.py``) cover the maths case by case below the op layer;
here the public functions are held to flash-attn's signatures, layouts and semantics:
a seeded covering sample in the spirit of flash-attn's own test grid (head dims not a
multiple of 8, Tq != Tk, MHA/GQA/MQA, causal, local windows, softcap, ALiBi), the
packed and varlen forms, dropout reproducibility, S_dmask, and SDPA's key-padding masks.

Tolerances: flash-attn's rule (``tolerances.assert_close``): at most 2× the error of
eager torch in the same dtype plus a floor per dtype; fp32 is held to the floor alone.
"""
import inspect
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICE, available_backends
from fastattn import flash_attn_interface as fai
from fastattn import reference
from fastattn._warnings import FallbackWarning
from fastattn.ops import _philox
from tolerances import assert_close

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(params=available_backends(("triton", "torch")))
def backend(request):
    with fastattn.use_backend(request.param):
        yield request.param


def _rand(*shape, dtype=FP32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return x.requires_grad_(grad)


def _grads(out, inputs, seed=9):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, do), do


def _reference(q, k, v, do, **kw):
    """float64 reference out and grads for (B, T, H, D) inputs, plus the eager ones in
    the inputs' dtype (for the tolerance rule)."""
    results = []
    for dtype in (torch.float64, q.dtype):
        qs, ks, vs = (x.detach().to(dtype).transpose(1, 2).requires_grad_() for x in (q, k, v))
        kw_d = dict(kw)
        if kw_d.get("alibi") is not None:
            kw_d["alibi"] = kw_d["alibi"].to(dtype)
        out, _ = reference.attention(qs, ks, vs, **kw_d)
        grads = torch.autograd.grad(out, (qs, ks, vs), do.to(dtype).transpose(1, 2))
        results.append((out.transpose(1, 2), *(g.transpose(1, 2) for g in grads)))
    return results


def _check(got, ref64, eager, names=("out", "dq", "dk", "dv")):
    for name, g, r, e in zip(names, got, ref64, eager):
        assert_close(g, r, name, eager=None if g.dtype == FP32 else e)


# --- a seeded covering sample of flash-attn's grid ---------------------------------

_HEAD_DIMS = [1, 7, 32, 40, 59, 64, 80, 111, 128, 160, 256]
_LENGTHS = [(1, 33), (17, 17), (33, 20), (40, 57), (57, 40), (64, 64)]


def _sample(n, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        cases.append(dict(
            dtype=rng.choice([FP32, FP16, BF16]), d=_HEAD_DIMS[i % len(_HEAD_DIMS)],
            lengths=rng.choice(_LENGTHS), heads=rng.choice([(4, 4), (4, 2), (4, 1)]),
            causal=rng.random() < 0.5,
            window=rng.choice([(-1, -1), (-1, -1), (5, 3), (12, -1), (0, 0)]),
            softcap=rng.choice([0.0, 0.0, 2.5]), alibi=rng.random() < 0.3))
    return cases


def _case_id(c):
    return (f"{str(c['dtype'])[6:]}-d{c['d']}-T{c['lengths'][0]}x{c['lengths'][1]}-"
            f"h{c['heads'][0]}k{c['heads'][1]}-{'c' if c['causal'] else 'nc'}-"
            f"w{c['window'][0]}_{c['window'][1]}-sc{c['softcap']}-{'alibi' if c['alibi'] else ''}")


_COVER = _sample(14, seed=2026)


@pytest.mark.parametrize("case", _COVER, ids=[_case_id(c) for c in _COVER])
def test_flash_attn_func_covering_sample(backend, case):
    (tq, tk), (h, hkv), d = case["lengths"], case["heads"], case["d"]
    q = _rand(2, tq, h, d, dtype=case["dtype"])
    k, v = _rand(2, tk, hkv, d, dtype=case["dtype"], seed=1), _rand(
        2, tk, hkv, d, dtype=case["dtype"], seed=2)
    alibi = (torch.rand(2, h, generator=torch.Generator().manual_seed(3)).to(DEVICE)
             if case["alibi"] else None)
    out = fastattn.flash_attn_func(q, k, v, causal=case["causal"], window_size=case["window"],
                                   softcap=case["softcap"], alibi_slopes=alibi)
    assert out.shape == (2, tq, h, d) and out.is_contiguous()
    grads, do = _grads(out, (q, k, v))
    ref64, eager = _reference(q, k, v, do, causal=case["causal"], window=case["window"],
                              softcap=case["softcap"], alibi=alibi)
    _check((out, *grads), ref64, eager)


# --- packed forms --------------------------------------------------------------------


def test_packed_forms_read_in_place_and_return_packed_grads(backend):
    qkv = _rand(2, 21, 3, 4, 24)
    out = fastattn.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(6, -1))
    (dqkv,), do = _grads(out, (qkv,))
    assert dqkv.shape == qkv.shape
    q, k, v = (x.detach().requires_grad_() for x in qkv.detach().unbind(2))
    ref = fastattn.flash_attn_func(q, k, v, causal=True, window_size=(6, -1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), do), 2))

    q = _rand(2, 9, 4, 24, seed=4)
    kv = _rand(2, 21, 2, 2, 24, seed=5)
    out = fastattn.flash_attn_kvpacked_func(q, kv, causal=True, softcap=3.0)
    k, v = kv.detach().unbind(2)
    torch.testing.assert_close(out, fastattn.flash_attn_func(q.detach(), k, v, causal=True,
                                                             softcap=3.0), rtol=0, atol=0)


# --- varlen ----------------------------------------------------------------------------

def _varlen_inputs(lens_q, lens_k, h, hkv, d, dtype=FP32):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = _rand(int(cu_q[-1]), h, d, dtype=dtype)
    k, v = (_rand(int(cu_k[-1]), hkv, d, dtype=dtype, seed=s) for s in (1, 2))
    return q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE)


@pytest.mark.parametrize("causal,window,softcap,alibi", [
    (True, (-1, -1), 0.0, False), (False, (-1, -1), 0.0, False), (True, (7, -1), 0.0, False),
    (False, (4, 2), 2.0, True),
])
def test_varlen_matches_reference(backend, causal, window, softcap, alibi):
    lens_q, lens_k = [5, 0, 23, 1, 17], [9, 4, 23, 30, 0]      # empty sequences, Tq != Tk
    q, k, v, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, 4, 2, 40)
    slopes = torch.rand(len(lens_q), 4).to(DEVICE) if alibi else None
    out, lse, _ = fastattn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window,
        softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    grads, do = _grads(out, (q, k, v))
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference.attention_varlen(
        *x64, cu_q, cu_k, causal, window=window, softcap=softcap,
        alibi=None if slopes is None else slopes.double())
    ref_grads = torch.autograd.grad(ref, x64, do.double())
    for name, g, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_close(g, r, name)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], atol=1e-4, rtol=1e-4)


def test_varlen_packed_forms(backend):
    q, k, v, cu, _ = _varlen_inputs([7, 12, 3], [7, 12, 3], 2, 2, 16)
    qkv = torch.stack([q.detach(), k.detach(), v.detach()], dim=1).requires_grad_()
    out = fastattn.flash_attn_varlen_qkvpacked_func(qkv, cu, 12, causal=True)
    ref = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    (dqkv,), do = _grads(out, (qkv,))
    torch.testing.assert_close(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), do), 1))
    kv = qkv.detach()[:, 1:]
    out = fastattn.flash_attn_varlen_kvpacked_func(q.detach(), kv, cu, cu, 12, 12, causal=True)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)


def test_varlen_equals_padded_dense(backend):
    """Sequences packed into one varlen batch give what each gives alone, densely."""
    q, k, v, cu, _ = _varlen_inputs([11, 30], [11, 30], 4, 1, 32)
    out = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True)
    for b, (lo, hi) in enumerate([(0, 11), (11, 41)]):
        alone = fastattn.flash_attn_func(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi],
                                         causal=True)
        torch.testing.assert_close(out[lo:hi], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"cu_seqlens_q": torch.tensor([0, 5, 9])}, ValueError,
     r"cu_seqlens_q must be a 1-D int32 tensor .* got torch.int64"),
    ({"cu_seqlens_k": torch.tensor([0, 9, 5], dtype=torch.int32)}, ValueError,
     r"cu_seqlens_k must start at 0, never decrease and end at the 9 rows .* got \[0, 9, 5\]"),
    ({"cu_seqlens_q": torch.tensor([0, 3, 7], dtype=torch.int32)}, ValueError,
     r"cu_seqlens_q must .* end at the 9 rows it indexes, got \[0, 3, 7\]"),
    ({"cu_seqlens_k": torch.tensor([0, 9], dtype=torch.int32)}, ValueError,
     r"must describe one batch, got 2 and 1 sequences"),
    ({"max_seqlen_q": 3}, ValueError, r"max_seqlen_q=3 is below the longest sequence, 5"),
    ({"block_table": torch.zeros(2, 1, dtype=torch.int32)}, NotImplementedError,
     r"block_table"),
])
def test_varlen_bad_input(kwargs, exc, match):
    q, k, v, cu_q, cu_k = _varlen_inputs([5, 4], [5, 4], 2, 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5,
                max_seqlen_k=5)
    args.update(kwargs)
    if DEVICE == "cuda":
        pytest.skip("cu_seqlens contents are only checked on CPU")
    with pytest.raises(exc, match=match):
        fastattn.flash_attn_varlen_func(**args)


# --- dropout ---------------------------------------------------------------------------

def test_dropout_is_reproducible_and_matches_its_mask(backend):
    """Same torch seed, same output; S_dmask's sign is the mask the kernel used, and the
    output is the reference's with that mask."""
    q, k, v = _rand(2, 19, 2, 16), _rand(2, 25, 2, 16, seed=1), _rand(2, 25, 2, 16, seed=2)
    torch.manual_seed(7)
    out, lse, s_dmask = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True,
                                                 return_attn_probs=True)
    torch.manual_seed(7)
    again = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert torch.equal(out, again)
    other = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert not torch.equal(out, other)
    keep = s_dmask >= 0
    x64 = [x.detach().double().transpose(1, 2) for x in (q, k, v)]
    ref, _ = reference.attention(*x64, causal=True, dropout_mask=keep, dropout_p=0.3)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    visible = reference.visible(19, 25, causal=True)
    rate = keep[..., visible].float().mean().item()
    assert abs(rate - 0.7) < 0.06                              # ~1900 Bernoulli(0.7) draws


def test_dropout_same_mask_on_every_backend():
    if len([p for p in available_backends(("triton", "torch")) if not p.marks]) < 2:
        pytest.skip("needs both the triton and torch backends")
    q, k, v = _rand(1, 18, 2, 16), _rand(1, 18, 2, 16, seed=1), _rand(1, 18, 2, 16, seed=2)
    outs = []
    for name in ("triton", "torch"):
        with fastattn.use_backend(name):
            out = fastattn.flash_attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True,
                                           dropout_p=0.5, rng=(123456789012345, 42))
            outs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_philox_mask_does_not_depend_on_the_layout():
    """The keep decision of (bh, i, j) is a function of those indices only."""
    a = _philox.keep_mask(5, 3, torch.tensor(2), torch.arange(4)[:, None],
                          torch.arange(6)[None, :], 0.5)
    b = _philox.keep_mask(5, 3, torch.tensor(2), torch.tensor(3), torch.tensor(4), 0.5)
    assert a[3, 4] == b


# --- SDPA drop-in: key-padding masks and dropout served in the kernel ---------------------

@pytest.mark.parametrize("kind", ["bool", "additive", "bool-3d"])
def test_sdpa_key_padding_mask_is_served(backend, kind):
    q, k, v = _rand(3, 2, 7, 16), _rand(3, 2, 11, 16, seed=1), _rand(3, 2, 11, 16, seed=2)
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[0, 8:] = False                                          # right padding
    keep[1, :4] = False                                          # left padding
    keep[2, :] = False                                           # no key: torch gives 0
    keep = keep.to(DEVICE)
    if kind == "bool":
        mask = keep[:, None, None, :]
    elif kind == "bool-3d":
        mask = keep[:, None, :]
        q, k, v = (x.detach()[:, 0].requires_grad_() for x in (q, k, v))
    else:
        mask = torch.zeros(3, 1, 1, 11, device=DEVICE).masked_fill(~keep[:, None, None],
                                                                   float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grads, do = _grads(out, (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_sdpa_dropout_is_served_and_unbiased(backend):
    """dropout_p runs in the kernel: no fallback, and averaged over masks the output is
    the dropout-free one (inverted dropout is unbiased)."""
    # 256 copies of one (8 x 16) problem in one batch: each batch row draws its own mask
    q = _rand(1, 1, 8, 16, grad=False).expand(256, 1, 8, 16)
    v = _rand(1, 1, 8, 16, seed=1, grad=False).expand(256, 1, 8, 16)
    exact = F.scaled_dot_product_attention(q[:1], q[:1], v[:1])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out = fastattn.scaled_dot_product_attention(q, q, v, dropout_p=0.5)
    assert not torch.equal(out[0], out[1])                   # the rows drew different masks
    # the batch mean is within 5 standard errors of the dropout-free output, elementwise
    # (128 elements: a false alarm has odds ~1e-4); without the 1/(1-p) rescaling it
    # would sit about half the output away
    mean, stderr = out.mean(dim=0), out.std(dim=0) / 256 ** 0.5
    assert ((mean - exact[0]).abs() <= 5 * stderr).all()
    assert ((0.5 * mean - exact[0]).abs() > 5 * stderr).any()


def test_signatures_are_flash_attn_s():
    assert list(inspect.signature(fai.flash_attn_varlen_func).parameters) == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
        "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
        "deterministic", "return_attn_probs", "block_table"]
    assert list(inspect.signature(fai.flash_attn_qkvpacked_func).parameters)[:2] == [
        "qkv", "dropout_p"]
    assert list(inspect.signature(fai.flash_attn_varlen_qkvpacked_func).parameters)[:4] == [
        "qkv", "cu_seqlens", "max_seqlen", "dropout_p"]


@pytest.mark.parametrize("given, passed", [({}, True), ({"deterministic": None}, True),
                                           ({"deterministic": True}, True),
                                           ({"deterministic": False}, False)])
def test_deterministic_flag_reaches_the_backward(given, passed, monkeypatch):
    """fastattn's backward stays deterministic unless False is asked for explicitly
    (flash-attn's meaning of False: the one-pass atomic-dQ backward)."""
    seen = []
    attention = fai.flash_attention
    monkeypatch.setattr(fai, "flash_attention", lambda *a, **kw: seen.append(
        kw["deterministic"]) or attention(*a, **kw))
    q, k, v = (_rand(1, 9, 2, 16, seed=s) for s in range(3))
    fai.flash_attn_func(q, k, v, causal=True, **given).sum().backward()
    assert seen == [passed]
