"""The Triton flash-attention launchers with the attention variants, against float64.

Head dims that are not multiples of 8 (down to 1), sliding windows, soft cap, ALiBi,
dropout and variable-length (varlen) batches, forward and backward, each against
``fastattn.reference.attention`` / ``attention_varlen`` in float64 on the same rounded
inputs (tolerances as in test_flash_attention_kernels.py: fp32 within 1e-4 × (1 + max
|reference|), fp16/bf16 within 2× eager torch plus a floor). Dropout is compared exactly,
with the keep mask rebuilt by ``fastattn.ops._philox.keep_mask``, and its statistics are
read back from the kernel itself.

On a CPU-only machine these run through the Triton interpreter, whose tiles are 16×16:
windows are chosen to start and end inside those tiles, and lengths to leave tails.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before "
                "triton is imported (tests/conftest.py sets it on CPU-only machines)",
                allow_module_level=True)
pytest.importorskip("triton")

from fastattn import reference  # noqa: E402
from fastattn.kernels import flash_attention as fa  # noqa: E402
from fastattn.ops._philox import keep_mask  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _inputs(b, h, hkv, tq, tk, d, dtype, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g) * magnitude
    k = torch.randn(b, hkv, tk, d, generator=g) * magnitude
    v = torch.randn(b, hkv, tk, d, generator=g)
    do = torch.randn(b, h, tq, d, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _slopes(b, h, per_batch):
    """ALiBi slopes: (H,) geometric as in the paper, expanded to (B, H) with batch
    stride 0, or (B, H) different in every batch."""
    base = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)
    if per_batch:
        return (base * torch.linspace(0.5, 1.5, b)[:, None]).to(DEVICE)
    return base.to(DEVICE).expand(b, h)


def _keep(seed, offset, b, h, tq, tk, p):
    """The kernels' dropout keep mask (B, H, Tq, Tk), rebuilt in torch."""
    bh = torch.arange(b * h).view(b, h, 1, 1)
    return keep_mask(seed, offset, bh, torch.arange(tq)[:, None], torch.arange(tk)[None],
                     p).to(DEVICE)


def _reference(q, k, v, do, causal, scale, dtype=torch.float64, **options):
    """Output, lse and (dq, dk, dv) of ``reference.attention`` run in ``dtype``."""
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    o, lse = reference.attention(*xs, causal, scale, **options)
    return o.detach(), lse.detach(), torch.autograd.grad(o, xs, do.to(dtype))


def _assert_lse_close(lse, ref_lse):
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "rows that see no key need lse = -inf"
    if seen.any():
        err = (lse[seen].double() - ref_lse[seen]).abs().max().item()
        assert err <= 1e-4 * (1.0 + ref_lse[seen].abs().max().item()), f"lse: error {err:.3g}"


def _kernel_options(options):
    """The launcher's keywords for the reference's: the mask becomes (seed, offset)."""
    kernel = {k: v for k, v in options.items() if k not in ("dropout_mask", "stream")}
    if "stream" in options:
        kernel["seed"], kernel["offset"] = options["stream"]
    return kernel


def _check(q, k, v, do, causal, scale, deterministic=True, **options):
    """Forward and backward of the launchers against the float64 reference; returns the
    kernels' (o, lse, dq, dk, dv). ``options``: the reference's keywords, plus
    ``stream=(seed, offset)`` with dropout; ``deterministic`` goes to the backward."""
    kernel = _kernel_options(options)
    o, lse = fa.attn_fwd(q, k, v, causal, scale, **kernel)
    dq, dk, dv = fa.attn_bwd(do, q, k, v, o, lse, causal, scale,
                             deterministic=deterministic, **kernel)
    for t in (o, lse, dq, dk, dv):
        assert t.is_contiguous()
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv)), "NaN or inf in a result"

    ref = {k: v for k, v in options.items() if k != "stream"}
    ro, rlse, rgrads = _reference(q, k, v, do, causal, scale, **ref)
    if q.dtype == torch.float32:
        eo, egrads = None, (None,) * 3
    else:
        eo, _, egrads = _reference(q, k, v, do, causal, scale, q.dtype, **ref)
    assert_close(o, ro, "out", eager=eo)
    _assert_lse_close(lse, rlse)
    for name, g, rg, eg in zip(("dq", "dk", "dv"), (dq, dk, dv), rgrads, egrads):
        assert_close(g, rg, name, eager=eg)
    return o, lse, dq, dk, dv


