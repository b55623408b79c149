"""The attention kernels' two memory paths: tensor descriptors (TMA) and pointers.

On sm_90+ the launchers move Q/K/V/O (dO, dQ, dK, dV) tiles through tensor descriptors
when every tensor qualifies, else through masked pointer loads (kernels/
flash_attention.py, ``_paths``). Under the interpreter tensor descriptors run on CPU
tensors, so both paths are tested here by mocking the device check
(``_device_paths``): each case runs both, against the float64 reference (the helpers
of test_flash_attention_variants_kernels.py), and the two must agree bit for bit (the
same tiles, the same sums; zeros past the sequence and the head dim either way).
Which path each launch took is read from its TMA constexpr. The TMA cases are fp16:
fp32 never takes TMA, and bf16 not under the interpreter, whose bf16 descriptors load
wrong values (both tested).
"""
import pytest
import torch

from test_flash_attention_variants_kernels import (  # noqa: E402  (skips without Triton)
    DEVICE, FP16, FP32, _check, _check_varlen, _inputs, _keep, _slopes, _varlen_inputs,
    _varlen_masks)
from fastattn.kernels import flash_attention as fa  # noqa: E402


class _Launches(list):
    """The attention launches, recorded by wrapping the launchers' ``launch``: what
    ``record`` keeps, here (kernel name, TMA, WARP_SPEC) of those that take TMA."""

    def __init__(self, launch):
        super().__init__()
        self.launch = launch

    def record(self, name: str, kwargs: dict) -> None:
        if "TMA" in kwargs:
            self.append((name, kwargs["TMA"], kwargs.get("WARP_SPEC")))

    def wrap(self, kernel):
        launch = self.launch(kernel)
        name = getattr(kernel, "__name__", type(kernel).__name__)

        def run(grid):
            def call(*args, **kwargs):
                self.record(name, kwargs)
                return launch[grid](*args, **kwargs)
            return call
        return type("Launch", (), {"__getitem__": lambda _, grid: run(grid)})()


@pytest.fixture
def launches(monkeypatch) -> _Launches:
    recorded = _Launches(fa.launch)
    monkeypatch.setattr(fa, "launch", recorded.wrap)
    return recorded


def _device(monkeypatch, tma: bool, warp_spec: bool = False) -> None:
    """Pretend the device has (TMA, warp specialization) or not."""
    monkeypatch.setattr(fa, "_device_paths",
                        lambda device: fa.Paths(tma, warp_spec, True, True))


def _both_paths(monkeypatch, launches, check, *args, **kwargs):
    """``check`` (a reference test returning the kernels' results) through the TMA path
    and the pointer path: each launch on the path asked for, the results equal."""
    results = {}
    for tma in (True, False):
        _device(monkeypatch, tma)
        launches.clear()
        results[tma] = check(*args, **kwargs)
        assert launches and all(t == tma for _, t, _ in launches), launches
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), results[True], results[False]):
        assert torch.equal(a, b), f"{name}: the TMA and pointer paths differ"
    return results[True]


# (B, H, Hkv, Tq, Tk, D, dtype, causal): odd lengths that leave tile tails, Tq != Tk
# both ways (rows without keys when causal with Tq > Tk), GQA, head dims that pad
# (24 -> 32, 40 -> 64) and the narrowest row TMA takes (fp16 D = 8: 16 bytes).
DENSE = [
    (2, 4, 2, 37, 53, 24, FP16, True),
    (1, 2, 1, 45, 19, 40, FP16, True),
    (1, 2, 2, 33, 33, 8, FP16, False),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d,dtype,causal", DENSE,
                         ids=[f"B{c[0]}H{c[1]}kv{c[2]}-Tq{c[3]}Tk{c[4]}-D{c[5]}-"
                              f"{str(c[6])[6:]}-{'causal' if c[7] else 'full'}"
                              for c in DENSE])
