"""``flash_attn_with_kvcache`` (fastattn/ops/kvcache.py, kernels/flash_decode.py) against
a float64 reference built here: the expected cache after the in-place append, and
``fastattn.reference.attention`` in float64 over each sequence's keys, read from that
cache at positions [cache_leftpad, cache_seqlens + Tnew), with rotary from an
independent complex-number formula. Both backends; the Triton kernel under the
interpreter on CPU, with its outputs and split partials poisoned with NaN."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICE, available_backends
from fastattn import reference
from fastattn.kernels import flash_decode
from fastattn.ops import kvcache
from fastattn.ops.kvcache import flash_attn_with_kvcache
from tolerances import FLOOR, assert_close

BACKENDS = available_backends(kvcache.BACKENDS)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs and partials start as NaN, so an unwritten element fails."""
    monkeypatch.setattr(flash_decode, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def _case(**changes) -> dict:
    base = dict(B=2, Tq=1, H=4, Hkv=2, D=32, cap=40, page=None, pages=0, t_new=0,
                seqlens=[17, 29], leftpad=None, batch_idx=False, causal=False,
                window=(-1, -1), softcap=0.0, alibi=None, rotary=None, rotary_dim=None,
                scale=None, num_splits=0)
    return {**base, **changes}


CASES = {
    "decode_mha": _case(H=2, Hkv=2, D=64, B=3, seqlens=[1, 40, 23]),
    "decode_gqa_append": _case(H=8, t_new=1, seqlens=[0, 33]),
    "decode_mqa_alibi": _case(Hkv=1, alibi="H", seqlens=[38, 5]),
    "prefill_causal": _case(Tq=5, t_new=5, causal=True, seqlens=[0, 30]),
    "chunk_causal_more_queries": _case(Tq=6, t_new=2, causal=True, seqlens=[1, 12]),
    "window_causal": _case(Tq=3, t_new=3, causal=True, window=(4, -1), seqlens=[20, 6]),
    "window_both_sides": _case(Tq=4, window=(3, 2), seqlens=[25, 9]),
    "softcap_alibi": _case(Tq=2, t_new=2, causal=True, softcap=2.5, alibi="BH"),
    "head_dim_1": _case(D=1, Tq=2, t_new=1, causal=True),
    "head_dim_59": _case(D=59, H=6, Hkv=3, t_new=2, causal=True),
    "head_dim_128": _case(D=128, t_new=1),
    "paged_16": _case(page=16, pages=3, t_new=3, Tq=3, causal=True, seqlens=[0, 44]),
    "paged_7": _case(page=7, pages=6, t_new=1, seqlens=[13, 40], leftpad=[3, 0]),
    "batch_idx": _case(batch_idx=True, t_new=2, Tq=2, causal=True, seqlens=[10, 3]),
    "leftpad": _case(leftpad=[5, 29], t_new=1, seqlens=[17, 29]),
    "seqlens_int": _case(seqlens=21, t_new=2, Tq=2, causal=True),
    "seqlens_none": _case(seqlens=None),
    "rotary_interleaved": _case(rotary="interleaved", t_new=2, Tq=2, causal=True),
    "rotary_neox_not_causal": _case(rotary="neox", t_new=3, Tq=3, seqlens=[4, 30]),
    "rotary_partial_paged": _case(rotary="neox", rotary_dim=16, page=16, pages=3, t_new=1,
                                  causal=True),
    "scale_and_splits": _case(scale=0.3, num_splits=3, seqlens=[40, 11]),
    "queries_before_the_keys": _case(Tq=4, causal=True, seqlens=[2, 0]),
}


def _make(c: dict, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    b, hkv, d = c["B"], c["Hkv"], c["D"]
    x = {"q": randn(b, c["Tq"], c["H"], d)}
    if c["page"]:
        n_pages = b * c["pages"] + 3
        x["block_table"] = torch.randperm(n_pages, generator=g)[:b * c["pages"]].view(
            b, c["pages"]).int().to(DEVICE)
        cache_shape = (n_pages, c["page"], hkv, d)
    else:
        rows = b + 2 if c["batch_idx"] else b
        if c["batch_idx"]:
            x["cache_batch_idx"] = torch.randperm(rows, generator=g)[:b].int().to(DEVICE)
        cache_shape = (rows, c["cap"], hkv, d)
    x["k_cache"], x["v_cache"] = randn(*cache_shape), randn(*cache_shape)
    if c["t_new"]:
        x["k"], x["v"] = randn(b, c["t_new"], hkv, d), randn(b, c["t_new"], hkv, d)
    s = c["seqlens"]
    x["cache_seqlens"] = torch.tensor(s, dtype=torch.int32, device=DEVICE) \
        if isinstance(s, list) else s
    if c["leftpad"] is not None:
        x["cache_leftpad"] = torch.tensor(c["leftpad"], dtype=torch.int32, device=DEVICE)
    if c["alibi"]:
        shape = (c["H"],) if c["alibi"] == "H" else (b, c["H"])
        x["alibi_slopes"] = torch.rand(*shape, generator=g).to(DEVICE)
    if c["rotary"]:
        r = c["rotary_dim"] or d
        angles = torch.rand(64, r // 2, generator=g, dtype=torch.float64) * 2 * math.pi
        x["rotary_cos"], x["rotary_sin"] = (f(angles).to(dtype).to(DEVICE)
                                            for f in (torch.cos, torch.sin))
        x["rotary_interleaved"] = c["rotary"] == "interleaved"
    x.update(causal=c["causal"], window_size=c["window"], softcap=c["softcap"],
             softmax_scale=c["scale"], num_splits=c["num_splits"])
    return x


def _rotary64(x, cos, sin, pos, interleaved):
    """float64 rotary as a complex product: pairs (2i, 2i+1) or (i, i + r/2) are the real
    and imaginary parts, times exp(i·θ) at each position. x (T, heads, D), pos (T,)."""
    r = 2 * cos.shape[1]
    x = x.double().clone()
    rot = torch.complex(cos.double()[pos], sin.double()[pos])[:, None]      # (T, 1, r/2)
    pairs = x[..., :r].unflatten(-1, (r // 2, 2)) if interleaved else \
        x[..., :r].unflatten(-1, (2, r // 2)).transpose(-1, -2)
    z = torch.view_as_complex(pairs.contiguous()) * rot
    y = torch.view_as_real(z)
    x[..., :r] = y.flatten(-2) if interleaved else y.transpose(-1, -2).flatten(-2)
    return x


def _positions(cache: torch.Tensor, x: dict, b: int, pos: torch.Tensor):
    """(cache row, slot) of logical positions pos of sequence b."""
    if "block_table" in x:
        page = cache.shape[1]
        return x["block_table"][b].long()[pos // page], pos % page
    row = int(x["cache_batch_idx"][b]) if "cache_batch_idx" in x else b
    return torch.full_like(pos, row), pos


def _expected(x: dict):
    """float64 (out, lse) and the caches the call must leave, from the inputs before it."""
    q, k_cache, v_cache = x["q"], x["k_cache"].clone(), x["v_cache"].clone()
    b_size, tq, h, d = q.shape
    capacity = k_cache.shape[1] * (x["block_table"].shape[1] if "block_table" in x else 1)
    s = x["cache_seqlens"]
    seqlens = [capacity] * b_size if s is None else [s] * b_size if isinstance(s, int) \
        else s.tolist()
    leftpad = x["cache_leftpad"].tolist() if "cache_leftpad" in x else [0] * b_size
    t_new = x["k"].shape[1] if "k" in x else 0
    local = x["causal"] or tuple(x["window_size"]) != (-1, -1)
    out = torch.zeros(b_size, tq, h, d, dtype=torch.float64, device=DEVICE)
    lse = torch.full((b_size, h, tq), float("-inf"), dtype=torch.float64, device=DEVICE)
    rotary = ("rotary_cos" in x and (x["rotary_cos"], x["rotary_sin"],
                                     x["rotary_interleaved"]))
    for b in range(b_size):
        qb = q[b].double()
        if t_new:
            pos = torch.arange(seqlens[b], seqlens[b] + t_new, device=DEVICE)
            kb = x["k"][b]
            if rotary:
                kb = _rotary64(kb, rotary[0], rotary[1], pos, rotary[2]).to(kb.dtype)
                pos_q = seqlens[b] + (torch.arange(tq, device=DEVICE) if local
                                      else torch.zeros(tq, dtype=torch.long, device=DEVICE))
                qb = _rotary64(q[b], rotary[0], rotary[1], pos_q, rotary[2])
            rows, slots = _positions(k_cache, x, b, pos)
            k_cache[rows, slots] = kb
            v_cache[rows, slots] = x["v"][b]
        if seqlens[b] + t_new == leftpad[b]:
            continue
        pos = torch.arange(leftpad[b], seqlens[b] + t_new, device=DEVICE)
        rows, slots = _positions(k_cache, x, b, pos)
        kb, vb = (c[rows, slots].double().transpose(0, 1)[None] for c in (k_cache, v_cache))
        alibi = x.get("alibi_slopes")
        alibi = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b]).double()
        o_b, lse_b = reference.attention(
            qb.transpose(0, 1)[None], kb, vb, x["causal"], x["softmax_scale"],
            window=tuple(x["window_size"]), softcap=x["softcap"], alibi=alibi)
        out[b], lse[b] = o_b[0].transpose(0, 1), lse_b[0]
    return out, lse, k_cache, v_cache


def _check(x: dict, backend: str, dtype: torch.dtype) -> None:
    out64, lse64, k_cache, v_cache = _expected(x)
    k_before = x["k_cache"].clone()
    with fastattn.use_backend(backend):
        out, lse = flash_attn_with_kvcache(**x, return_softmax_lse=True)
    assert out.shape == x["q"].shape and out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, out64, "out")
    floor = FLOOR[torch.float32] if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse.double(), lse64, atol=floor * (1 + lse64.abs()
                               .nan_to_num(posinf=0, neginf=0).max().item()), rtol=0)
    # The append, in place: the new rows (rotated keys may differ from the float64
    # rotation rounded to the dtype by one rounding), every other element untouched.
    written = k_cache != k_before
    assert torch.equal(x["k_cache"][~written], k_before[~written])
    assert_close(x["k_cache"][written], k_cache[written].double(), "k_cache",
                 floor=torch.finfo(dtype).eps)
    assert torch.equal(x["v_cache"], v_cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case, backend):
    _check(_make(CASES[case], torch.float32), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["decode_gqa_append", "paged_7", "softcap_alibi",
                                  "head_dim_59", "rotary_interleaved"])
def test_half_precision(case, dtype, backend):
    _check(_make(CASES[case], dtype, seed=1), backend, dtype)


@pytest.mark.parametrize("case", ["decode_gqa_append", "window_causal", "paged_7",
                                  "queries_before_the_keys"])
def test_num_splits_agree(case):
    """1, 3, 0 (chosen) and more splits than key blocks give the same result: the
    combine is exact up to rounding."""
    ok, why = fastattn.backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(f"backend triton: {why}")
    c = {**CASES[case], "cap": 100, "seqlens": [97, 61], "leftpad": None}   # 100 keys
    if c["page"]:
        c["pages"] = 15
    results = []
    for splits in (1, 3, 0, 9):    # 9: more splits than the 7 key blocks of 16
        x = _make({**c, "num_splits": splits}, torch.float32)
        with fastattn.use_backend("triton"):
            results.append(flash_attn_with_kvcache(**x, return_softmax_lse=True))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, results[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_match_contiguous(backend):
    """q, caches and new keys as views of larger tensors, alibi an expand."""
    x = _make(CASES["softcap_alibi"], torch.float32)
    with fastattn.use_backend(backend):
        want = flash_attn_with_kvcache(**{**x, "k_cache": x["k_cache"].clone(),
                                          "v_cache": x["v_cache"].clone()})
        wide = {n: torch.cat([x[n], torch.randn_like(x[n])], dim=-1)[..., :x[n].shape[-1]]
                for n in ("k_cache", "v_cache", "k", "v")}
        q = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
        got = flash_attn_with_kvcache(**{**x, **wide, "q": q})
    assert not wide["k_cache"].is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_choose_splits():
    cpu = torch.device("cpu")   # program_slots: 4 on CPU
    assert flash_decode.choose_splits(1, 1, 64 * 1024, 64, cpu) == 4
    assert flash_decode.choose_splits(8, 1, 64 * 1024, 64, cpu) == 1
    assert flash_decode.choose_splits(1, 1, 100, 64, cpu) == 1     # too few keys to split


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_passes_opcheck(backend):
    x = _make(CASES["paged_7"], torch.float32)
    key_end = x["cache_seqlens"] + 1
    args = (x["q"], x["k_cache"], x["v_cache"], key_end, x["cache_leftpad"],
            x["block_table"], None, None, 0.2, 3, 0, 0.0, 2, backend)
    torch.library.opcheck(kvcache._fwd.op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_requires_grad_raises():
    x = _make(CASES["decode_mha"], torch.float32)
    x["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        flash_attn_with_kvcache(**x)
    with torch.no_grad():
        flash_attn_with_kvcache(**x)


def _bad(change) -> dict:
    x = _make(_case(t_new=1, causal=True), torch.float32)
    change(x)
    return x


def _set(**values):
    return lambda x: x.update(values)


i32 = torch.int32
BAD = [
    (_set(q=torch.randn(2, 4, 32)), "q must be a 4-D tensor"),
    (lambda x: x.update(q=x["q"].int()), "q dtype must be one of"),
    (_set(q=torch.randn(2, 1, 4, 300)), r"head_dim in 1..256"),
    (lambda x: x.update(v_cache=x["v_cache"].half()), "v_cache must have q's dtype"),
    (lambda x: x.update(k_cache=x["k_cache"][..., :16]), "k_cache must have shape"),
    (lambda x: x.update(q=torch.randn(2, 1, 3, 32)), r"heads \(2\) must divide q heads"),
    (lambda x: x.pop("v"), "k and v must be given together"),
    (lambda x: x.update(k=x["k"][:1]), r"k must have shape \(batch, seqlen_new"),
    (lambda x: x.update(k_cache=x["k_cache"][:1], v_cache=x["v_cache"][:1]),
     r"k_cache batch \(1\) must equal q batch \(2\)"),
    (lambda x: x.update(cache_seqlens=x["cache_seqlens"].long()),
     r"cache_seqlens must be an int32 tensor of shape \(2,\)"),
    (_set(cache_seqlens=2.5), "cache_seqlens must be None, an int or an int32 tensor"),
    (_set(cache_seqlens=torch.tensor([3, 40], dtype=i32)),
     r"cache_seqlens \+ seqlen_new \(1\) must lie in 0..40"),
    (_set(cache_seqlens=None), r"cache_seqlens \+ seqlen_new \(1\) must lie in 0..40"),
    (_set(cache_leftpad=torch.tensor([18, 0], dtype=i32)), "cache_leftpad must lie in"),
    (_set(cache_batch_idx=torch.tensor([0, 2], dtype=i32)), "cache_batch_idx must lie in"),
    (_set(block_table=torch.zeros(2, 2, dtype=torch.int64)), "block_table must be an int32"),
    (lambda x: x.update(block_table=torch.tensor([[0], [2]], dtype=i32)),
     "block_table entries in use must lie in 0..1"),
    (lambda x: x.update(block_table=torch.tensor([[0], [1]], dtype=i32),
                        cache_batch_idx=torch.tensor([0, 1], dtype=i32)),
     "cache_batch_idx cannot be used with block_table"),
    (lambda x: x.update(rotary_cos=torch.ones(64, 8)), "given together"),
    (lambda x: x.update(rotary_cos=torch.ones(64, 8), rotary_sin=torch.ones(64, 8), k=None,
                        v=None), "need the new k and v"),
    (lambda x: x.update(rotary_cos=torch.ones(64, 17), rotary_sin=torch.ones(64, 17)),
     "rotary_dim <= head_dim 32"),
    (lambda x: x.update(rotary_cos=torch.ones(20, 8), rotary_sin=torch.ones(20, 8)),
     "have 20 positions; this call rotates positions up to 29"),
    (_set(window_size=(-2, 0)), r"window_size must be \(left, right\) ints >= -1"),
    (_set(softcap=-1.0), "softcap must be a finite float >= 0"),
    (_set(alibi_slopes=torch.ones(3)), r"alibi_slopes must be a float32 tensor of shape \(4,\)"),
    (_set(num_splits=200), r"num_splits must be an int in 0..128"),
    (_set(softmax_scale=float("nan")), "softmax_scale must be a finite float"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_raises(change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        flash_attn_with_kvcache(**_bad(change))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tq, leftpad", [(1, None), (1, [3, 0, 11]), (3, [2, 5, 0])])
def test_attend_cache_matches_float64(backend, tq, leftpad):
    """``attend_cache`` (the traceable cache attention of a compiled decoding step: the
    Triton kernel, or on the torch backend one boolean mask over the whole cache) sees
    exactly positions [key_start, key_end) of each sequence, causally aligned to the end."""
    g = torch.Generator().manual_seed(7)
    b, h, hkv, d, cap = 3, 4, 2, 16, 24
    ends = torch.tensor([9, 24, 14], dtype=torch.int32)
    starts = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    q = torch.randn(b, tq, h, d, generator=g)
    k_cache, v_cache = (torch.randn(b, cap, hkv, d, generator=g) for _ in range(2))
    with fastattn.use_backend(backend):
        got = kvcache.attend_cache(*(x.to(DEVICE) for x in (q, k_cache, v_cache, ends)),
                                   None if starts is None else starts.to(DEVICE))
    for i in range(b):
        first = 0 if starts is None else int(starts[i])
        keys = lambda c: c[i:i + 1, first:int(ends[i])].double().transpose(1, 2)  # noqa
        want = reference.attention(q[i:i + 1].double().transpose(1, 2), keys(k_cache),
                                   keys(v_cache), causal=True)[0].transpose(1, 2)
        assert_close(got[i:i + 1].cpu(), want, "out")
