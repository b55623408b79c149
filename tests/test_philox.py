"""``fastattn.ops._philox`` against Triton's own ``tl.philox`` and ``uint_to_uniform_float``,
bit for bit.

The Triton side is a tiny kernel run through the interpreter on CPU (tests/conftest.py
sets TRITON_INTERPRET=1 there) or compiled on a GPU. Counters cover small values and
values near 2³² − 1 (passed as int32 bit patterns, as Triton bitcasts them); seeds cover
both key words, with high bits set.
"""
import os

import pytest
import torch

from fastattn.ops import _philox

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("Triton's philox needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton "
                "is imported (tests/conftest.py sets it on CPU-only machines)",
                allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.language.random import uint_to_uniform_float  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 1, 12345, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32 + 5, 0x7EDCBA9876543210, 2 ** 63 - 1]


@triton.jit
def _philox_kernel(seed, C0, C1, C2, C3, R0, R1, R2, R3, U, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < N
    c0 = tl.load(C0 + idx, mask=live)                          # int32 bit patterns
    c1 = tl.load(C1 + idx, mask=live)
    c2 = tl.load(C2 + idx, mask=live)
    c3 = tl.load(C3 + idx, mask=live)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(R0 + idx, r0.to(tl.int32, bitcast=True), mask=live)
    tl.store(R1 + idx, r1.to(tl.int32, bitcast=True), mask=live)
    tl.store(R2 + idx, r2.to(tl.int32, bitcast=True), mask=live)
    tl.store(R3 + idx, r3.to(tl.int32, bitcast=True), mask=live)
    tl.store(U + idx, uint_to_uniform_float(r0), mask=live)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 values in int64 -> the int32 tensor with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def _as_uint32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & 0xFFFFFFFF


def _triton_philox(seed: int, c0, c1, c2, c3):
    """Run tl.philox on flat int64 counter tensors of uint32 values."""
    n = c0.numel()
    args = [_as_int32(c).to(DEVICE) for c in (c0, c1, c2, c3)]
    r = [torch.full((n,), 7, dtype=torch.int32, device=DEVICE) for _ in range(4)]
    u = torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)
    block = 128
    _philox_kernel[(triton.cdiv(n, block),)](seed, *args, *r, u, n, BLOCK=block)
    return [_as_uint32(x).cpu() for x in r], u.cpu()


def _counter_grid() -> tuple[torch.Tensor, ...]:
    """Flat (c0, c1, c2, c3) covering small values, 2³¹ ± 1 and values near 2³² − 1."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0, 1, 2, 255, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1,
                            2 ** 32 - 2, 2 ** 32 - 1])
    n = special.numel()
    c0, c1, c2 = torch.meshgrid(special, special, special[[0, 1, 5, 7, 9]], indexing="ij")
    c3 = special[torch.arange(c0.numel()) % n].reshape(c0.shape)
    rand = torch.randint(0, 2 ** 32, (4, 300), generator=g)
    return tuple(torch.cat([c.flatten(), r]) for c, r in zip((c0, c1, c2, c3), rand))


@pytest.mark.parametrize("seed", SEEDS)
def test_philox4x32_matches_triton_bitwise(seed):
    c = _counter_grid()
    (want0, want1, want2, want3), want_u = _triton_philox(seed, *c)
    got = _philox.philox4x32(seed, *c)
    for i, (g, w) in enumerate(zip(got, (want0, want1, want2, want3))):
        assert torch.equal(g, w), f"word r{i} differs at {(g != w).sum()} counters"
    got_u = _philox.uint_to_uniform_float(got[0])
    assert torch.equal(got_u.view(torch.int32), want_u.view(torch.int32))
    assert 0.0 <= got_u.min() and got_u.max() < 1.0


@pytest.mark.parametrize("seed, offset", [(0, 0), (2 ** 63 - 1, 2 ** 32 - 1),
                                          (0x1234_5678_9ABC_DEF0, 77)])
def test_philox_uniform_counters_and_broadcast(seed, offset):
    """philox_uniform(seed, offset, bh, i, j) is tl.philox(seed, j, i, bh, offset)'s r0,
    broadcast over (bh, 1, 1) × (rows, 1) × (cols,)."""
    bh = torch.tensor([0, 5, 2 ** 32 - 1]).view(3, 1, 1)
    rows = torch.tensor([0, 3, 2 ** 31 + 7]).view(3, 1)
    cols = torch.tensor([0, 1, 9, 2 ** 32 - 2])
    u = _philox.philox_uniform(seed, offset, bh, rows, cols)
    assert u.shape == (3, 3, 4) and u.dtype == torch.float32
    full = torch.broadcast_tensors(bh, rows, cols, torch.tensor(offset))
    _, want = _triton_philox(seed, *(f.flatten() for f in (full[2], full[1], full[0], full[3])))
    assert torch.equal(u.flatten().view(torch.int32), want.view(torch.int32))
    keep = _philox.keep_mask(seed, offset, bh, rows, cols, 0.3)
    assert torch.equal(keep, u >= 0.3)


def test_keep_rate_and_streams():
    """The keep rate is 1 − p within 6 binomial standard deviations, and seed and offset
    each select a different stream."""
    bh, rows, cols = torch.arange(4).view(4, 1, 1), torch.arange(64).view(64, 1), torch.arange(64)
    n = 4 * 64 * 64
    for p in (0.1, 0.5, 0.9):
        rate = _philox.keep_mask(3, 0, bh, rows, cols, p).float().mean().item()
        assert abs(rate - (1 - p)) <= 6 * (p * (1 - p) / n) ** 0.5, (p, rate)
    base = _philox.philox_uniform(3, 0, bh, rows, cols)
    assert torch.equal(base, _philox.philox_uniform(3, 0, bh, rows, cols))
    assert not torch.equal(base, _philox.philox_uniform(4, 0, bh, rows, cols))
    assert not torch.equal(base, _philox.philox_uniform(3, 1, bh, rows, cols))


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    ({"seed": 2 ** 63}, r"seed must be an int in \[0, 2\*\*63\)"),
    ({"offset": 2 ** 32}, r"offset must be an int in \[0, 2\*\*32\), got 4294967296"),
    ({"p": 1.0}, r"dropout_p must be a float in \[0, 1\), got 1.0"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"seed": 0, "offset": 0, "bh": torch.zeros(1, dtype=torch.int64),
            "rows": torch.zeros(1, dtype=torch.int64), "cols": torch.zeros(1, dtype=torch.int64),
            "p": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        _philox.keep_mask(**args)


def test_philox_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: compares the CUDA int64 arithmetic with the CPU one")
    c = _counter_grid()
    for seed in SEEDS:
        cpu = _philox.philox4x32(seed, *c)
        gpu = _philox.philox4x32(seed, *(x.cuda() for x in c))
        assert all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))