# ----------------------------------------------------------------------- head dims


@pytest.mark.parametrize("d,dtype", [(1, FP32), (7, FP16), (59, BF16), (111, FP32),
                                     (256, FP32)], ids=["D1", "D7-fp16", "D59-bf16",
                                                        "D111", "D256"])
def test_any_head_dim(d, dtype):
    """Head dims that are not multiples of 8, padded to BLOCK_D = max(16, 2^k)."""
    q, k, v, do = _inputs(1, 2, 1, 19, 23, d, dtype)
    _check(q, k, v, do, True, 0.9 * d ** -0.5)


# ------------------------------------------------------------------------ windows

# (Tq, Tk, H, Hkv, causal, window): edges inside the 16-row tiles, one side open,
# causal folded in (right = 0 whatever the given right), Tq != Tk both ways, GQA.
WINDOWS = [
    (50, 50, 2, 2, False, (5, 3)),
    (70, 70, 2, 1, False, (20, -1)),
    (70, 70, 2, 2, False, (-1, 9)),
    (61, 61, 4, 2, True, (7, -1)),
    (45, 45, 2, 2, True, (13, 4)),
    (23, 61, 2, 1, False, (10, 2)),
    (61, 23, 2, 2, False, (3, 3)),
    (40, 40, 2, 2, False, (0, 0)),
    (33, 30, 2, 2, False, (100, 100)),
]


@pytest.mark.parametrize("tq,tk,h,hkv,causal,window", WINDOWS,
                         ids=[f"Tq{c[0]}Tk{c[1]}-H{c[2]}kv{c[3]}-{'causal' if c[4] else 'full'}"
                              f"-w{c[5][0]},{c[5][1]}" for c in WINDOWS])
def test_window_matches_reference(tq, tk, h, hkv, causal, window):
    q, k, v, do = _inputs(1, h, hkv, tq, tk, 24, FP32)
    _check(q, k, v, do, causal, 0.3, window=window)


def test_window_bf16():
    q, k, v, do = _inputs(2, 2, 2, 37, 53, 64, BF16)
    _check(q, k, v, do, True, 0.125, window=(11, -1))