def test_dense_both_paths(monkeypatch, launches, b, h, hkv, tq, tk, d, dtype, causal,
                          deterministic):
    q, k, v, do = _inputs(b, h, hkv, tq, tk, d, dtype)
    _both_paths(monkeypatch, launches, _check, q, k, v, do, causal, d ** -0.5,
                deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_every_variant_both_paths(monkeypatch, launches, deterministic):
    """A causal window, soft cap, ALiBi (B, H) and dropout at once, GQA, Tq != Tk."""
    b, h, tq, tk, p = 1, 4, 29, 45, 0.25
    q, k, v, do = _inputs(b, h, 2, tq, tk, 24, FP16)
    _both_paths(monkeypatch, launches, _check, q, k, v, do, True, 0.2,
                deterministic=deterministic, window=(17, -1), softcap=6.0,
                alibi=_slopes(b, h, True), dropout_p=p, stream=(99, 5),
                dropout_mask=_keep(99, 5, b, h, tq, tk, p))


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_varlen_both_paths(monkeypatch, launches, deterministic):
    """Packed sequences (an empty one, one whose queries have no key): each program's
    descriptors end at its own sequence, so tails load zeros and stores stop there."""
    h, p = 4, 0.2
    qkvdo, cu = _varlen_inputs(h, 2, 24, FP16, seed=3)
    _both_paths(monkeypatch, launches, _check_varlen, qkvdo, cu, True, 0.3, max_extra=3,
                deterministic=deterministic, window=(6, -1), softcap=4.0, dropout_p=p,
                stream=(7, 11), dropout_mask=_varlen_masks(7, 11, h, p))


def test_warp_specialized_forward(monkeypatch, launches):
    """The warp-specialized forward loops (WARP_SPEC, sm_100+) compute what the plain
    ones do: in the interpreter the same results bit for bit."""
    q, k, v, _ = _inputs(1, 2, 1, 37, 41, 24, FP16)
    results = []
    for warp_spec in (True, False):
        _device(monkeypatch, True, warp_spec)
        results.append(fa.attn_fwd(q, k, v, True, 0.3, window=(20, -1)))
    assert launches == [("_attn_fwd_kernel", True, True),
                        ("_attn_fwd_kernel", True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _guarded_empty(guard: int):
    """``_empty`` that poisons each output with NaN and places it at the start of a
    larger NaN buffer: the ``guard`` elements after it must stay NaN (a TMA store past
    the last sequence's or head's end would land there)."""
    buffers = []

    def empty(shape, dtype, device):
        n = torch.Size(shape).numel()
        buf = torch.full((n + guard,), float("nan"), dtype=dtype, device=device)
        buffers.append((buf, n))
        return buf[:n].view(shape)
    return empty, buffers


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_tma_outputs_fully_written_and_clipped(monkeypatch, launches, varlen):
    """Every element of o, lse, dq, dk, dv is written (NaN-poisoned allocations give
    the clean run's results bit for bit), and nothing is written past an output's end
    (the tiles of the last rows stick out of it)."""
    _device(monkeypatch, True)
    if varlen:
        (q, k, v, do), cu = _varlen_inputs(2, 1, 8, FP16, seed=2)
        kw = dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=25,
                  max_seqlen_k=26)
    else:
        q, k, v, do = _inputs(1, 2, 1, 19, 23, 8, FP16)
        kw = {}

    def run(deterministic):
        o, lse = fa.attn_fwd(q, k, v, True, 0.3, **kw)
        return (o, lse, *fa.attn_bwd(do, q, k, v, o, lse, True, 0.3,
                                     deterministic=deterministic, **kw))

    _assert_stores_inside(monkeypatch, run, guard=16 * 16)
    assert launches and all(tma for _, tma, _ in launches)


def _assert_stores_inside(monkeypatch, run, guard: int) -> None:
    """``run(deterministic)`` -> (o, lse, dq, dk, dv) writes every element of each output
    and nothing past its end: run again with NaN-filled outputs followed by ``guard``
    NaN elements, both backward algorithms."""
    for deterministic in (True, False):
        clean = run(deterministic)
        empty, buffers = _guarded_empty(guard=guard)
        with monkeypatch.context() as m:
            m.setattr(fa, "_empty", empty)
            poisoned = run(deterministic)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), poisoned, clean):
            assert torch.equal(a, b), f"{name} has elements the kernels never wrote"
        for buf, n in buffers:
            assert torch.isnan(buf[n:]).all(), "a store went past the end of an output"


