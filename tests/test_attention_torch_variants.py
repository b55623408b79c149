"""The ``torch`` attention backend's variants (issue 13) against the float64 reference.

``_attention_torch.attn_fwd`` / ``attn_bwd`` are called directly, below the op layer:
sliding windows, causal + window, Tq != Tk both ways, GQA, softcap, ALiBi ((H,) expanded
and (B, H)), dropout (the mask rebuilt from ``_philox`` and given to the reference),
variable-length batches, head dims 1..256. Most cases shrink the query block to 16 rows
so that windows start and end inside blocks and the key ranges [lo, hi) move.

Tolerances: ``tolerances.assert_close`` (fp32: 1e-4 × (1 + max |ref|); fp16/bf16: 2× the
error of the same reference run in that dtype, plus a floor). Rows that see no key must
give exactly o = 0, lse = −inf and zero gradients, and nothing may be NaN.
"""
import pytest
import torch

from fastattn import reference
from fastattn.ops import _attention_torch, _philox
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _randn(*shape, dtype=FP32, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _rebuilt_mask(seed, offset, p, b, h, tq, tk, batch0=0):
    """The (B, H, Tq, Tk) keep mask the spec defines, from _philox directly."""
    bh = ((batch0 + torch.arange(b))[:, None] * h + torch.arange(h)).view(b, h, 1, 1)
    rows, cols = torch.arange(tq).view(tq, 1), torch.arange(tk)
    return _philox.keep_mask(seed, offset, bh.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE), p)


def _reference(q, k, v, do, causal, scale, variant, mask):
    """float64 out, lse and grads of q, k, v through autograd."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    alibi = variant.get("alibi")
    out, lse = reference.attention(
        q64, k64, v64, causal, scale, window=variant.get("window", (-1, -1)),
        softcap=variant.get("softcap", 0.0), alibi=None if alibi is None else alibi.double(),
        dropout_mask=mask, dropout_p=variant.get("dropout_p", 0.0))
    out.backward(do.double())
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def _eager(q, k, v, do, causal, scale, variant, mask):
    """The same math by eager torch in the inputs' dtype (fp16/bf16 error yardstick)."""
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    alibi = variant.get("alibi")
    out, _ = reference.attention(
        qe, ke, ve, causal, scale, window=variant.get("window", (-1, -1)),
        softcap=variant.get("softcap", 0.0), alibi=None if alibi is None else alibi.to(q.dtype),
        dropout_mask=mask, dropout_p=variant.get("dropout_p", 0.0))
    out.backward(do)
    return out.detach(), qe.grad, ke.grad, ve.grad


def _assert_no_key_rows(lse_ref, o, lse, dq):
    """Rows the reference says see no key: o = 0, lse = −inf, dq = 0 exactly."""
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty), "rows with lse = -inf differ"
    assert not o[empty].any() and not dq[empty].any()
    for name, x in (("o", o), ("lse", lse[~empty]), ("dq", dq)):
        assert not x.isnan().any(), f"{name} has NaN"


