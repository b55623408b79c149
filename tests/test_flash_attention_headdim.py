"""Head dims that are not powers of two, run as two column pieces (``head_dim_split``).

The kernels' tiles are powers of two, so a head dim such as 96 used to run padded to 128
(masked columns, a third more matmul work). Now D splits into BLOCK_D, the largest power
of two <= D, and BLOCK_D2, the rest's power of two (at least 16), where the two are
narrower than the padded tile: 96 = 64 + 32, 80 = 64 + 16, 192 = 128 + 64, 40 = 32 + 16.
Every tile along D is then two tiles: the products over D (Q·Kᵀ, dO·Vᵀ) are sums of two
dots, the products into D (P·V, Pᵀ·dO, dSᵀ·Q, dS·K) two dots into two accumulators.

Here each split head dim runs forward and backward (dq, dk, dv) against the float64
reference (the helpers of test_flash_attention_variants_kernels.py: fp32 within its
floor, fp16/bf16 within 2x eager torch plus a floor), with the variants (a causal
window, soft cap, ALiBi, dropout with its mask rebuilt in torch), varlen, GQA, the
atomic-dQ backward, inputs whose row padding holds NaN (read past D: NaN everywhere),
NaN-poisoned outputs, and the TMA path against the pointer path bit for bit (forced
under the interpreter as in test_flash_attention_tma.py). A head dim that does not split
(24, 112) runs beside them, and the rule itself is pinned for every D in [1, 256].
"""
import pytest
import torch

from test_flash_attention_variants_kernels import (  # noqa: E402  (skips without Triton)
    BF16, DEVICE, FP16, FP32, INTERPRET, _check, _check_varlen, _inputs, _keep, _slopes,
    _varlen_inputs, _varlen_masks)
from test_flash_attention_tma import _Launches as _TmaLaunches  # noqa: E402
from test_flash_attention_tma import (_assert_stores_inside, _both_paths,  # noqa: E402
                                      _device)
from fastattn.kernels import flash_attention as fa  # noqa: E402

SPLIT = {40: (32, 16), 48: (32, 16), 80: (64, 16), 96: (64, 32), 160: (128, 32),
         192: (128, 64)}
UNSPLIT = {1: (16, 0), 16: (16, 0), 24: (32, 0), 64: (64, 0), 112: (128, 0),
           128: (128, 0), 200: (256, 0), 256: (256, 0)}


class _Launches(_TmaLaunches):
    """(kernel name, its keyword arguments) of every launch, recorded by wrapping the
    launchers' ``launch``."""

    def record(self, name: str, kwargs: dict) -> None:
        self.append((name, kwargs))


@pytest.fixture
def launches(monkeypatch) -> _Launches:
    recorded = _Launches(fa.launch)
    monkeypatch.setattr(fa, "launch", recorded.wrap)
    return recorded


def _assert_pieces(launches, d):
    """Every matmul kernel ran with D's pieces; Δ (a row reduction) with the padded
    width."""
    pieces = fa.head_dim_split(d)
    assert launches
    for name, kwargs in launches:
        if name == "_attn_bwd_delta_kernel":
            assert kwargs["BLOCK_D"] == max(16, 1 << (d - 1).bit_length()), name
            assert "BLOCK_D2" not in kwargs
        else:
            assert (kwargs["BLOCK_D"], kwargs["BLOCK_D2"]) == pieces, name


# --------------------------------------------------------------------- the split rule


@pytest.mark.parametrize("d,pieces", [*SPLIT.items(), *UNSPLIT.items()],
                         ids=[f"D{d}" for d in [*SPLIT, *UNSPLIT]])
def test_split_rule_examples(d, pieces):
    assert fa.head_dim_split(d) == pieces


def test_split_rule_every_head_dim():
    """For every D in [1, 256]: powers of two that cover D; a second piece at least 16
    wide (tl.dot's K) only where the two are narrower than the padded tile, the first
    piece then the largest power of two <= D (it ends inside D: only the second is
    masked along D); else the one padded tile, and no such split would be narrower."""
    for d in range(1, 257):
        first, second = fa.head_dim_split(d)
        padded = max(16, 1 << (d - 1).bit_length())
        largest = 1 << (d.bit_length() - 1)
        rest = d - largest
        assert first & (first - 1) == 0 and second & (second - 1) == 0, d
        if second:
            assert first == largest and 16 <= second and rest <= second < 2 * rest + 16, d
            assert first + second < padded, d
        else:
            assert first == padded, d
            assert rest == 0 or largest + max(16, 1 << (rest - 1).bit_length()) >= padded, d


# ------------------------------------------------------------------ dense, variants