def _misaligned(kind: str) -> list[torch.Tensor]:
    """q, k, v, do (B=1, H=2, T=21, D=16, fp16) that TMA cannot take, by ``kind``."""
    q, k, v, do = _inputs(1, 2, 2, 21, 21, 16, FP16)
    if kind == "base":            # data_ptr 2 bytes past a 16-byte boundary
        shifted = torch.empty(q.numel() + 1, dtype=FP16, device=DEVICE)[1:]
        q = shifted.view(q.shape).copy_(q)
    elif kind == "last_stride":   # D strided by 2
        k = torch.stack([k, torch.zeros_like(k)], -1)[..., 0]
    elif kind == "row_stride":    # rows 20 elements (40 bytes) apart
        v = _row_padded(v, 20)
    elif kind == "head_dim":      # D = 7: contiguous rows of 14 bytes
        q, k, v, do = _inputs(1, 2, 2, 21, 21, 7, FP16)
    return [q, k, v, do]


def _row_padded(x: torch.Tensor, row: int) -> torch.Tensor:
    """``x`` (B, H, T, D) stored with ``row`` elements between rows (row > D)."""
    b, h, t, d = x.shape
    flat = torch.zeros(b * h * t * row + d, dtype=x.dtype, device=x.device)
    out = flat.as_strided(x.shape, (h * t * row, t * row, row, 1))
    out.copy_(x)
    return out


@pytest.mark.parametrize("kind", ["base", "last_stride", "row_stride", "head_dim"])
def test_unqualified_inputs_take_the_pointer_path(monkeypatch, launches, kind):
    """On a TMA device, inputs that break the copy engine's rules (a base or a row
    stride not a multiple of 16 bytes, D not unit-strided) go through pointers, and
    are still right."""
    _device(monkeypatch, True)
    q, k, v, do = _misaligned(kind)
    _check(q, k, v, do, True, 0.25)
    assert launches and not any(tma for _, tma, _ in launches), launches


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp32_and_interpreted_bf16_take_the_pointer_path(monkeypatch, launches, dtype):
    """fp32 never takes TMA (its FMA dots spill with TMA tiles on sm_90), bf16 not
    under the interpreter (its bf16 descriptors are wrong)."""
    _device(monkeypatch, True)
    q, k, v, do = _inputs(1, 2, 2, 17, 17, 16, dtype)
    _check(q, k, v, do, True, 0.25)
    assert launches and not any(tma for _, tma, _ in launches), launches


def test_tma_ok_rules():
    """``_tma_ok`` itself: the layouts TMA takes (contiguous, transposed heads, a KV
    head expanded with stride 0, varlen (total, H, D), padded rows of 16 bytes) and
    those it does not."""
    x = torch.zeros(2, 3, 5, 16, dtype=FP16)
    assert fa._tma_ok(False, x, x.transpose(1, 2).contiguous().transpose(1, 2))
    assert fa._tma_ok(False, x[:, :1].expand(2, 3, 5, 16))
    assert fa._tma_ok(True, torch.zeros(7, 3, 16, dtype=FP16))
    assert not fa._tma_ok(True, torch.zeros(7, 3, 16, dtype=FP32))   # fp32: pointers
    assert fa._tma_ok(False, _row_padded(x, 24))
    assert not fa._tma_ok(False, _row_padded(x, 20))               # 40-byte rows
    assert not fa._tma_ok(False, x[..., ::2])                      # D stride 2
    assert not fa._tma_ok(False, x[..., 1:])                       # base + 2 bytes
    assert not fa._tma_ok(False, torch.zeros(2, 3, 5, 12, dtype=FP16))  # 24-byte rows
    assert not fa._tma_ok(False, x, x[:, :, :, 1:])                # one of several
    assert not fa._tma_ok(False, x[:, :, :1].expand(2, 3, 5, 16))  # row stride 0