def test_window_rows_without_keys():
    """A window right of the keys: with Tq > Tk and right = 2 the first 23 rows see no
    key. They get o = 0, lse = -inf and dq = 0, with no NaN anywhere."""
    q, k, v, do = _inputs(1, 2, 1, 45, 20, 32, FP32)
    o, lse, dq, _, _ = _check(q, k, v, do, False, 0.2, window=(3, 2))
    blind = 45 - 20 - 2
    assert torch.equal(o[:, :, :blind], torch.zeros_like(o[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all() and torch.isfinite(lse[:, :, blind:]).all()
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))


def test_window_skips_key_blocks_outside():
    """Key blocks that no row of a query block can see are not visited: keys and values
    of those blocks are NaN, and every result stays finite and exact. (A masked visit
    would still turn 0 · NaN into NaN through P·V.) One query block of 16 rows at the
    end of 160 keys, window 20 to the left: it sees keys 124..159, blocks 7-9, and the
    dK/dV programs of blocks 0-6 must write zeros without reading a query."""
    q, k, v, do = _inputs(1, 2, 2, 16, 160, 32, FP32)
    clean = [x.clone() for x in (k, v)]
    for x in (k, v):
        x[:, :, :112] = float("nan")
    o, lse = fa.attn_fwd(q, k, v, True, 0.2, window=(20, -1))
    dq, dk, dv = fa.attn_bwd(do, q, k, v, o, lse, True, 0.2, window=(20, -1))
    ro, rlse, (rdq, rdk, rdv) = _reference(q, *clean, do, True, 0.2, window=(20, -1))
    assert_close(o, ro, "out")
    _assert_lse_close(lse, rlse)
    assert_close(dq, rdq, "dq")
    for name, g, rg in (("dk", dk, rdk), ("dv", dv, rdv)):
        assert torch.equal(g[:, :, :112], torch.zeros_like(g[:, :, :112])), name
        assert_close(g[:, :, 112:], rg[:, :, 112:], name)


# ------------------------------------------------------------------ softcap, ALiBi


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_softcap(dtype):
    """Scores of magnitude ~10 under a cap of 4: tanh saturates for many of them, so
    the 1 - tanh² of the backward matters."""
    q, k, v, do = _inputs(1, 4, 2, 33, 41, 40, dtype, magnitude=2.0)
    _check(q, k, v, do, True, 40 ** -0.5, softcap=4.0)


@pytest.mark.parametrize("per_batch", [False, True], ids=["H-expanded", "BxH"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(per_batch, causal):
    b, h = 2, 4
    q, k, v, do = _inputs(b, h, 2, 27, 38, 32, FP32)
    _check(q, k, v, do, causal, 0.2, alibi=_slopes(b, h, per_batch))


def test_alibi_negative_slopes():
    """Negative slopes make scores grow with distance, past exp's fp32 range (3 × 51 >
    88): the online softmax must never exponentiate a raw score, and the query rows
    past Tq that pad the last tile (their bias is largest) must add nothing to dK/dV."""
    q, k, v, do = _inputs(1, 2, 1, 20, 40, 16, FP32)
    slopes = torch.tensor([-3.0, -1.0], device=DEVICE).expand(1, 2)
    _check(q, k, v, do, False, 0.2, alibi=slopes)


def test_alibi_takes_h_slopes():
    """(H,) slopes are accepted as they are, the same for every batch."""
    q, k, v, do = _inputs(2, 2, 2, 9, 12, 16, FP32)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    o, lse = fa.attn_fwd(q, k, v, False, 0.3, alibi=slopes)
    o2, lse2 = fa.attn_fwd(q, k, v, False, 0.3, alibi=slopes.expand(2, 2))
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


def test_every_variant_at_once():
    """Window, soft cap, ALiBi and dropout together, fp16, GQA, Tq != Tk."""
    b, h, tq, tk, p = 1, 4, 29, 45, 0.25
    q, k, v, do = _inputs(b, h, 2, tq, tk, 48, FP16)
    _check(q, k, v, do, True, 48 ** -0.5, window=(17, -1), softcap=6.0,
           alibi=_slopes(b, h, True), dropout_p=p, stream=(99, 5),
           dropout_mask=_keep(99, 5, b, h, tq, tk, p))


# ------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("seed,offset", [(0, 0), (2 ** 40 + 17, 2 ** 31 + 3)],
                         ids=["small", "64-bit-seed"])
def test_dropout_matches_reference_with_rebuilt_mask(seed, offset):
    """Forward and backward with the mask rebuilt in torch from (seed, offset): equal
    up to rounding, so the kernels draw exactly the spec's Philox numbers (a seed
    above 2**32 and an offset above 2**31 test the 64/32-bit handling)."""
    b, h, tq, tk, p = 2, 2, 21, 35, 0.3
    q, k, v, do = _inputs(b, h, 1, tq, tk, 32, FP32)
    _check(q, k, v, do, False, 0.25, dropout_p=p, stream=(seed, offset),
           dropout_mask=_keep(seed, offset, b, h, tq, tk, p))


def _kept(seed, offset, p, b=1, h=2, t=64):
    """The keep mask (B, H, T, T) as the kernel applies it, read back from its output:
    with q = 0 every key gets P = 1/T, and v = the identity puts key j in column j, so
    o_ij = keep_ij / ((1 - p) · T)."""
    q = torch.zeros(b, h, t, t, device=DEVICE)
    v = torch.eye(t, device=DEVICE).expand(b, h, t, t)
    o, _ = fa.attn_fwd(q, v, v, False, 1.0, dropout_p=p, seed=seed, offset=offset)
    scaled = o * (1 - p) * t
    kept = scaled > 0.5
    torch.testing.assert_close(scaled, kept.float(), atol=1e-5, rtol=0)
    return kept


def test_dropout_statistics():
    """Keep rate 1 - p, the same mask for the same (seed, offset), another one for
    another seed or offset, and the mask of fastattn.ops._philox bit for bit."""
    p = 0.3
    kept = _kept(1234, 5, p)
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 0.03, f"keep rate {rate:.3f}, expected {1 - p}"
    assert torch.equal(kept, _kept(1234, 5, p))
    for other in (_kept(1235, 5, p), _kept(1234, 6, p)):
        agree = (other == kept).float().mean().item()
        assert agree < 0.7, f"another stream agrees on {agree:.2f} of the mask"
    assert not torch.equal(kept[:, 0], kept[:, 1]), "two heads share one mask"
    assert torch.equal(kept, _keep(1234, 5, 1, 2, 64, 64, p))


# ------------------------------------------------------------------------- varlen

CU_Q = [0, 5, 5, 30, 47, 48]      # lengths 5, 0, 25, 17, 1
CU_K = [0, 9, 21, 21, 47, 50]     # lengths 9, 12, 0, 26, 3: sequence 2's rows see nothing


def _varlen_inputs(h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = CU_Q[-1], CU_K[-1]
    xs = [torch.randn(total_q, h, d, generator=g), torch.randn(total_k, hkv, d, generator=g),
          torch.randn(total_k, hkv, d, generator=g), torch.randn(total_q, h, d, generator=g)]
    cu = [torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (CU_Q, CU_K)]
    return [x.to(DEVICE, dtype) for x in xs], cu


def _varlen_masks(seed, offset, h, p):
    """Per-sequence keep masks (1, H, Tq_b, Tk_b): bh = b·H + h, rows and keys counted
    from each sequence's start."""
    masks = []
    for b in range(len(CU_Q) - 1):
        tq, tk = CU_Q[b + 1] - CU_Q[b], CU_K[b + 1] - CU_K[b]
        bh = (b * h + torch.arange(h)).view(1, h, 1, 1)
        masks.append(keep_mask(seed, offset, bh, torch.arange(tq)[:, None],
                               torch.arange(tk)[None], p).to(DEVICE))
    return masks


def _check_varlen(qkvdo, cu, causal, scale, max_extra=0, deterministic=True, **options):
    q, k, v, do = qkvdo
    lengths = {"max_seqlen_q": max(b - a for a, b in zip(CU_Q, CU_Q[1:])) + max_extra,
               "max_seqlen_k": max(b - a for a, b in zip(CU_K, CU_K[1:])) + max_extra}
    kernel = {**_kernel_options(options), **lengths}
    o, lse = fa.attn_fwd(q, k, v, causal, scale, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1],
                         **kernel)
    dq, dk, dv = fa.attn_bwd(do, q, k, v, o, lse, causal, scale, cu_seqlens_q=cu[0],
                             cu_seqlens_k=cu[1], deterministic=deterministic, **kernel)
    assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv)), "NaN or inf in a result"

    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = {key: val for key, val in options.items() if key != "stream"}
    ro, rlse = reference.attention_varlen(*xs, *cu, causal, scale, **ref)
    rgrads = torch.autograd.grad(ro, xs, do.double())
    assert_close(o, ro.detach(), "out")
    _assert_lse_close(lse, rlse)
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), rgrads):
        assert_close(g, rg, name)
    return o, lse, dq, dk, dv


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (True, (6, -1)), (False, (4, 7))],
                         ids=["full", "causal", "causal-w6", "w4,7"])
