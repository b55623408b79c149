"""Philox4x32-10 in PyTorch, bit-identical to Triton's ``tl.philox``: the dropout mask of
every attention backend.

Philox (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four random 32-bit words
through 10 rounds of

    c0, c1, c2, c3 <- hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0)
    k0, k1         <- k0 + 0x9E3779B9,  k1 + 0xBB67AE85            (mod 2³²)

with A = 0xD2511F53, B = 0xCD9E8D57 and hi/lo the high/low 32 bits of the 64-bit
product. Triton's key is the seed (k0 = seed & 0xffffffff, k1 = seed >> 32).

The attention dropout draws, for query head ``bh = b·H + h``, query row i and key j,
the counter (c0, c1, c2, c3) = (j, i, bh, offset), keeps the first output word r0 and
turns it into a float as Triton's ``uint_to_uniform_float`` does: read r0 as an int32,
flip its bits when negative, multiply by the fp32 constant 4.6566127342e-10, so u lies
in [0, 1). A key is kept iff u >= p. The Triton kernels call ``tl.philox`` on the same
counters, so the torch backend, the kernels and the tests all see one mask.

uint32 arithmetic is emulated in int64 tensors holding values in [0, 2³²). The 64-bit
product of two such values may exceed int64's range; torch's int64 multiply wraps
modulo 2⁶⁴ on CPU and CUDA (two's complement), so the product's bits are still exact:
lo = p & 0xffffffff and hi = (p >> 32) & 0xffffffff (the arithmetic shift's sign bits
are masked off). tests/test_philox.py checks every word against Triton bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10
# Triton's scale for uint32 -> [0, 1): the largest s with (2³¹ − 1)·s < 1 in fp32.
_UNIFORM_SCALE = 4.6566127342e-10


def philox4x32(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of ``tl.philox(seed, c0, c1, c2, c3)`` with 32-bit counters.

    The counters are integer tensors that broadcast together; each is taken mod 2³²
    (so -1 means 0xffffffff, as Triton's bitcast of an int32). ``seed`` is the 64-bit
    key, an int in [0, 2⁶⁴). Returns the four output words as int64 tensors of the
    broadcast shape, values in [0, 2³²).
    """
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    c0, c1, c2, c3 = (c.to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        # c1 and c3 keep the products' high bits until they are masked below: they only
        # enter an xor whose result is masked, and only its low 32 bits are used.
        p_b, p_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c1 = ((p_b >> 32) ^ c1 ^ k0) & _MASK32, p_b
        c2, c3 = ((p_a >> 32) ^ c3 ^ k1) & _MASK32, p_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    return tuple(c.expand(shape) for c in (c0, c1 & _MASK32, c2, c3 & _MASK32))


def uint_to_uniform_float(x: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words (int64 tensor, values in
    [0, 2³²)): float32 in [0, 1)."""
    # As an int32, x >= 2³¹ is negative and ~x = 2³² − 1 − x = x ^ 0xffffffff.
    x = torch.where(x >= 2 ** 31, x ^ _MASK32, x)
    # An fp32 0-d tensor (torch.full: no host-to-device copy), so the product is fp32's.
    scale = torch.full((), _UNIFORM_SCALE, dtype=torch.float32, device=x.device)
    return x.to(torch.float32) * scale


def _check_stream(seed: int, offset: int) -> None:
    if not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed!r}")
    if not (isinstance(offset, int) and 0 <= offset < 2 ** 32):
        raise ValueError(f"dropout offset must be an int in [0, 2**32), got {offset!r}")


def philox_uniform(seed: int, offset: int, bh: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The dropout uniforms u(bh, i, j) in [0, 1), float32, of the broadcast shape of the
    int64 tensors ``bh`` (b·H + h, h the query head), ``rows`` (query index i inside the
    sequence) and ``cols`` (key index j). ``seed`` in [0, 2⁶³), ``offset`` in [0, 2³²)."""
    _check_stream(seed, offset)
    c3 = torch.full((), offset, dtype=torch.int64, device=cols.device)
    r0, _, _, _ = philox4x32(seed, cols, rows, bh, c3)
    return uint_to_uniform_float(r0)


def keep_mask(seed: int, offset: int, bh: Tensor, rows: Tensor, cols: Tensor,
              p: float) -> Tensor:
    """The dropout keep mask, bool, of the broadcast shape: ``philox_uniform(...) >= p``."""
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return philox_uniform(seed, offset, bh, rows, cols) >= p