@pytest.mark.parametrize("capability,has_tma,has_ws,enabled,expected", [
    ((8, 0), True, True, True, (False, False, False, False)),
    ((8, 9), True, True, True, (False, False, False, False)),
    ((9, 0), True, True, True, (True, False, True, True)),
    ((10, 0), True, True, True, (True, True, True, True)),
    ((10, 0), True, False, True, (True, False, True, True)),
    ((9, 0), False, False, True, (False, False, True, True)),
    ((9, 0), True, True, False, (False, False, True, True)),
], ids=["sm80", "sm89", "sm90", "sm100", "sm100-old-triton", "no-descriptors",
        "FASTATTN_TMA=0"])
def test_device_paths(monkeypatch, capability, has_tma, has_ws, enabled, expected):
    """TMA exactly on CUDA sm_90+ with a Triton that has tensor descriptors (and
    FASTATTN_TMA not 0), warp specialization from sm_100 on; never on CPU. The head-dim
    split in every kernel from sm_90 on and on CPU (the interpreter). The result is
    cached per device."""
    calls = []

    def get_capability(index):
        calls.append(index)
        return capability
    monkeypatch.setattr(fa, "_DEVICE_PATHS", {})
    monkeypatch.setattr(fa, "_HAS_TMA", has_tma)
    monkeypatch.setattr(fa, "_HAS_WARP_SPEC", has_ws)
    monkeypatch.setattr(fa, "_TMA_ENABLED", enabled)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert fa._device_paths(torch.device("cpu")) == (False, False, True, True)
    assert fa._device_paths(torch.device("cuda", 1)) == expected
    assert fa._device_paths(torch.device("cuda")) == expected      # current device: 1
    assert calls == [1]


@pytest.mark.parametrize("d, dkdv_tma", [(128, True), (160, False)])
def test_atomic_dkdv_keeps_pointers_above_d128(monkeypatch, launches, d, dkdv_tma):
    """The atomic-dQ dK/dV spills through TMA at D > 128 on sm_90 (every tile tried):
    it keeps the pointer path there; the forward and the deterministic backward keep
    TMA."""
    _device(monkeypatch, True)
    q, k, v, do = _inputs(1, 2, 2, 17, 17, d, torch.float16)
    o, lse = fa.attn_fwd(q, k, v, True, 0.25)
    fa.attn_bwd(do, q, k, v, o, lse, True, 0.25, deterministic=False)
    fa.attn_bwd(do, q, k, v, o, lse, True, 0.25)
    tma = {}
    for name, path, _ in launches:
        tma.setdefault(name, []).append(path)
    assert tma["_attn_fwd_kernel"] == [True] and tma["_attn_bwd_dq_kernel"] == [True]
    assert tma["_attn_bwd_dkdv_kernel"] == [dkdv_tma, True]


@pytest.mark.parametrize("d, dkdv_tma", [(128, True), (160, False)])
def test_scored_dkdv_keeps_pointers_above_d128(monkeypatch, launches, d, dkdv_tma):
    """So does the deterministic dK/dV with a soft cap (or ALiBi, dropout) at D > 128;
    its forward and dQ keep TMA."""
    _device(monkeypatch, True)
    q, k, v, do = _inputs(1, 2, 2, 17, 17, d, torch.float16)
    o, lse = fa.attn_fwd(q, k, v, True, 0.25, softcap=5.0)
    fa.attn_bwd(do, q, k, v, o, lse, True, 0.25, softcap=5.0)
    assert [(name, tma) for name, tma, _ in launches] == [
        ("_attn_fwd_kernel", True), ("_attn_bwd_dkdv_kernel", dkdv_tma),
        ("_attn_bwd_dq_kernel", True)]