def test_varlen_matches_reference(causal, window):
    """Five sequences packed: an empty one, one whose queries see no key (it has none),
    odd lengths, GQA; max_seqlen above the longest (an upper bound is enough)."""
    qkvdo, cu = _varlen_inputs(4, 2, 24, FP32)
    o, lse, _, dk, dv = _check_varlen(qkvdo, cu, causal, 0.3, max_extra=3, window=window)
    blind = slice(CU_Q[2], CU_Q[3])                   # sequence 2: 25 queries, no key
    assert torch.equal(o[blind], torch.zeros_like(o[blind]))
    assert torch.isneginf(lse[:, blind]).all()


def test_varlen_variants_and_strided_inputs():
    """Varlen with ALiBi (B, H), soft cap and dropout, q/k/v slices of one packed
    (total, 3, H, D) projection (non-contiguous) and dO transposed."""
    h, d, p = 2, 16, 0.2
    (q, k, v, do), cu = _varlen_inputs(h, h, d, FP32, seed=1)
    total_q, total_k = CU_Q[-1], CU_K[-1]
    packed = torch.zeros(max(total_q, total_k), 3, h, d, device=DEVICE)
    packed[:total_q, 0], packed[:total_k, 1], packed[:total_k, 2] = q, k, v
    q, k, v = packed[:total_q, 0], packed[:total_k, 1], packed[:total_k, 2]
    do = do.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(x.is_contiguous() for x in (q, k, v, do))
    _check_varlen((q, k, v, do), cu, True, 0.25, softcap=3.0, alibi=_slopes(5, h, True),
                  dropout_p=p, stream=(7, 11), dropout_mask=_varlen_masks(7, 11, h, p))