# (B, H, Hkv, Tq, Tk, D, dtype, causal): odd lengths, Tq != Tk both ways (causal with
# Tq > Tk leaves rows without keys), GQA, every kind of split, and two that do not.
DENSE = [
    (1, 2, 1, 37, 29, 40, FP32, True),
    (2, 2, 2, 19, 33, 80, BF16, True),
    (1, 4, 2, 33, 21, 96, FP16, False),
    (1, 2, 2, 21, 23, 96, FP32, True),
    (1, 2, 1, 17, 26, 192, BF16, True),
    (1, 2, 2, 23, 23, 160, FP32, False),
    (1, 2, 1, 19, 23, 24, FP16, True),
    (1, 2, 1, 21, 18, 112, FP32, True),
]


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,dtype,causal", DENSE,
                         ids=[f"B{c[0]}H{c[1]}kv{c[2]}-Tq{c[3]}Tk{c[4]}-D{c[5]}-"
                              f"{str(c[6])[6:]}-{'causal' if c[7] else 'full'}"
                              for c in DENSE])
def test_dense(launches, b, h, hkv, tq, tk, d, dtype, causal):
    q, k, v, do = _inputs(b, h, hkv, tq, tk, d, dtype, seed=d)
    _check(q, k, v, do, causal, d ** -0.5)
    _assert_pieces(launches, d)


@pytest.mark.parametrize("d,dtype", [(80, FP16), (192, FP32)], ids=["D80-fp16", "D192-fp32"])
def test_every_variant(d, dtype):
    """A causal window, soft cap, ALiBi (B, H) and dropout at once, GQA, Tq != Tk."""
    b, h, tq, tk, p = 1, 4, 29, 45, 0.25
    q, k, v, do = _inputs(b, h, 2, tq, tk, d, dtype, magnitude=2.0)
    _check(q, k, v, do, True, d ** -0.5, window=(17, -1), softcap=6.0,
           alibi=_slopes(b, h, True), dropout_p=p, stream=(99, 5),
           dropout_mask=_keep(99, 5, b, h, tq, tk, p))


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_window_softcap_alibi_d96(dtype):
    q, k, v, do = _inputs(2, 2, 1, 41, 37, 96, dtype, magnitude=2.0)
    _check(q, k, v, do, False, 96 ** -0.5, window=(9, 5), softcap=4.0,
           alibi=_slopes(2, 2, False))


@pytest.mark.parametrize("d", [40, 96])
def test_atomic_dq(d):
    """deterministic=False: the dK/dV programs add both dQ pieces with atomics."""
    b, h, tq, tk, p = 2, 4, 29, 37, 0.2
    q, k, v, do = _inputs(b, h, 2, tq, tk, d, FP32)
    _check(q, k, v, do, True, d ** -0.5, deterministic=False, window=(15, -1),
           softcap=5.0, dropout_p=p, stream=(3, 8), dropout_mask=_keep(3, 8, b, h, tq, tk, p))


def test_varlen():
    """Packed sequences (an empty one, one whose queries have no key), GQA, every
    variant, deterministic and atomic backward."""
    h, p = 4, 0.2
    qkvdo, cu = _varlen_inputs(h, 2, 80, BF16, seed=4)
    for deterministic in (True, False):
        _check_varlen(qkvdo, cu, True, 0.1, max_extra=3, deterministic=deterministic,
                      window=(6, -1), softcap=4.0, alibi=_slopes(5, h, True), dropout_p=p,
                      stream=(7, 11), dropout_mask=_varlen_masks(7, 11, h, p))


