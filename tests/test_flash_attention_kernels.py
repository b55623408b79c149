"""The Triton flash-attention launchers (``attn_fwd`` / ``attn_bwd``) against float64.

These call the kernels directly, below the op layer (``test_flash_attention.py`` tests
the op). On a CPU-only machine they run through the Triton interpreter, whose tiles
are 16×16: the lengths below are chosen around and across those tiles (1, 17, 97,
128, 300), and most are not multiples of the GPU tiles (32/64/128) either.

Tolerances. The reference is ``fastattn.reference.attention`` in float64 on the same
(rounded) inputs.
- fp32: the kernels accumulate in fp32 and use true-fp32 dots, so the max error stays
  within 1e-4 × (1 + max |reference|).
- fp16/bf16: flash-attention's rule. The max error may be at most 2× that of eager
  torch at the same dtype (the reference attention run in fp16/bf16), plus a floor of
  2 eps of the dtype × (1 + max |reference|) for the cases where eager torch happens
  to round well.
- lse is fp32 for every dtype and computed from the same rounded inputs, so it is held
  to 1e-4 × (1 + max |lse|).
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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastattn import reference  # noqa: E402
from fastattn.kernels import flash_attention as fa  # noqa: E402
from tolerances import assert_close, assert_within, attention_rounding_bound  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, H, Hkv, Tq, Tk, D, dtype); each case runs causal and non-causal.
CASES = [
    # Tq == Tk
    (2, 2, 2, 1, 1, 32, FP32),
    (1, 2, 2, 17, 17, 40, FP32),
    (1, 2, 2, 97, 97, 64, FP32),
    (1, 1, 1, 128, 128, 80, FP32),
    # Tq != Tk: decoding, more keys than queries, more queries than keys (with causal,
    # the first Tq - Tk rows see no key)
    (1, 2, 2, 1, 100, 64, FP32),
    (1, 2, 2, 17, 50, 48, FP32),
    (1, 2, 2, 50, 17, 16, FP32),
    # head dims, padded to the next power of two inside the kernels
    (1, 2, 2, 21, 21, 24, FP32),
    (1, 2, 2, 33, 33, 96, FP32),
    (1, 1, 1, 40, 29, 128, FP32),
    (1, 1, 1, 20, 20, 160, FP32),
    (1, 1, 1, 18, 18, 256, FP32),
    # GQA and MQA
    (1, 4, 2, 40, 40, 32, FP32),
    (1, 4, 1, 33, 47, 64, FP32),
    # fp16 and bf16
    (1, 2, 2, 97, 97, 64, FP16),
    (1, 4, 1, 50, 17, 40, FP16),
    (1, 1, 1, 20, 20, 256, FP16),
    (1, 2, 2, 97, 97, 64, BF16),
    (1, 4, 2, 50, 17, 40, BF16),
    (1, 1, 1, 33, 65, 128, BF16),
]


def _case_id(case):
    b, h, hkv, tq, tk, d, dtype = case
    return f"B{b}H{h}kv{hkv}-Tq{tq}Tk{tk}-D{d}-{str(dtype)[6:]}"


def _inputs(b, h, hkv, tq, tk, d, dtype, magnitude=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g) * magnitude
    k = torch.randn(b, hkv, tk, d, generator=g) * magnitude
    v = torch.randn(b, hkv, tk, d, generator=g)
    do = torch.randn(b, h, tq, d, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _reference(q, k, v, do, causal, scale, dtype=torch.float64):
    """Output, lse and (dq, dk, dv) of ``reference.attention`` run in ``dtype``."""
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    o, lse = reference.attention(*xs, causal=causal, scale=scale)
    return o.detach(), lse.detach(), torch.autograd.grad(o, xs, do.to(dtype))


def _run(q, k, v, do, causal, scale, deterministic=True):
    o, lse = fa.attn_fwd(q, k, v, causal, scale)
    return (o, lse, *fa.attn_bwd(do, q, k, v, o, lse, causal, scale,
                                 deterministic=deterministic))


def _assert_lse_close(lse, ref_lse):
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "rows that see no key need lse = -inf"
    if seen.any():
        err = (lse[seen].double() - ref_lse[seen]).abs().max().item()
        assert err <= 1e-4 * (1.0 + ref_lse[seen].abs().max().item()), f"lse: error {err:.3g}"


def _check_against_reference(q, k, v, do, causal, scale, deterministic=True):
    o, lse, dq, dk, dv = _run(q, k, v, do, causal, scale, deterministic)
    b, h, tq, d = q.shape
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert lse.shape == (b, h, tq) and lse.dtype == torch.float32 and lse.is_contiguous()
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
        assert torch.isfinite(g).all()
    assert torch.isfinite(o).all()

    ro, rlse, rgrads = _reference(q, k, v, do, causal, scale)
    if q.dtype == torch.float32:
        eo, egrads = None, (None,) * 3
    else:
        eo, _, egrads = _reference(q, k, v, do, causal, scale, q.dtype)
    assert_close(o, ro, "out", eager=eo)
    _assert_lse_close(lse, rlse)
    for name, g, rg, eg in zip(("dq", "dk", "dv"), (dq, dk, dv), rgrads, egrads):
        assert_close(g, rg, name, eager=eg)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64_reference(case, causal):
    *shape, dtype = case
    q, k, v, do = _inputs(*shape, dtype)
    # Not D**-0.5, so a kernel that assumes the default scale fails.
    scale = 0.7 * shape[-1] ** -0.5
    _check_against_reference(q, k, v, do, causal, scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence_spanning_many_tiles(causal):
    q, k, v, do = _inputs(1, 1, 1, 300, 300, 32, FP32)
    _check_against_reference(q, k, v, do, causal, 32 ** -0.5)


def test_rows_without_keys():
    """Causal with Tq > Tk: the first Tq - Tk rows (here two whole 16-row tiles and
    more) see no key. Output exactly 0, lse -inf, zero dq, and no NaN anywhere."""
    q, k, v, do = _inputs(1, 2, 1, 40, 7, 32, FP32)
    o, lse, dq, dk, dv = _run(q, k, v, do, True, 0.2)
    blind = 40 - 7
    assert torch.equal(o[:, :, :blind], torch.zeros_like(o[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all()
    assert torch.isfinite(lse[:, :, blind:]).all()
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv))


def test_outputs_are_fully_written(monkeypatch):
    """Every element of every output is written: allocations are poisoned with NaN,
    and the results must equal those of a clean run bit for bit."""
    q, k, v, do = _inputs(1, 4, 2, 37, 29, 40, FP32)
    clean = _run(q, k, v, do, True, 0.15)

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fa, "_empty", nan_empty)
    poisoned = _run(q, k, v, do, True, 0.15)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), poisoned, clean):
        assert torch.equal(a, b), f"{name} has elements the kernels never wrote"


def _strided_inputs(kind, b=2, t=19, h=4, d=32):
    """q, k, v as views that are not contiguous (B, H, T, D) tensors."""
    g = torch.Generator().manual_seed(1)
    if kind == "transposed":   # (B, T, H, D) tensors viewed as (B, H, T, D)
        xs = [torch.randn(b, t, h, d, generator=g).transpose(1, 2) for _ in range(3)]
    elif kind == "packed_qkv":  # slices of one (B, T, 3, H, D) projection output
        qkv = torch.randn(b, t, 3, h, d, generator=g)
        xs = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    elif kind == "expanded_kv":  # one KV head broadcast to every query head: stride 0
        xs = [torch.randn(b, h, t, d, generator=g)]
        xs += [torch.randn(b, 1, t, d, generator=g).expand(b, h, t, d) for _ in range(2)]
    else:  # "strided_d": every other position, and every other element of a wider D
        xs = [torch.randn(b, h, 2 * t, 2 * d, generator=g)[:, :, ::2, ::2]
              for _ in range(3)]
    return [x.to(DEVICE) for x in xs]


@pytest.mark.parametrize("kind", ["transposed", "packed_qkv", "expanded_kv", "strided_d"])
def test_strided_inputs_match_contiguous(kind):
    q, k, v = _strided_inputs(kind)
    assert not all(x.is_contiguous() for x in (q, k, v))
    dq_, dk_, dv_ = (x.contiguous() for x in (q, k, v))
    b, h, t, d = q.shape
    # dO and O strided too: (B, T, H, 2D) buffers, every other element of the last dim.
    do = torch.randn(b, t, h, 2 * d, device=DEVICE).transpose(1, 2)[..., ::2]

    o, lse = fa.attn_fwd(q, k, v, True, 0.2)
    o_c, lse_c = fa.attn_fwd(dq_, dk_, dv_, True, 0.2)
    o_strided = torch.empty(b, t, h, 2 * d, device=DEVICE).transpose(1, 2)[..., ::2]
    o_strided.copy_(o)
    grads = fa.attn_bwd(do, q, k, v, o_strided, lse, True, 0.2)
    grads_c = fa.attn_bwd(do.contiguous(), dq_, dk_, dv_, o_c, lse_c, True, 0.2)
    torch.testing.assert_close(o, o_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_c, atol=1e-6, rtol=1e-5)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g, g_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
def test_large_magnitude_scores(dtype):
    """q, k entries of ~100: scores of ±1e4 must neither overflow the online softmax
    nor lose more accuracy than their own rounding allows.

    Regression: the old fixed bound (1e-4 relative on dv) ignored that the fp32
    rounding of a score of 1e4 is itself ~1e-3, which the backward's P = exp(s − L)
    carries into dv; it failed on a fresh clone when pip resolved other versions (another
    summation order). Eager torch is no yardstick either (fp16 overflows; fp32
    normalises each row by its own max). The bound is the first-order rounding analysis
    of ``tolerances.attention_rounding_bound``, element by element: ~0 wherever P is ~0,
    so a wrong mask or log-sum-exp still fails.
    """
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 64, dtype, magnitude=100.0)
    scale = 64 ** -0.5
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    assert scores.abs().max() > 1e4
    o, lse, dq, dk, dv = _run(q, k, v, do, True, scale)
    assert all(torch.isfinite(t).all() for t in (o, lse, dq, dk, dv))

    ro, rlse, (rdq, rdk, rdv) = _reference(q, k, v, do, True, scale)
    bounds = attention_rounding_bound(q, k, v, do, True, scale)
    for name, got, ref in (("out", o, ro), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_within(got, ref, bounds[name], name)
    _assert_lse_close(lse, rlse)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
def test_rounding_bound_catches_a_wrong_mask(dtype):
    """The large-magnitude test's bound is no blanket: the same inputs through the
    kernels without the causal mask break it."""
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 64, dtype, magnitude=100.0)
    scale = 64 ** -0.5
    o, lse, _, _, dv = _run(q, k, v, do, False, scale)
    ro, _, (_, _, rdv) = _reference(q, k, v, do, True, scale)
    bounds = attention_rounding_bound(q, k, v, do, True, scale)
    for name, got, ref in (("out", o, ro), ("dv", dv, rdv)):
        with pytest.raises(AssertionError, match=f"{name}: error"):
            assert_within(got, ref, bounds[name], name)


def test_backward_is_deterministic():
    """dK/dV of a KV head sum over the query heads of its group inside one program, in
    a fixed order, without atomics. A race (atomic adds, or two programs writing one
    tile) would make two runs differ bitwise (flash-attention's race test)."""
    q, k, v, do = _inputs(1, 4, 2, 45, 45, 64, FP32)
    o, lse = fa.attn_fwd(q, k, v, True, 0.125)
    first = fa.attn_bwd(do, q, k, v, o, lse, True, 0.125)
    second = fa.attn_bwd(do, q, k, v, o, lse, True, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# (B, H, Hkv, Tq, Tk, D, dtype) for the atomic-dQ backward: odd lengths, Tq != Tk both
# ways, GQA and MQA, padded head dims, 16 bits.
ATOMIC_CASES = [
    (2, 2, 2, 17, 17, 40, FP32),
    (1, 4, 2, 50, 17, 48, FP32),
    (1, 4, 1, 33, 47, 64, FP16),
    (1, 4, 2, 97, 97, 64, BF16),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", ATOMIC_CASES, ids=[_case_id(c) for c in ATOMIC_CASES])
def test_atomic_dq_backward_matches_float64_reference(case, causal):
    """deterministic=False: the 5-matmul backward, dQ added with atomics into an fp32
    buffer by the dK/dV programs (every key block of every query head of the group)."""
    q, k, v, do = _inputs(*case)
    _check_against_reference(q, k, v, do, causal, 0.9 * case[5] ** -0.5,
                             deterministic=False)


def test_atomic_dq_backward_writes_every_output(monkeypatch):
    """With deterministic=False the dQ kernel does not run: dq is the fp32 buffer the
    atomics filled, converted. Allocations are poisoned with NaN (the buffer itself must
    start at zero, not from _empty) and the results must equal a clean run's."""
    q, k, v, do = _inputs(1, 4, 2, 37, 29, 24, FP32)
    launched = []
    real_launch = fa.launch
    monkeypatch.setattr(fa, "launch", lambda kernel: launched.append(kernel) or
                        real_launch(kernel))
    clean = _run(q, k, v, do, True, 0.3, deterministic=False)
    assert len(launched) == 3, "forward, Δ and dK/dV only: no dQ pass"
    monkeypatch.setattr(fa, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"),
                          _run(q, k, v, do, True, 0.3, deterministic=False), clean):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=False), name


@pytest.mark.parametrize("d", [0, 257, 264])
def test_unsupported_head_dim_raises(d):
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, d, FP32)
    with pytest.raises(ValueError, match=rf"head dim must be in \[1, 256\], got {d}"):
        fa.attn_fwd(q, k, v, False, 1.0)


def test_mixed_dtypes_raise():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 16, FP32)
    with pytest.raises(ValueError, match="must share one dtype"):
        fa.attn_fwd(q, k.half(), v, False, 1.0)