# (B, H, Hkv, Tq, Tk, D, causal, variant, dtype); block 16 unless the variant says.
CASES = {
    "d1-window-inside-blocks": (1, 2, 2, 37, 37, 1, False, {"window": (3, 2)}, FP32),
    "d7-causal-window": (1, 2, 2, 40, 40, 7, True, {"window": (5, -1)}, FP32),
    "d59-right-window-tq<tk": (1, 2, 2, 23, 50, 59, False, {"window": (-1, 4)}, FP32),
    "d111-causal-window-tq>tk": (1, 2, 2, 50, 23, 111, True, {"window": (10, 10)}, FP32),
    "d256-softcap": (1, 2, 2, 20, 20, 256, False, {"softcap": 2.0, "scale": 0.5}, FP32),
    "diagonal-only-tq>tk": (2, 2, 1, 30, 19, 16, False, {"window": (0, 0)}, FP32),
    "causal-tq>tk": (1, 2, 2, 41, 17, 8, True, {}, FP32),
    "gqa-alibi-h-expanded": (2, 4, 2, 33, 33, 16, True, {"alibi": "H"}, FP32),
    "gqa-alibi-bh-window": (2, 6, 2, 29, 45, 32, False,
                            {"alibi": "BH", "window": (7, 3)}, FP32),
    "mqa-softcap-alibi-window": (1, 4, 1, 35, 35, 24, True,
                                 {"softcap": 3.0, "alibi": "BH", "window": (12, -1)}, FP32),
    "dropout-causal-window-gqa": (2, 4, 2, 37, 37, 24, True,
                                  {"dropout_p": 0.3, "window": (9, -1)}, FP32),
    "dropout-softcap-alibi-tq<tk": (1, 2, 2, 19, 44, 40, False,
                                    {"dropout_p": 0.5, "softcap": 4.0, "alibi": "H",
                                     "seed": 2 ** 62 + 12345, "offset": 2 ** 32 - 7}, FP32),
    "dropout-default-block": (1, 2, 2, 300, 300, 16, True,
                              {"dropout_p": 0.2, "block": None}, FP32),
    "fp16-window-softcap": (1, 2, 2, 45, 45, 64, True,
                            {"window": (20, -1), "softcap": 5.0}, FP16),
    "bf16-alibi-dropout": (1, 4, 2, 33, 40, 32, False,
                           {"alibi": "BH", "dropout_p": 0.25, "window": (8, 8)}, BF16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dense_variant_matches_reference(case, monkeypatch):
    b, h, hkv, tq, tk, d, causal, variant, dtype = case
    variant = dict(variant)
    block = variant.pop("block", 16)
    if block is not None:
        monkeypatch.setattr(_attention_torch, "_BLOCK", block)
    g = torch.Generator().manual_seed(tq * 1000 + d)
    q, do = _randn(b, h, tq, d, dtype=dtype, g=g), _randn(b, h, tq, d, dtype=dtype, g=g)
    k, v = _randn(b, hkv, tk, d, dtype=dtype, g=g), _randn(b, hkv, tk, d, dtype=dtype, g=g)
    scale = variant.pop("scale", d ** -0.5)
    kind = variant.get("alibi")
    if kind == "H":      # one slope per head, shared by the batch: a stride-0 expand
        slopes = (torch.rand(h, generator=g) * 0.5 + 0.05).to(DEVICE)
        variant["alibi"], ref_alibi = slopes.expand(b, h), slopes
    elif kind == "BH":
        variant["alibi"] = ref_alibi = (torch.rand(b, h, generator=g) * 0.5 + 0.05).to(DEVICE)
    mask = None
    if variant.get("dropout_p", 0.0) > 0:
        variant.setdefault("seed", 1234)
        variant.setdefault("offset", 5)
        mask = _rebuilt_mask(variant["seed"], variant["offset"], variant["dropout_p"],
                             b, h, tq, tk)
    ref_variant = {key: val for key, val in variant.items() if key not in ("seed", "offset")}
    if kind is not None:
        ref_variant["alibi"] = ref_alibi

    o, lse = _attention_torch.attn_fwd(q, k, v, causal, scale, **variant)
    dq, dk, dv = _attention_torch.attn_bwd(do, q, k, v, o, lse, causal, scale, **variant)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (b, h, tq) and lse.dtype == FP32
    assert dk.shape == k.shape and dv.shape == v.shape and dq.dtype == dtype

    ref = _reference(q, k, v, do, causal, scale, ref_variant, mask)
    eager = _eager(q, k, v, do, causal, scale, ref_variant, mask) if dtype != FP32 else None
    for i, (name, got) in enumerate((("out", o), ("dq", dq), ("dk", dk), ("dv", dv))):
        want = ref[0] if i == 0 else ref[i + 1]
        assert_close(got, want, name, None if eager is None else eager[i])
    finite = torch.isfinite(ref[1])
    assert_close(lse[finite], ref[1][finite].float().double(), "lse", floor=1e-5)
    _assert_no_key_rows(ref[1], o, lse, dq)
    # The backward is deterministic (and replays the same dropout mask): bitwise rerun.
    again = _attention_torch.attn_bwd(do, q, k, v, o, lse, causal, scale, **variant)
    assert all(torch.equal(x, y) for x, y in zip((dq, dk, dv), again))


def test_strided_inputs_give_the_contiguous_result(monkeypatch):
    monkeypatch.setattr(_attention_torch, "_BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    qt = _randn(1, 40, 2, 24, g=g).transpose(1, 2)                # (B, H, T, D), strided
    kt, vt = (_randn(1, 50, 2, 24, g=g).transpose(1, 2) for _ in range(2))
    kw = {"window": (6, 2), "softcap": 3.0, "dropout_p": 0.1, "seed": 9}
    o, lse = _attention_torch.attn_fwd(qt, kt, vt, True, 0.2, **kw)
    o2, lse2 = _attention_torch.attn_fwd(qt.contiguous(), kt.contiguous(), vt.contiguous(),
                                         True, 0.2, **kw)
    torch.testing.assert_close(o, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse2, rtol=1e-6, atol=1e-6)


def test_plain_cpu_attention_keeps_the_aten_kernel(monkeypatch):
    """Regression guard: adding the variants must not send plain attention (square
    causal or no mask) off PyTorch's CPU flash kernel onto the slower blocked path."""
    if DEVICE != "cpu":
        pytest.skip("the aten flash kernel path is the CPU one")

    def fail(*args, **kwargs):
        raise AssertionError("plain attention took the blocked path")

    monkeypatch.setattr(_attention_torch, "_blocked_fwd", fail)
    monkeypatch.setattr(_attention_torch, "_blocked_bwd", fail)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (_randn(1, 2, 20, 7, g=g) for _ in range(4))
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (False, (-1, 0))):
        o, lse = _attention_torch.attn_fwd(q, k, v, causal, 0.3, window=window)
        _attention_torch.attn_bwd(do, q, k, v, o, lse, causal, 0.3, window=window)
        want, _ = reference.attention(q.double(), k.double(), v.double(), causal, 0.3,
                                      window=window)
        assert_close(o, want, "out")


def test_blocks_only_touch_their_window_keys(monkeypatch):
    """The blocked path's largest temporary is (B, H, block, block + window), never
    (B, H, T, T): every score tile it builds, forward and backward, is checked, and the
    result still matches the reference."""
    block, left, t = 64, 40, 1500
    monkeypatch.setattr(_attention_torch, "_BLOCK", block)
    widths = []
    real = _attention_torch._block_scores

    def recording(qb, kb, *args):
        x, th = real(qb, kb, *args)
        widths.append(tuple(x.shape[-2:]))
        return x, th

    monkeypatch.setattr(_attention_torch, "_block_scores", recording)
    g = torch.Generator().manual_seed(1)
    q, do = _randn(1, 2, t, 8, g=g), _randn(1, 2, t, 8, g=g)
    k, v = _randn(1, 1, t, 8, g=g), _randn(1, 1, t, 8, g=g)
    o, lse = _attention_torch.attn_fwd(q, k, v, True, 0.35, window=(left, -1))
    dq, dk, dv = _attention_torch.attn_bwd(do, q, k, v, o, lse, True, 0.35, window=(left, -1))
    n_blocks = -(-t // block)
    assert len(widths) == 2 * n_blocks
    assert max(m for m, _ in widths) <= block
    assert max(n for _, n in widths) <= block + left, f"a tile read {max(widths)} keys"
    ref = _reference(q, k, v, do, True, 0.35, {"window": (left, -1)}, None)
    for name, got, want in (("out", o, ref[0]), ("dq", dq, ref[2]), ("dk", dk, ref[3]),
                            ("dv", dv, ref[4])):
        assert_close(got, want, name)


# ------------------------------------------------------------------ dropout statistics


def _dropout_probe(p, seed, n_heads=256, t=12):
    """Dropped attention with v = identity: o[b, h, i, j] = P_ij · keep / (1 − p), the same
    P in every head (same q, k), an independent mask per head (its own counter bh)."""
    g = torch.Generator().manual_seed(7)
    q = _randn(1, 1, t, t, g=g).expand(1, n_heads, t, t)
    k = _randn(1, 1, t, t, g=g)
    v = torch.eye(t, device=DEVICE)[None, None]
    o, _ = _attention_torch.attn_fwd(q, k, v, True, 0.5, dropout_p=p, seed=seed)
    probs, _ = reference.attention(q[:, :1].double(), k.double(), v.double(), True, 0.5)
    return o.double(), probs[0, 0]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate_and_unbiased(p):
    o, probs = _dropout_probe(p, seed=2024)
    visible = probs > 0
    kept = (o != 0)[..., visible]                                # (1, heads, n_visible)
    n = kept.numel()
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) <= 6 * (p * (1 - p) / n) ** 0.5, f"keep rate {rate}, p {p}"
    # Kept entries are P / (1 − p) exactly (up to fp32 rounding); dropped ones 0.
    scaled = (probs / (1 - p)).expand_as(o)
    torch.testing.assert_close(o[o != 0], scaled[o != 0], rtol=1e-5, atol=1e-7)
    # E[o] = P: the head average is within 6 standard errors of P entrywise.
    heads = o.shape[1]
    std = probs * ((p / (1 - p)) ** 0.5)
    err = (o.mean(dim=1)[0] - probs).abs()
    assert (err <= 6 * std / heads ** 0.5 + 1e-6).all(), f"max bias {err.max().item():.3g}"


def test_dropout_deterministic_per_seed_and_offset():
    o1, _ = _dropout_probe(0.3, seed=11, n_heads=4)
    o2, _ = _dropout_probe(0.3, seed=11, n_heads=4)
    o3, _ = _dropout_probe(0.3, seed=12, n_heads=4)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


# ------------------------------------------------------------------ variable length


def _varlen_inputs(lens_q, lens_k, h, hkv, d, g, dtype=FP32):
    """Packed (total, H, D) tensors, deliberately strided, and int32 cu_seqlens."""
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    tq, tk = sum(lens_q), sum(lens_k)
    q, do = (_randn(h, tq, d, dtype=dtype, g=g).transpose(0, 1) for _ in range(2))
    k, v = (_randn(hkv, tk, d, dtype=dtype, g=g).transpose(0, 1) for _ in range(2))
    return q, k, v, do, cu_q.to(DEVICE), cu_k.to(DEVICE)


VARLEN_CASES = {
    # sequence lengths include an empty one, one with queries but no keys, odd lengths
    "plain": ([5, 0, 17, 1, 17], [9, 3, 0, 18, 17], 2, 2, 24, False, {}),
    "plain-causal-gqa": ([5, 0, 17, 1, 17], [5, 0, 17, 1, 17], 4, 2, 7, True, {}),
    "window-alibi-bh-gqa": ([5, 0, 17, 1, 33], [9, 3, 0, 18, 30], 4, 2, 16, True,
                            {"window": (6, -1), "alibi": "BH"}),
    "softcap-alibi-h-dropout": ([13, 0, 21, 2], [13, 4, 30, 1], 4, 1, 20, False,
                                {"softcap": 3.0, "alibi": "H", "dropout_p": 0.3,
                                 "window": (5, 5)}),
}


@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_varlen_matches_reference(case, monkeypatch):
    lens_q, lens_k, h, hkv, d, causal, variant = case
    variant = dict(variant)
    monkeypatch.setattr(_attention_torch, "_BLOCK", 16)
    g = torch.Generator().manual_seed(sum(lens_q) + d)
    q, k, v, do, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, h, hkv, d, g)
    n_seq, scale = len(lens_q), d ** -0.5
    if variant.get("alibi") == "H":
        variant["alibi"] = (torch.rand(h, generator=g) * 0.5 + 0.05).to(DEVICE)
    elif variant.get("alibi") == "BH":
        variant["alibi"] = (torch.rand(n_seq, h, generator=g) * 0.5 + 0.05).to(DEVICE)
    masks = None
    if variant.get("dropout_p", 0.0) > 0:
        variant.update(seed=77, offset=3)
        masks = [_rebuilt_mask(77, 3, variant["dropout_p"], 1, h, lq, lk, batch0=i)
                 for i, (lq, lk) in enumerate(zip(lens_q, lens_k))]
    lengths = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
               "max_seqlen_q": max(lens_q), "max_seqlen_k": max(lens_k)}

    o, lse = _attention_torch.attn_fwd(q, k, v, causal, scale, **variant, **lengths)
    dq, dk, dv = _attention_torch.attn_bwd(do, q, k, v, o, lse, causal, scale, **variant,
                                           **lengths)
    assert o.shape == q.shape and o.is_contiguous() and lse.shape == (h, q.shape[0])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_kw = {key: val for key, val in variant.items() if key not in ("seed", "offset")}
    if "alibi" in ref_kw:
        ref_kw["alibi"] = ref_kw["alibi"].double()
    ref_o, ref_lse = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal, scale,
                                                dropout_mask=masks, **ref_kw)
    ref_o.backward(do.double())
    for name, got, want in (("out", o, ref_o.detach()), ("dq", dq, q64.grad),
                            ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, want, name)
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite].float().double(), "lse", floor=1e-5)
    _assert_no_key_rows(ref_lse.T, o, lse.T, dq)