def test_backward_is_deterministic():
    """Two backward runs with a split head dim agree bit for bit."""
    q, k, v, do = _inputs(1, 4, 2, 37, 37, 96, FP32)
    options = dict(window=(9, -1), softcap=5.0, dropout_p=0.2, seed=3, offset=1)
    o, lse = fa.attn_fwd(q, k, v, True, 0.1, **options)
    first = fa.attn_bwd(do, q, k, v, o, lse, True, 0.1, **options)
    second = fa.attn_bwd(do, q, k, v, o, lse, True, 0.1, **options)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _nan_padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` (.., D) stored in rows of D + 8 elements whose last 8 are NaN."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + 8), float("nan"), dtype=x.dtype,
                      device=x.device)
    wide[..., :x.shape[-1]] = x
    return wide[..., :x.shape[-1]]


@pytest.mark.parametrize("d", [40, 80, 192])
def test_nothing_read_or_written_past_d(monkeypatch, d):
    """The second piece ends past D: its columns there load as zeros (the rows' padding
    holds NaN, which would reach every result) and are never stored (NaN-poisoned
    outputs give the clean run's results bit for bit)."""
    q, k, v, do = (_nan_padded(x) for x in _inputs(1, 2, 1, 21, 19, d, FP32))

    def run(deterministic):
        o, lse = fa.attn_fwd(q, k, v, True, 0.2)
        return (o, lse, *fa.attn_bwd(do, q, k, v, o, lse, True, 0.2,
                                     deterministic=deterministic))

    for deterministic in (True, False):
        clean = _check(q, k, v, do, True, 0.2, deterministic=deterministic)
        with monkeypatch.context() as m:
            m.setattr(fa, "_empty", lambda shape, dtype, device: torch.full(
                shape, float("nan"), dtype=dtype, device=device))
            poisoned = run(deterministic)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), poisoned, clean):
            assert torch.equal(a, b), f"{name} has elements the kernels never wrote"


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (32, 128)], ids=["64x32", "32x128"])
def test_gpu_tiles(monkeypatch, block_m, block_n):
    """The split with GPU-sized tiles (query and key blocks of different sizes)."""
    if not INTERPRET:
        pytest.skip("on a GPU the autotuner picks the tiles; this forces them through "
                    "the interpreter")
    monkeypatch.setattr(fa, "_TILES", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    q, k, v, do = _inputs(1, 2, 1, 70, 83, 96, FP16)
    _check(q, k, v, do, True, 96 ** -0.5, window=(40, -1))


# ---------------------------------------------------------------- TMA against pointers

class _PathLaunches(_TmaLaunches):
    """What test_flash_attention_tma's ``_both_paths`` reads, (name, TMA, WARP_SPEC),
    with every launch's split checked to be ``head_dim_split``'s."""

    def record(self, name: str, kwargs: dict) -> None:
        if "TMA" in kwargs:
            assert kwargs["BLOCK_D2"] == fa.head_dim_split(kwargs["HEAD_DIM"])[1]
        super().record(name, kwargs)


@pytest.fixture
def path_launches(monkeypatch) -> _PathLaunches:
    recorded = _PathLaunches(fa.launch)
    monkeypatch.setattr(fa, "launch", recorded.wrap)
    return recorded


# fp16 (TMA takes neither fp32 nor, under the interpreter, bf16). The atomic dK/dV
# keeps pointers at D > 128 (it spills through TMA): atomic cases at D <= 128.
TMA_CASES = [(40, True, True), (96, True, False), (192, False, True), (80, False, False)]


@pytest.mark.parametrize("d,causal,deterministic", TMA_CASES,
                         ids=[f"D{d}-{'causal' if c else 'full'}-{'det' if t else 'atomic'}"
                              for d, c, t in TMA_CASES])
def test_tma_matches_pointers(monkeypatch, path_launches, d, causal, deterministic):
    """Two descriptors per tensor, the second loading at column BLOCK_D with zeros past
    D: the same results as the pointer path, bit for bit, and right."""
    q, k, v, do = _inputs(1, 4, 2, 27, 35, d, FP16, seed=d)
    _both_paths(monkeypatch, path_launches, _check, q, k, v, do, causal, d ** -0.5,
                deterministic=deterministic)


def test_tma_every_variant_varlen(monkeypatch, path_launches):
    h, p = 4, 0.2
    qkvdo, cu = _varlen_inputs(h, 2, 96, FP16, seed=5)
    _both_paths(monkeypatch, path_launches, _check_varlen, qkvdo, cu, True, 0.1,
                max_extra=3, window=(6, -1), softcap=4.0, alibi=_slopes(5, h, True),
                dropout_p=p, stream=(7, 11), dropout_mask=_varlen_masks(7, 11, h, p))


def test_tma_stores_stop_at_d(monkeypatch, path_launches):
    """Through TMA every output element is written (NaN-poisoned allocations give the
    clean run's results) and nothing past an output's end (the last row's second piece
    sticks out past D, the last tile past T)."""
    _device(monkeypatch, True)
    q, k, v, do = _inputs(1, 2, 1, 19, 23, 80, FP16)

    def run(deterministic):
        o, lse = fa.attn_fwd(q, k, v, True, 0.1)
        return (o, lse, *fa.attn_bwd(do, q, k, v, o, lse, True, 0.1,
                                     deterministic=deterministic))

    _assert_stores_inside(monkeypatch, run, guard=16 * 128)
    assert path_launches and all(tma for _, tma, _ in path_launches)


@pytest.mark.parametrize("major", [8, 9])
def test_split_per_arch(monkeypatch, launches, major):
    """Before sm_90 only the forward below D = 128 splits (the other split first tiles
    spill there); from sm_90 on every kernel does. The pre-sm_90 launch is also right."""
    monkeypatch.setattr(fa, "_device_paths", lambda device: fa.arch_paths(major))
    for d in (96, 192):
        q, k, v, do = _inputs(1, 2, 1, 19, 23, d, torch.float32, seed=d)
        _check(q, k, v, do, True, d ** -0.5)
    want = {(96, True): (64, 32), (192, True): (128, 64) if major >= 9 else (256, 0),
            (96, False): (64, 32) if major >= 9 else (128, 0),
            (192, False): (128, 64) if major >= 9 else (256, 0)}
    seen = [(name, kw) for name, kw in launches if "BLOCK_D2" in kw]
    assert len(seen) == 6
    for name, kw in seen:
        pieces = (kw["BLOCK_D"], kw["BLOCK_D2"])
        assert pieces == want[kw["HEAD_DIM"], "fwd" in name], (name, kw["HEAD_DIM"])