def test_heads_not_divisible_raise():
    q, k, v, _ = _inputs(1, 3, 2, 4, 4, 16, FP32)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        fa.attn_fwd(q, k, v, False, 1.0)


def test_grid_fits_cuda_limits_for_batched_decoding(monkeypatch):
    """Regression: the grid was (blocks, B·H), and CUDA caps grid axes 1 and 2 at
    65,535, so batch 2048 × 32 heads (batched decoding) failed to launch on a GPU.
    Now every launch is one flat axis 0 (cap 2**31 − 1). The kernels are not run here
    (the interpreter would take minutes): the launches are captured and their grids
    evaluated with the real tile sizes; the flat decoding itself runs in every other
    test of this file."""
    grids = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                meta = {"BLOCK_M": 64, "BLOCK_N": 64, **kwargs}
                grids.append(grid(meta) if callable(grid) else grid)
            return run

    monkeypatch.setattr(fa, "launch", Capture)
    b, h, hkv, tk, d = 2048, 32, 8, 3, 16
    q = torch.zeros(b, h, 1, d, device=DEVICE)
    k = torch.zeros(b, hkv, tk, d, device=DEVICE)
    o, lse = fa.attn_fwd(q, k, k, True, 1.0)
    fa.attn_bwd(o, q, k, k, o, lse, True, 1.0)
    assert len(grids) == 4                                  # fwd, Δ, dK/dV, dQ
    assert grids[0] == (b * h,) and grids[2] == (b * hkv,)
    for grid in grids:
        assert grid[0] < 2 ** 31 and all(n <= 65535 for n in grid[1:]), grid