def test_varlen_outputs_are_fully_written(monkeypatch):
    """Every element of o, lse, dq, dk and dv is written, the rows of empty sequences'
    partners included (dk = dv = 0 for keys no query sees): allocations are poisoned
    with NaN, and the results equal those of a clean run bit for bit."""
    qkvdo, cu = _varlen_inputs(2, 1, 8, FP32, seed=2)
    lengths = dict(max_seqlen_q=25, max_seqlen_k=26)

    def run():
        q, k, v, do = qkvdo
        o, lse = fa.attn_fwd(q, k, v, True, 0.3, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1],
                             **lengths)
        return (o, lse, *fa.attn_bwd(do, q, k, v, o, lse, True, 0.3, cu_seqlens_q=cu[0],
                                     cu_seqlens_k=cu[1], **lengths))

    clean = run()
    monkeypatch.setattr(fa, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), run(), clean):
        assert torch.equal(a, b), f"{name} has elements the kernels never wrote"
    dk = clean[3]
    no_query = slice(CU_K[1], CU_K[2])                # sequence 1: keys, no query
    assert torch.equal(dk[no_query], torch.zeros_like(dk[no_query]))


def test_variants_backward_is_deterministic():
    """dK/dV sum a KV group's query heads in one program, dropout replays its mask:
    two backward runs agree bit for bit."""
    q, k, v, do = _inputs(1, 4, 2, 37, 37, 32, FP32)
    options = dict(window=(9, -1), softcap=5.0, dropout_p=0.2, seed=3, offset=1)
    o, lse = fa.attn_fwd(q, k, v, True, 0.2, **options)
    first = fa.attn_bwd(do, q, k, v, o, lse, True, 0.2, **options)
    second = fa.attn_bwd(do, q, k, v, o, lse, True, 0.2, **options)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------- the atomic-dQ backward


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_atomic_dq_with_every_variant(dtype):
    """deterministic=False (dQ added with atomics by the dK/dV programs) with a causal
    window, soft cap, ALiBi (B, H) and dropout, GQA, Tq != Tk."""
    b, h, tq, tk, p = 2, 4, 29, 45, 0.25
    q, k, v, do = _inputs(b, h, 2, tq, tk, 40, dtype)
    _check(q, k, v, do, True, 40 ** -0.5, deterministic=False, window=(17, -1),
           softcap=6.0, alibi=_slopes(b, h, True), dropout_p=p, stream=(99, 5),
           dropout_mask=_keep(99, 5, b, h, tq, tk, p))


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (4, 7))],
                         ids=["causal", "w4,7"])
def test_atomic_dq_varlen(causal, window):
    """deterministic=False on packed sequences (an empty one, one whose queries see no
    key), GQA, soft cap and dropout, max_seqlen above the longest."""
    h, p = 4, 0.2
    qkvdo, cu = _varlen_inputs(h, 2, 24, FP32, seed=3)
    _check_varlen(qkvdo, cu, causal, 0.3, max_extra=3, deterministic=False,
                  window=window, softcap=4.0, dropout_p=p, stream=(7, 11),
                  dropout_mask=_varlen_masks(7, 11, h, p))


# ------------------------------------------------------------------ the GPU tiles

# (BLOCK_M, BLOCK_N) pairs of the tile tables with BLOCK_M != BLOCK_N both ways.
WIDE_TILES = [(128, 64), (32, 128), (64, 16)]


@pytest.mark.parametrize("block_m,block_n", WIDE_TILES,
                         ids=[f"{m}x{n}" for m, n in WIDE_TILES])
