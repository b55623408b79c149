"""``flash_attention_fp8``: float8 e4m3 q, k, v with descale factors, forward only.

Every backend is compared with float64 attention on the values the fp8 inputs stand for
(``x.double() · descale``), so the error measured is the computation's, not the
quantization's:

- the log-sum-exp comes from fp32 scores of exact fp8 products and unrounded
  probabilities: it must match to ~1e-5, which pins the mask, the scale, the soft cap
  and q's and k's factors;
- O: P·V runs on P cast to e4m3 (as flash-attn 3 does), while the row sum l comes from
  the unrounded p. A cast may truncate (Triton's interpreter does, for some values; GPUs
  round to nearest), so |δp| ≤ 2⁻³·p + 2⁻⁹ (one ulp of 3 mantissa bits, or of the
  subnormal spacing), and |δO_i| ≤ Σ_j (2⁻³ p_ij + 2⁻⁹)|v_j| / l_i
  ≤ (2⁻³ + Tk·2⁻⁹)·max|v| (l_i ≥ 1), plus the cast of O to bf16, 2⁻⁷·|O| (fp16: 2⁻¹⁰; eps, as a cast may
  truncate). On the torch backend (no
  fp8 P) the bound is that cast alone;
- with k = 0 every visible key gets p = 1, exact in fp8, so O is the mean of the visible
  values to the output cast: that pins v's path (its factor, the mask, GQA's mapping).
"""
import math

import pytest
import torch

import fastattn
from conftest import DEVICE, available_backends
from fastattn.kernels._env import INTERPRET
from fastattn.ops import flash_attention_fp8 as ops
from fastattn.ops.flash_attention_fp8 import FP8, flash_attention_fp8, quantize_fp8

BACKENDS = available_backends(ops.BACKENDS)


def _inputs(b, h, hkv, tq, tk, d, per, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(b, n, t, d, generator=g) * s
            for n, t, s in ((h, tq, 1.5), (hkv, tk, 1.0), (hkv, tk, 3.0))]
    if per == "none":                          # values that e4m3 holds exactly, factor 1
        fp8 = [x.clamp(-448, 448).to(FP8) for x in real]
        return [x.to(DEVICE) for x in fp8], (None, None, None)
    q, dq = quantize_fp8(real[0], per, hkv if per == "head" else None)
    (k, dk), (v, dv) = (quantize_fp8(x, per) for x in real[1:])
    return [x.to(DEVICE) for x in (q, k, v)], tuple(x.to(DEVICE) for x in (dq, dk, dv))