@triton.jit
def _record_program_ids(OUT, T, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    block, bh = fa._program_ids(T, BLOCK, HEAVY_LAST)
    tl.store(OUT + 2 * tl.program_id(0), block)
    tl.store(OUT + 2 * tl.program_id(0) + 1, bh)


def _program_order(t, block, heads, heavy_last):
    """(block, batch·head) of each program of a flat grid, in program-id order."""
    out = torch.full((2 * triton.cdiv(t, block) * heads,), -1, dtype=torch.int32,
                     device=DEVICE)
    _record_program_ids[(out.numel() // 2,)](out, t, BLOCK=block, HEAVY_LAST=heavy_last)
    return out.view(-1, 2).tolist()


# (Tq, Tk, left, right): causal with Tq != Tk both ways, a causal window, a left-only
# window; each has its work per block monotone along T.
SCHEDULES = [(70, 90, -1, 0), (90, 70, -1, 0), (80, 80, 30, 0), (70, 90, 20, -1)]


@pytest.mark.parametrize("tq,tk,left,right", SCHEDULES,
                         ids=[f"Tq{a}Tk{b}-window{c},{d}" for a, b, c, d in SCHEDULES])
def test_heaviest_blocks_start_first(tq, tk, left, right):
    """Causal load balance: programs start roughly in program-id order, so in the
    forward and dQ (a program per query block) and in dK/dV (per key block) each head's
    blocks must come heaviest first, work being the (query, key) pairs the block sees.
    The flags are the kernels' own: HEAVY_LAST = HAS_RIGHT for query blocks and
    HAS_LEFT and not HAS_RIGHT for key blocks. Before, query blocks came lightest first.
    A block's work is the keys (queries) any of its rows sees, padding rows included:
    they cost the same as real ones."""
    block, heads = 16, 3
    i = torch.arange(triton.cdiv(tq, block) * block)[:, None]
    j = torch.arange(triton.cdiv(tk, block) * block)[None, :]
    seen = (i >= 0) & (j >= 0)
    if left >= 0:
        seen &= j >= i + (tk - tq) - left
    if right >= 0:
        seen &= j <= i + (tk - tq) + right
    row_blocks = seen.unflatten(0, (-1, block)).any(1)              # (query block, key)
    col_blocks = seen.unflatten(1, (-1, block)).any(2)              # (query, key block)
    for t, per_block, heavy_last in (
            (tq, row_blocks[:, :tk].sum(1).tolist(), right >= 0),
            (tk, col_blocks[:tq].sum(0).tolist(), left >= 0 and right < 0)):
        order = _program_order(t, block, heads, heavy_last)
        n_blocks = len(per_block)
        for bh in range(heads):
            blocks = [n for n, h in order[bh * n_blocks:(bh + 1) * n_blocks]]
            assert sorted(blocks) == list(range(n_blocks))
            assert all(h == bh for _, h in order[bh * n_blocks:(bh + 1) * n_blocks])
            done = [per_block[n] for n in blocks]
            assert done == sorted(done, reverse=True), (blocks, per_block)


def _autotune_tile_pairs():
    """Every (operand bits, head-dim band, BLOCK_M, BLOCK_N) the autotune lists hold, for
    any of the three attention kernels, plain or with the scored variants' first tiles."""
    pairs = set()
    for table in (fa.FWD_TILES, fa.DKDV_TILES, fa.DQ_TILES):
        for (bits, band, _), tiles in table.items():
            pairs.update((bits, band, m, n) for m, n, _, _ in tiles)
    return sorted(pairs)


TILE_PAIRS = _autotune_tile_pairs()
# A head dim inside each band that is not a power of two (so BLOCK_D pads it).
BAND_HEAD_DIM = {64: 40, 128: 80, 256: 160}


@pytest.mark.parametrize("bits,band,block_m,block_n", TILE_PAIRS,
                         ids=[f"{b}bit-D{d}-{m}x{n}" for b, d, m, n in TILE_PAIRS])
def test_every_autotune_tile_matches_reference(monkeypatch, bits, band, block_m, block_n):
    """The GPU tiles, not only the interpreter's 16×16: the causal diagonal, the tail of
    Tq and Tk and the fully visible blocks fall on other rows and columns with 128×64 or
    32×128 tiles, and each takes its own branch (masked or not, skipped or not). Forward
    and backward, with bottom-right causal alignment (Tq < Tk), GQA, and lengths that no
    tile divides."""
    if INTERPRET:
        monkeypatch.setattr(fa, "_TILES", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    else:
        pytest.skip("on a GPU the autotuner picks the tiles (test_check_kernels compiles "
                    "them all); this forces each one through the interpreter")
    # 16-bit tiles run fp16 or bf16 (alternating over the table), 32-bit ones fp32.
    dtype = FP32 if bits == 32 else (FP16, BF16)[(block_m + block_n + band) // 16 % 2]
    q, k, v, do = _inputs(1, 2, 1, 150, 171, BAND_HEAD_DIM[band], dtype)
    _check_against_reference(q, k, v, do, True, 0.8 * BAND_HEAD_DIM[band] ** -0.5)
