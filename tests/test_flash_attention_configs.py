"""The attention kernels' autotune configs: the search spaces, their first configs and
the pruner that drops, before benchmarking, what cannot fit a device's shared memory or
is larger than the problem. Host-side only (no kernel runs): fast on any machine."""
import itertools

import pytest
import torch

pytest.importorskip("triton")
from fastattn.kernels import flash_attention as fa  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
TABLES = {"fwd": fa.FWD_TILES, "dkdv": fa.DKDV_TILES, "dq": fa.DQ_TILES}
KERNELS = {"fwd": fa._attn_fwd_kernel, "dkdv": fa._attn_bwd_dkdv_kernel,
           "dq": fa._attn_bwd_dq_kernel}
SM80, SM90 = 166_912, 232_448   # shared memory one block may opt in to

# The first (BLOCK_M, BLOCK_N, num_warps, num_stages) of every list, as they were before
# the search space grew: each is the FASTATTN_AUTOTUNE=0 config that check-kernels
# verified spill-free, so a change here must be deliberate.
FIRST = {
    "fwd": {
        "plain": {(16, 64): (128, 64, 8, 3), (16, 128): (128, 64, 8, 3),
                  (16, 256): (64, 32, 8, 2), (32, 64): (32, 32, 4, 2),
                  (32, 128): (32, 16, 4, 2), (32, 256): (16, 32, 4, 2)},
        "scored": {(16, 64): (128, 64, 8, 3), (16, 128): (64, 64, 8, 3),
                   (16, 256): (64, 16, 8, 2), (32, 64): (32, 32, 8, 2),
                   (32, 128): (16, 16, 8, 2), (32, 256): (16, 16, 4, 2)},
    },
    "dkdv": {
        "plain": {(16, 64): (32, 128, 8, 2), (16, 128): (64, 64, 8, 2),
                  (16, 256): (16, 64, 8, 2), (32, 64): (16, 32, 4, 2),
                  (32, 128): (16, 16, 4, 2), (32, 256): (16, 32, 8, 2)},
        "scored": {(16, 64): (16, 128, 8, 2), (16, 128): (16, 64, 8, 2),
                   (16, 256): (32, 32, 8, 2), (32, 64): (16, 32, 8, 2),
                   (32, 128): (16, 16, 4, 2), (32, 256): (16, 32, 8, 2)},
        "atomic": {(16, 64): (16, 128, 8, 2), (16, 128): (16, 64, 8, 2),
                   (16, 256): (16, 32, 8, 2), (32, 64): (16, 16, 4, 2),
                   (32, 128): (16, 16, 8, 2), (32, 256): (16, 16, 8, 2)},
    },
    "dq": {
        "plain": {(16, 64): (64, 64, 4, 2), (16, 128): (64, 64, 4, 2),
                  (16, 256): (64, 16, 8, 2), (32, 64): (32, 32, 4, 2),
                  (32, 128): (32, 16, 4, 2), (32, 256): (16, 32, 4, 2)},
        "scored": {(16, 64): (64, 32, 8, 2), (16, 128): (64, 32, 4, 2),
                   (16, 256): (64, 16, 8, 2), (32, 64): (32, 32, 4, 2),
                   (32, 128): (16, 16, 4, 2), (32, 256): (16, 16, 4, 2)},
    },
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) values of each search space.
SPACE_16 = {"fwd": ((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
            "dkdv": ((16, 32, 64), (64, 128), (4, 8), (2, 3, 4)),
            "dq": ((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))}
SPACE_32 = ((16, 32), (16, 32), (4, 8), (2, 3))


def _args(dtype=BF16, tq=4096, tk=4096, block_d=128) -> dict:
    """The arguments ``_prune`` reads, by name, as the autotuner passes them."""
    return {"Q": torch.empty(0, dtype=dtype), "TQ_KEY": tq, "TK_KEY": tk,
            "BLOCK_D": block_d, "SOFTCAP": False, "ALIBI": False, "DROPOUT": False}


def _tuple(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


def _lists():
    return [(name, key, tiles) for name, table in TABLES.items()
            for key, tiles in table.items()]


LISTS = _lists()
LIST_IDS = [f"{name}-{bits}bit-D{band}-{kind}" for name, (bits, band, kind), _ in LISTS]


def test_every_list_is_keyed_and_led_by_its_pinned_first():
    """Every (operand bits, band, kind) list exists, and its first tile, the one
    FASTATTN_AUTOTUNE=0 launches, is the pinned one, first also as a triton.Config."""
    for name, kinds in FIRST.items():
        expected = {(*key, kind) for kind, firsts in kinds.items() for key in firsts}
        assert set(TABLES[name]) == expected, name
        for kind, firsts in kinds.items():
            for key, first in firsts.items():
                tiles = TABLES[name][(*key, kind)]
                assert tiles[0] == first, (name, key, kind)
                assert _tuple(fa._configs(tiles)[0]) == first


@pytest.mark.parametrize("name,key,tiles", LISTS, ids=LIST_IDS)
def test_list_is_first_plus_search_space(name, key, tiles):
    """After the first tile come exactly the plain list's first (in a variant's list)
    and the kernel's search space (16 bits: the tutorial's BLOCK_M x BLOCK_N x warps x
    stages; fp32: 16/32-row tiles), each tile once."""
    bits, band, _ = key
    space = set(itertools.product(*(SPACE_16[name] if bits == 16 else SPACE_32)))
    assert len(space) == (36 if bits == 16 else 16)
    assert len(tiles) == len(set(tiles)), "a tile is listed twice"
    rest = (space | {FIRST[name]["plain"][bits, band]}) - {tiles[0]}
    assert set(tiles[1:]) == rest


def test_autotuners_carry_the_pruner_key_and_reset(monkeypatch):
    """The autotuner that a GPU launch gets: every config of its list, the first
    first, ``_pruner`` as early_config_prune, the key, and dK/dV's reset of the atomic
    dQ buffer (built here with the interpreter's kernels and an sm_80's limit; nothing
    is launched)."""
    monkeypatch.setattr(fa, "INTERPRET", False)
    monkeypatch.setattr(fa, "_AUTOTUNE", True)
    monkeypatch.setattr(fa, "_device_smem", lambda device: (SM80, False))
    flags = {"SOFTCAP": False, "ALIBI": False, "DROPOUT": False}
    for name, kernel in KERNELS.items():
        dkdv = name == "dkdv"
        key = [*fa._AUTOTUNE_KEY, "ATOMIC_DQ"] if dkdv else fa._AUTOTUNE_KEY
        get = fa._autotuned(kernel, TABLES[name], name, key,
                            reset_to_zero=["DQ"] if dkdv else None)
        tuner = get(BF16, 128, {**flags, "ATOMIC_DQ": True} if dkdv else flags)
        kind = "atomic" if dkdv else "plain"
        assert [_tuple(c) for c in tuner.configs] == TABLES[name][(16, 128, kind)]
        assert tuner.keys == key
        assert tuner.reset_to_zero == (["DQ"] if dkdv else [])
        # It prunes as ``_prune`` does for this kernel, with the device's limit.
        named = {k: v for k, v in _args(tq=64).items() if k in ("Q", "TQ_KEY", "TK_KEY")}
        pruned = tuner.early_config_prune(tuner.configs, named, BLOCK_D=128,
                                          SOFTCAP=False, ALIBI=False, DROPOUT=False)
        assert pruned == fa._prune(tuner.configs, _args(tq=64), name, SM80, False)
        assert len(pruned) < len(tuner.configs)


@pytest.mark.parametrize("name", TABLES)
def test_pruner_drops_what_does_not_fit_and_keeps_what_does(name):
    """A tile whose estimate is the limit is kept; one byte less and it is dropped,
    while the first stays."""
    tiles = TABLES[name][(16, 128, "plain")]
    configs = fa._configs(tiles)
    probe = configs[5]
    m, n, _, s = _tuple(probe)
    need = fa._smem_estimate(name, m, n, 128, s, 2, True)
    kept = [_tuple(c) for c in fa._prune(configs, _args(), name, need, True)]
    assert tiles[0] in kept and _tuple(probe) in kept
    assert all(fa._smem_estimate(name, m, n, 128, s, 2, True) <= need
               for m, n, _, s in kept[1:])
    dropped = [_tuple(c) for c in fa._prune(configs, _args(), name, need - 1, True)]
    assert tiles[0] == dropped[0] and _tuple(probe) not in dropped


@pytest.mark.parametrize("name,key,tiles", LISTS, ids=LIST_IDS)
def test_pruner_always_keeps_the_first(name, key, tiles):
    """No shared memory and one-row sequences prune everything but the first config."""
    bits, band, _ = key
    args = _args(BF16 if bits == 16 else FP32, tq=1, tk=1, block_d=band)
    for hopper in (False, True):
        assert fa._prune(fa._configs(tiles), args, name, 0, hopper) == \
            fa._configs(tiles)[:1]


@pytest.mark.parametrize("name", TABLES)
def test_pruner_drops_tiles_larger_than_the_problem(name):
    """BLOCK_M above TQ_KEY and BLOCK_N above TK_KEY go, unless no smaller one is
    offered (the smallest then stays); the lengths do not prune long sequences."""
    configs = fa._configs(TABLES[name][(16, 64, "plain")])
    small_m = min(c.kwargs["BLOCK_M"] for c in configs)
    small_n = min(c.kwargs["BLOCK_N"] for c in configs)
    kept = [_tuple(c) for c in fa._prune(configs, _args(tq=32, tk=32, block_d=64), name,
                                        10 ** 9, True)]
    assert 1 < len(kept) < len(configs)
    assert all(m <= max(32, small_m) and n <= max(32, small_n) for m, n, _, _ in kept[1:])
    long = fa._prune(configs, _args(tq=8192, tk=8192, block_d=64), name, 10 ** 9, True)
    assert long == configs


def test_pruner_is_deterministic():
    configs = fa._configs(fa.FWD_TILES[(16, 128, "plain")])
    runs = {tuple(map(_tuple, fa._prune(configs, _args(tq=256), "fwd", SM80, False)))
            for _ in range(3)}
    assert len(runs) == 1


# Shared memory of compiled configs (Triton 3.9, bf16, causal, (1, 2, 1024, D) inputs,
# as `fastattn check-kernels` compiles them): (kernel, M, N, D, stages, wgmma, scored,
# atomic dQ, bytes). sm_80 (mma.sync, cp.async) and sm_90 (wgmma, TMA loads), the
# tightest of each kernel; "scored" with soft cap, ALiBi, dropout, window and varlen.
COMPILED = [
    ("fwd", 64, 128, 128, 3, False, False, False, 163_840),
    ("fwd", 64, 128, 128, 3, True, True, False, 223_232),
    ("fwd", 128, 128, 128, 3, True, False, False, 231_424),
    ("fwd", 128, 64, 256, 2, False, False, False, 147_456),
    ("fwd", 128, 64, 256, 2, True, False, False, 197_664),
    ("dkdv", 128, 64, 128, 2, False, False, False, 115_712),
    ("dkdv", 128, 64, 128, 2, True, True, False, 175_104),
    ("dkdv", 16, 64, 256, 2, False, False, False, 84_096),
    ("dkdv", 32, 64, 256, 2, True, False, False, 132_368),
    ("dkdv", 64, 128, 128, 3, False, False, True, 164_864),
    ("dkdv", 16, 64, 128, 2, True, False, True, 58_512),
    ("dkdv", 16, 32, 256, 2, False, False, True, 65_664),
    ("dkdv", 64, 64, 256, 2, True, False, True, 264_192),
    ("dq", 64, 128, 128, 2, False, False, False, 114_688),
    ("dq", 64, 128, 128, 2, True, False, False, 165_888),
    ("dq", 64, 128, 128, 2, True, True, False, 174_080),
    ("dq", 64, 32, 256, 2, False, False, False, 102_400),
    ("dq", 128, 32, 256, 1, True, False, False, 164_872),
]


@pytest.mark.parametrize("kernel,m,n,d,stages,wgmma,scored,atomic,compiled", COMPILED)
def test_estimate_is_not_below_compiled_shared_memory(kernel, m, n, d, stages, wgmma,
                                                      scored, atomic, compiled):
    """The estimate may be above what Triton allocates (a config the device could run
    is then not tried) but should not be below it (one it cannot run would be
    compiled, to fail), and not by more than a quarter on these tight cases."""
    estimate = fa._smem_estimate(kernel, m, n, d, stages, 2, wgmma, scored, atomic)
    assert compiled <= estimate <= 1.25 * compiled


def test_pruner_keeps_the_tutorial_hopper_tile():
    """Forward 128 x 128, 3 stages, 8 warps at D = 128 (the Triton tutorial's Hopper
    choice) needs 231,424 B on sm_90, just under its 232,448: it is kept there, not on
    sm_80."""
    configs = fa._configs(fa.FWD_TILES[(16, 128, "plain")])
    tile = next(c for c in configs if _tuple(c) == (128, 128, 8, 3))
    assert tile in fa._prune(configs, _args(), "fwd", SM90, True)
    assert tile not in fa._prune(configs, _args(), "fwd", SM80, False)


def test_pruner_counts_atomic_dq_and_variants():
    """The atomic-dQ dK/dV pass and the scored variants need more shared memory per
    tile: a limit that fits a tile without them does not fit it with them."""
    configs = fa._configs(fa.DKDV_TILES[(16, 128, "atomic")])
    m, n, _, s = _tuple(configs[3])
    limit = fa._smem_estimate("dkdv", m, n, 128, s, 2, True)
    assert configs[3] in fa._prune(configs, _args(), "dkdv", limit, True)
    for flag in ("ATOMIC_DQ", "SOFTCAP", "ALIBI", "DROPOUT"):
        assert configs[3] not in fa._prune(configs, {**_args(), flag: True}, "dkdv",
                                           limit, True), flag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a CUDA device's limits")
def test_device_limit_is_the_opt_in_shared_memory():
    props = torch.cuda.get_device_properties(0)
    limit, hopper = fa._device_smem(torch.device("cuda", 0))
    assert limit == props.shared_memory_per_block_optin
    assert hopper == (props.major >= 9)