def _reference(q, k, v, descales, causal, scale, window=(-1, -1), softcap=0.0):
    """float64 attention on the real values (descale applied), any window, soft cap."""
    group = q.shape[1] // k.shape[1]
    real = []
    for x, factor, repeat in zip((q, k, v), descales, (1, group, group)):
        x = x.double().cpu()
        if factor is not None:
            f = factor.double().cpu()
            x = x * (f if f.dim() == 0 else f[:, :, None, None].repeat_interleave(
                group if x.shape[1] != f.shape[1] else 1, 1))
        real.append(x.repeat_interleave(repeat, 1))
    q, k, v = real
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    tq, tk = s.shape[-2:]
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(tq, tk, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    s = s.masked_fill(~seen, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, v.abs().max(), torch.logsumexp(s, -1)


def _check(o, lse, q, k, v, descales, backend, out_dtype, causal, scale, **options):
    """o and lse against float64 on the real values, within the bounds above."""
    ref, vmax, ref_lse = _reference(q, k, v, descales, causal, scale, **options)
    assert o.dtype == out_dtype and o.is_contiguous()
    lse = lse.double().cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen], rtol=1e-5, atol=1e-5)
    cast = torch.finfo(out_dtype).eps          # a cast may truncate (the interpreter's)
    fp8_p = 2.0 ** -3 + k.shape[2] * 2.0 ** -9 if backend == "triton" else 0.0
    err = (o.double().cpu() - ref).abs()
    bound = fp8_p * vmax + cast * ref.abs() + 1e-5 * vmax
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound {bound.max():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per", ["tensor", "head", "none"])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d", [(2, 4, 2, 37, 37, 64), (1, 2, 1, 19, 45, 40),
                                            (1, 3, 3, 33, 17, 16), (1, 2, 2, 1, 70, 96)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_on_the_real_values(backend, per, b, h, hkv, tq, tk, d, causal):
    (q, k, v), descales = _inputs(b, h, hkv, tq, tk, d, per)
    with fastattn.use_backend(backend):
        o, lse = flash_attention_fp8(q, k, v, *descales, causal=causal, return_lse=True)
    assert lse.shape == (b, h, tq) and lse.dtype == torch.float32
    _check(o, lse, q, k, v, descales, backend, torch.bfloat16, causal, d ** -0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_window_softcap_scale_and_fp16_output(backend, out_dtype):
    (q, k, v), descales = _inputs(1, 4, 2, 41, 41, 32, "head", seed=3)
    kw = dict(causal=True, scale=0.3, window=(9, 0), softcap=5.0)
    with fastattn.use_backend(backend):
        o, lse = flash_attention_fp8(q, k, v, *descales, **kw, out_dtype=out_dtype,
                                     return_lse=True)
    _check(o, lse, q, k, v, descales, backend, out_dtype, True, 0.3, window=(9, 0),
           softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (5, 3)),
                                           (True, (7, -1))])
def test_equal_scores_average_the_visible_values(backend, causal, window):
    """k = 0: every visible key gets p = 1, exact in fp8, so each output row is the mean
    of the values its row sees, to the output's cast: v's factor (per KV head), the mask
    and GQA's mapping, held tightly."""
    (q, k, v), (dq, dk, dv) = _inputs(2, 4, 2, 23, 29, 48, "head", seed=11)
    k = torch.zeros_like(k)
    with fastattn.use_backend(backend):
        o = flash_attention_fp8(q, k, v, dq, dk, dv, causal=causal, window=window)
    ref, vmax, _ = _reference(q, k, v, (dq, dk, dv), causal, 1.0, window)
    err = (o.double().cpu() - ref).abs()
    assert (err <= 2.0 ** -7 * ref.abs() + 1e-5 * vmax).all(), err.max()   # bf16 eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    """The kernel and the torch backend on the same fp8 inputs (non-causal, GQA)."""
    (q, k, v), descales = _inputs(1, 4, 1, 25, 31, 64, "head", seed=5)
    with fastattn.use_backend(backend):
        o = flash_attention_fp8(q, k, v, *descales)
    with fastattn.use_backend("torch"):
        want = flash_attention_fp8(q, k, v, *descales)
    vmax = v.float().abs().max() * descales[2].max()
    fp8_p = 2.0 ** -3 + k.shape[2] * 2.0 ** -9
    assert (o.float() - want.float()).abs().max() <= fp8_p * vmax + 2 ** -7 * want.abs().max()


def test_quantize_fp8_round_trip():
    """x ≈ x_fp8 · descale within e4m3's half ulp (2⁻⁴ relative), the largest magnitude
    landing on 448; per head, one factor per (batch, head) or per KV group."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None]
    for per, kv, shape in (("tensor", None, ()), ("head", None, (2, 4)), ("head", 2, (2, 2))):
        x8, descale = quantize_fp8(x, per, kv)
        assert x8.dtype == FP8 and descale.shape == shape and descale.dtype == torch.float32
        f = descale if per == "tensor" else descale.repeat_interleave(4 // shape[1], 1)[
            :, :, None, None]
        back = x8.float() * f
        assert ((back - x).abs() <= 2.0 ** -4 * x.abs() + 2.0 ** -9 * f).all()
        assert x8.float().abs().amax() == 448.0
    zero8, one = quantize_fp8(torch.zeros(3, 3))
    assert one.item() == 1.0 and zero8.float().abs().max() == 0


@pytest.mark.parametrize("case,error,match", [
    ("dtype", TypeError, "q dtype must be torch.float8_e4m3fn"),
    ("grad", ValueError, "requires grad"),
    ("descale_shape", ValueError, r"k_descale must hold one factor .* got shape \(3,\)"),
    ("descale_dtype", TypeError, "v_descale dtype must be float32"),
    ("out_dtype", ValueError, "out_dtype must be torch.bfloat16 or torch.float16"),
    ("heads", ValueError, "k/v heads must divide q heads 3"),
    ("window", ValueError, "window must be a pair"),
    ("per", ValueError, "per must be 'tensor' or 'head'"),
])
def test_bad_input_names_the_argument(case, error, match):
    (q, k, v), (dq, dk, dv) = _inputs(1, 2, 2, 8, 8, 16, "tensor")
    kw = {}
    if case == "dtype":
        q = q.to(torch.bfloat16)
    elif case == "grad":
        q = q.to(torch.bfloat16).requires_grad_().to(FP8)
    elif case == "descale_shape":
        dk = torch.ones(3, device=DEVICE)
    elif case == "descale_dtype":
        dv = dv.double()
    elif case == "out_dtype":
        kw["out_dtype"] = torch.float32
    elif case == "heads":
        q = torch.cat([q, q[:, :1]], 1)
    elif case == "window":
        kw["window"] = (3,)
    with pytest.raises(error, match=match):
        if case == "per":
            quantize_fp8(q.float(), "channel")
        flash_attention_fp8(q, k, v, dq, dk, dv, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Fake kernel and AOT dispatch of the op. (opcheck's schema check compares the inputs
    before and after with arithmetic that torch's CPU kernels lack for float8.)"""
    (q, k, v), (dq, dk, dv) = _inputs(1, 2, 1, 9, 11, 16, "head")
    descale = ops._descale((dq, dk, dv), 1, 1, q.device)
    torch.library.opcheck(torch.ops.fastattn.flash_attention_fp8_fwd.default,
                          (q, k, v, descale, True, -1, 0, 0.0, 0.25, torch.bfloat16, backend),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_exported_and_compiles():
    """Public at the top level; traces into one graph under torch.compile."""
    assert fastattn.flash_attention_fp8 is flash_attention_fp8
    assert fastattn.quantize_fp8 is quantize_fp8
    (q, k, v), descales = _inputs(1, 2, 2, 8, 8, 16, "tensor")
    fn = torch.compile(lambda *a: flash_attention_fp8(*a, causal=True), fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(q, k, v, *descales),
                               flash_attention_fp8(q, k, v, *descales, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func_takes_flash_attn3_fp8_form(backend):
    """``flash_attn_func`` with fp8 (B, T, H, D) inputs and ``*_descale`` gives
    ``flash_attention_fp8``'s output, transposed; fp8 with dropout is refused."""
    (q, k, v), descales = _inputs(2, 4, 2, 13, 13, 32, "head", seed=7)
    t = [x.transpose(1, 2) for x in (q, k, v)]
    names = dict(zip(("q_descale", "k_descale", "v_descale"), descales))
    with fastattn.use_backend(backend):
        out = fastattn.flash_attn_func(*t, causal=True, **names)
        want = flash_attention_fp8(q, k, v, *descales, causal=True)
    assert out.shape == (2, 13, 4, 32) and out.dtype == torch.bfloat16
    assert torch.equal(out, want.transpose(1, 2))
    with pytest.raises(ValueError, match="fp8 inputs take no dropout_p"):
        fastattn.flash_attn_func(*t, dropout_p=0.1, **names)


def _forward_tile_pairs():
    """Every (band, BLOCK_M, BLOCK_N) of the 16-bit forward tile lists (fp8 takes them)."""
    from fastattn.kernels import flash_attention as fa
    return sorted({(band, m, n) for (bits, band, _), tiles in fa.FWD_TILES.items()
                   if bits == 16 for m, n, _, _ in tiles})


FWD_PAIRS = _forward_tile_pairs() if INTERPRET else []   # on a GPU the autotuner picks
BAND_HEAD_DIM = {64: 40, 128: 80, 256: 160}      # 80 and 160 split (64+32, 128+32)


@pytest.mark.parametrize("band,block_m,block_n", FWD_PAIRS,
                         ids=[f"D{b}-{m}x{n}" for b, m, n in FWD_PAIRS])
def test_every_forward_tile(monkeypatch, band, block_m, block_n):
    """The GPU tiles through the interpreter: causal diagonal, key tail and fully visible
    blocks fall elsewhere with each tile; lengths no tile divides, Tq < Tk, GQA."""
    from fastattn.kernels import flash_attention as fa
    monkeypatch.setattr(fa, "_TILES", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    d = BAND_HEAD_DIM[band]
    (q, k, v), descales = _inputs(1, 2, 1, 70, 93, d, "head", seed=block_m + block_n)
    with fastattn.use_backend("triton"):
        o, lse = flash_attention_fp8(q, k, v, *descales, causal=True, return_lse=True)
    _check(o, lse, q, k, v, descales, "triton", torch.bfloat16, True, d ** -0.5)