def test_window_with_gpu_tiles(monkeypatch, block_m, block_n):
    """The window's block ranges with the GPU tiles, whose query and key blocks differ
    in size: edges, fully visible blocks and skipped ones fall elsewhere than with the
    interpreter's 16×16."""
    if not INTERPRET:
        pytest.skip("on a GPU the autotuner picks the tiles; this forces them through "
                    "the interpreter")
    monkeypatch.setattr(fa, "_TILES", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    q, k, v, do = _inputs(1, 2, 1, 150, 171, 40, FP32)
    _check(q, k, v, do, False, 0.15, window=(70, 45))


def _variant_first_tiles():
    """(kind, operand bits, BLOCK_M, BLOCK_N) of every first tile that the scored
    variants (soft cap, ALiBi, dropout) and the atomic-dQ backward launch with
    FASTATTN_AUTOTUNE=0, over the three kernels."""
    return sorted({(kind, bits, m, n)
                   for table in (fa.FWD_TILES, fa.DKDV_TILES, fa.DQ_TILES)
                   for (bits, _, kind), tiles in table.items() if kind != "plain"
                   for m, n, _, _ in tiles[:1]})


VARIANT_FIRST_TILES = _variant_first_tiles()


@pytest.mark.parametrize("kind,bits,block_m,block_n", VARIANT_FIRST_TILES,
                         ids=[f"{k}-{b}bit-{m}x{n}" for k, b, m, n in VARIANT_FIRST_TILES])
def test_every_variant_with_its_first_tiles(monkeypatch, kind, bits, block_m, block_n):
    """The spill-free first tiles chosen for the scored variants and the atomic-dQ
    backward (narrower than the plain ones: 16-row dK/dV query blocks, 16- and 32-key
    dQ blocks) with every variant on, through the interpreter (the atomic ones with
    deterministic=False): a causal window, soft cap, ALiBi, dropout, GQA, Tq != Tk,
    lengths that no tile divides."""
    if not INTERPRET:
        pytest.skip("on a GPU the autotuner picks the tiles; this forces them through "
                    "the interpreter")
    monkeypatch.setattr(fa, "_TILES", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    b, h, tq, tk, p = 1, 4, 75, 91, 0.2
    dtype = FP32 if bits == 32 else (FP16, BF16)[(block_m + block_n) // 16 % 2]
    q, k, v, do = _inputs(b, h, 2, tq, tk, 40, dtype)
    _check(q, k, v, do, True, 40 ** -0.5, deterministic=kind != "atomic",
           window=(33, -1), softcap=6.0, alibi=_slopes(b, h, True), dropout_p=p,
           stream=(5, 2), dropout_mask=_keep(5, 2, b, h, tq, tk, p))


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize("options,match", [
    (dict(window=(-2, 0)), r"window must be two ints >= -1 .* got \(-2, 0\)"),
    (dict(softcap=-1.0), r"softcap must be a finite float >= 0 .* got -1.0"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=0.1, seed=-1), r"dropout seed must be in \[0, 2\*\*63\) .* got -1"),
    (dict(alibi=torch.zeros(3)), r"alibi must be \(2,\) or \(1, 2\), got \(3,\)"),
    (dict(alibi=torch.zeros(2, dtype=torch.float64)), "alibi must be float32"),
], ids=["window", "softcap", "dropout_p", "seed", "alibi-shape", "alibi-dtype"])
def test_bad_options_raise(options, match):
    q, k, v, _ = _inputs(1, 2, 2, 4, 4, 16, FP32)
    options = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val)
               for key, val in options.items()}
    with pytest.raises(ValueError, match=match):
        fa.attn_fwd(q, k, v, False, 1.0, **options)


def test_bad_varlen_arguments_raise():
    (q, k, v, _), (cu_q, cu_k) = _varlen_inputs(2, 2, 8, FP32)
    with pytest.raises(ValueError, match="cu_seqlens_k must be a 1-D int32 tensor"):
        fa.attn_fwd(q, k, v, False, 1.0, cu_seqlens_q=cu_q, cu_seqlens_k=None,
                    max_seqlen_q=25, max_seqlen_k=26)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        fa.attn_fwd(q, k, v, False, 1.0, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k,
                    max_seqlen_q=25, max_seqlen_k=26)
    with pytest.raises(ValueError, match="max_seqlen_q must be an int >= the longest"):
        fa.attn_fwd(q, k, v, False, 1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    max_seqlen_k=26)
    with pytest.raises(ValueError, match=r"varlen q, k must be \(total, H, D\)"):
        fa.attn_fwd(q[None], k[None], v[None], False, 1.0, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, max_seqlen_q=25, max_seqlen_k=26)
