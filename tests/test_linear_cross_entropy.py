"""Fused linear cross-entropy (``fastattn.ops.linear_cross_entropy``) against float64.

The truth is ``fastattn.reference.linear_cross_entropy`` run in float64 (all the logits
at once); ``test_reference_matches_torch`` pins that reference to ``F.cross_entropy``.

Tolerances (flash-attention's rule, ``tolerances.assert_close``): fastattn's max error
against float64 may be at most 2× that of eager ``F.cross_entropy(F.linear(...))`` in the
same dtype on the same inputs, plus a floor ``FLOOR[dtype] · (1 + max |reference|)``:
* fp32: 1e-4, the shared floor for fp32 ops that accumulate in fp32 (the K-long dots of
  the logits, the V-long log-sum-exp, the N-long dW sums).
* fp16 2e-3 and bf16 1.6e-2, about two ulps. fastattn rounds the logits and their
  gradient to the input dtype where eager does, and two things differently: its loss is
  fp32 (eager's is rounded to the input dtype, so fastattn's loss is more accurate) and
  dW is summed over chunks in fp32 from one rounded share per chunk (eager rounds one
  fp32 sum once), which the 2× margin and the floor cover.
Options torch has no eager form of (z-loss, soft cap) are held to the fp32 floor.

Interpreter shapes: Triton tiles of 1024 classes under ``TRITON_INTERPRET=1``, so V =
1100 makes two tiles with a masked tail, and chunks of 8 rows over 29 tokens leave a
short last chunk.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fastattn
from conftest import DEVICE, available_backends
from fastattn import backends, reference
from fastattn._warnings import FallbackWarning, _SEEN
from fastattn.ops import linear_cross_entropy as lce
from fastattn.ops import registry
from routing import fastattn_ops
from tolerances import FLOOR, assert_close

BACKENDS = available_backends(("triton", "torch"))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
REDUCTIONS = ["mean", "sum", "none"]
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")


def _inputs(n, k, v, dtype=torch.float32, bias=True, ignore_every=5, seed=0):
    """x (n, k), weight (v, k) scaled so logits are O(1..3), bias, targets with every
    ``ignore_every``-th row -100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, k, generator=g) * 2 / math.sqrt(k)).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, b, t


def _leaves(x, w, b):
    return [p for p in (x, w, b) if p is not None]


def _grads(loss, leaves, seed=1):
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(loss, leaves, g.to(loss.device, loss.dtype))


def _run(backend, x, w, b, t, **kw):
    with fastattn.use_backend(backend):
        loss = lce.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    return loss, _grads(loss, _leaves(x, w, b))


def _exact(x, w, b, t, **kw):
    """Loss and gradients by the float64 reference."""
    leaves = [None if p is None else p.detach().double().requires_grad_() for p in (x, w, b)]
    loss = reference.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], **kw)
    return loss, _grads(loss, _leaves(*leaves))


def _eager(x, w, b, t, reduction):
    """Unfused eager torch in the inputs' dtype."""
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in (x, w, b)]
    loss = F.cross_entropy(F.linear(leaves[0], leaves[1], leaves[2]), t, reduction=reduction)
    return loss, _grads(loss, _leaves(*leaves))


def _check(got, exact, eager=None, floor=None):
    (loss, grads), (loss64, grads64) = got, exact
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    eager_loss, eager_grads = eager if eager is not None else (None, [None] * len(grads))
    assert_close(loss, loss64, "loss", eager=eager_loss, floor=floor)
    for name, g, g64, ge in zip(("dx", "dweight", "dbias"), grads, grads64, eager_grads):
        assert_close(g, g64, name, eager=ge, floor=floor)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_float64(backend, dtype, reduction):
    """Loss and the x, weight and bias gradients; several chunks (the last one short),
    two vocabulary tiles (the last one masked), ignored rows."""
    x, w, b, t = _inputs(29, 24, 1100, dtype)
    got = _run(backend, x, w, b, t, reduction=reduction, chunk_size=8)
    for leaf, grad in zip((x, w, b), got[1]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    _check(got, _exact(x, w, b, t, reduction=reduction), _eager(x, w, b, t, reduction))


SHAPES = [(1, 8, 3, None), (5, 16, 1025, 2), (20, 40, 257, 7), (9, 5, 64, 100)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-K{k}-V{v}-c{c}" for n, k, v, c in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, shape):
    """One token and three classes; V one past a tile; chunks of 2 and 7 rows; a chunk
    larger than the input; no bias."""
    n, k, v, chunk = shape
    x, w, b, t = _inputs(n, k, v, bias=n != 9, ignore_every=3 if n > 3 else 0)
    got = _run(backend, x, w, b, t, chunk_size=chunk)
    _check(got, _exact(x, w, b, t), _eager(x, w, b, t, "mean"))


OPTIONS = [
    ("smoothing", "mean", dict(label_smoothing=0.1)),
    ("z_loss", "sum", dict(z_loss=1e-2)),
    ("softcap", "none", dict(softcap=2.0)),
    ("all", "mean", dict(label_smoothing=0.2, z_loss=1e-3, softcap=3.0)),
    ("all", "none", dict(label_smoothing=0.2, z_loss=1e-3, softcap=3.0)),
]


@pytest.mark.parametrize("name, reduction, opts", OPTIONS,
                         ids=[f"{n}-{r}" for n, r, _ in OPTIONS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_against_float64(backend, name, reduction, opts):
    """Label smoothing, z-loss and the logit soft cap (a cap of 2 bends most logits),
    alone and together, with the mean, sum and per-row losses."""
    x, w, b, t = _inputs(21, 16, 1100)
    got = _run(backend, x, w, b, t, reduction=reduction, chunk_size=8, **opts)
    _check(got, _exact(x, w, b, t, reduction=reduction, **opts), floor=FLOOR[torch.float32])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_reference_matches_torch(reduction, smoothing):
    """The float64 reference is ``F.cross_entropy`` (label smoothing with ignored rows,
    whose mean divides by the rows that count)."""
    x, w, b, t = _inputs(17, 8, 50, torch.float64)
    want = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction,
                           label_smoothing=smoothing)
    got = reference.linear_cross_entropy(x, w, t, b, reduction=reduction,
                                         label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_input(backend):
    """(B, T, K) hidden states (here a transposed view) with (B, T) targets: the same
    values as the contiguous rows, per-row losses in the targets' shape."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, 5, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    xc = x.detach().contiguous().requires_grad_()
    _, w, b, _ = _inputs(10, 24, 70)
    t = torch.randint(0, 70, (2, 5), generator=g).to(DEVICE)
    t[0, 1] = -100
    loss, grads = _run(backend, x, w, b, t, reduction="none", chunk_size=3)
    loss_c, grads_c = _run(backend, xc, w, b, t, reduction="none", chunk_size=3)
    assert loss.shape == (2, 5) and loss[0, 1] == 0
    torch.testing.assert_close(loss, loss_c, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_c):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_only_changes_rounding(backend):
    x, w, b, t = _inputs(12, 16, 90)
    loss, grads = _run(backend, x, w, b, t, chunk_size=12)
    for chunk in (1, 5, None):
        loss_c, grads_c = _run(backend, x, w, b, t, chunk_size=chunk)
        torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads_c, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_no_rows(backend, reduction):
    """As torch: every row ignored gives loss NaN ("mean", 0/0) or 0, and zero
    gradients; no rows at all gives NaN / 0 / an empty loss."""
    x, w, b, t = _inputs(6, 8, 30, ignore_every=1)
    loss, grads = _run(backend, x, w, b, t, reduction=reduction)
    want, want_grads = _eager(x, w, b, t, reduction)
    torch.testing.assert_close(loss, want, equal_nan=True)
    for got in grads:
        assert torch.equal(got, torch.zeros_like(got))
    with fastattn.use_backend(backend):
        empty = lce.linear_cross_entropy(x[:0], w, t[:0], linear_bias=b, reduction=reduction)
    torch.testing.assert_close(empty, F.cross_entropy(F.linear(x[:0], w, b), t[:0],
                                                      reduction=reduction).float(),
                               equal_nan=True)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range_gives_nan(backend, reduction):
    """A target outside [0, V) that is not ignore_index poisons its row (NaN loss and
    gradient) rather than reading another row's logits; the other rows are unharmed."""
    x, w, b, t = _inputs(6, 8, 30, ignore_every=0)
    t[2], t[4] = 30, -7
    loss, (dx, _, _) = _run(backend, x, w, b, t, reduction=reduction)
    assert loss.isnan().any()
    assert dx[2].isnan().all() and dx[4].isnan().all()
    if reduction == "none":
        assert not loss[[0, 1, 3, 5]].isnan().any() and not dx[[0, 1, 3, 5]].isnan().any()


def _triton_kernels():
    from fastattn.kernels import linear_cross_entropy
    return linear_cross_entropy


def _need_triton():
    ok, why = backends.triton_status(torch.device(DEVICE))
    if not ok:
        pytest.skip(why)


def test_kernel_outputs_are_fully_written(monkeypatch):
    """The loss and lse buffers start as NaN: a row the kernel skips shows up (the
    gradient is written over the logits, so a skipped element fails the float64 tests)."""
    _need_triton()
    monkeypatch.setattr(_triton_kernels(), "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                dtype=dtype, device=device))
    x, w, b, t = _inputs(13, 8, 1100, torch.bfloat16)
    loss, grads = _run("triton", x, w, b, t, reduction="none", chunk_size=5)
    for tensor in (loss, *grads):
        assert not tensor.isnan().any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_is_deterministic(reduction):
    """No atomics: dW and db are summed chunk after chunk, so reruns agree bit for bit."""
    _need_triton()
    x, w, b, t = _inputs(15, 8, 200)
    first = _run("triton", x, w, b, t, reduction=reduction, chunk_size=4)[1]
    second = _run("triton", x, w, b, t, reduction=reduction, chunk_size=4)[1]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor (elements) any torch function returns in the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materialises_the_logits(reduction):
    """Forward and backward never hold a tensor of the (tokens × V) logits' size, while
    the unfused pair does (so this test can fail)."""
    n, k, v, chunk = 64, 8, 500, 16
    x, w, b, t = _inputs(n, k, v)
    with fastattn.use_backend("torch"), _LargestTensor() as fused:
        lce.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk,
                                 reduction=reduction).sum().backward()
    with _LargestTensor() as unfused:
        F.cross_entropy(F.linear(x, w, b), t, reduction=reduction).sum().backward()
    assert unfused.largest >= n * v
    assert fused.largest <= max(chunk * v, v * k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    """Under autocast the matmul runs in autocast's dtype (as F.linear's would), the
    gradients come back in the fp32 parameters' dtype."""
    x, w, b, t = _inputs(11, 16, 300)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _run(backend, x, w, b, t)
        want_loss = F.cross_entropy(F.linear(x, w, b), t)
    assert all(g.dtype == torch.float32 for g in got[1])
    exact = _exact(*(p.detach().bfloat16().float() for p in (x, w, b)), t)
    _check(got, exact, floor=FLOOR[torch.bfloat16])
    torch.testing.assert_close(got[0], want_loss.float(), rtol=2e-2, atol=2e-2)


def test_gpt_loss_in_one_call():
    """The call GPT.forward can make gives its loss today: mean cross-entropy in float32
    of ``hidden @ Wᵀ`` over (B, T) targets with -1 ignored."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 16, generator=g).to(DEVICE)
    w = torch.randn(40, 16, generator=g).to(DEVICE)
    targets = torch.randint(0, 40, (2, 7), generator=g).to(DEVICE)
    targets[1, 3:] = -1
    logits = hidden @ w.t()
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(lce.linear_cross_entropy(hidden, w, targets, ignore_index=-1),
                               want)


def test_default_chunk_size():
    assert lce.default_chunk_size(10, 768, 50257) == 10          # never more than N
    assert lce.default_chunk_size(8192, 768, 50257) == lce.MIN_CHUNK
    assert lce.default_chunk_size(65536, 4096, 32000) == 16384    # ~N·K/V, a power of 2


# ----------------------------------------------------------------- enable() and fallbacks


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch has no F.linear_cross_entropy")
def test_enable_routes_torch_linear_cross_entropy():
    x, w, b, t = _inputs(9, 8, 40)
    # Load every op first: registry.function_routes() (called by enable()) iterates the
    # routes while its own _load() may import op files that add routes.
    registry.names()
    with fastattn.enable(), fastattn_ops() as ran:
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b)
    assert ran["linear_cross_entropy_fwd"] == 1
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w, b), t))


@pytest.mark.parametrize("case", ["class_weights", "probabilities"])
def test_unserved_calls_go_to_torch_with_a_warning(case):
    x, w, b, t = _inputs(9, 8, 40, ignore_every=0)
    kw = {}
    if case == "class_weights":
        kw["weight"] = torch.rand(40, device=DEVICE)
    else:
        t = torch.softmax(torch.randn(9, 40, device=DEVICE), dim=-1)
    _SEEN.clear()
    with pytest.warns(FallbackWarning, match="fastattn.linear_cross_entropy"), \
            fastattn_ops() as ran:
        loss = lce.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    assert not ran
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w, b), t, **kw))
    with pytest.raises(ValueError, match="z_loss and softcap need fastattn's path"):
        lce.linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-4, **kw)


def test_no_double_backward_and_one_backward_per_loss():
    """The gradients made in the forward are constants to autograd (no second
    derivative) and are scaled in place by the backward (no second backward)."""
    x, w, b, t = _inputs(5, 8, 20)
    loss = lce.linear_cross_entropy(x, w, t, linear_bias=b)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = lce.linear_cross_entropy(x, w, t, linear_bias=b)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    want = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t), (x, w, b))
    for got, ref in zip(first, want):
        torch.testing.assert_close(got, ref)
    with pytest.raises(RuntimeError, match="a second backward through the same loss"):
        torch.autograd.grad(loss, (x, w))


# ----------------------------------------------------------------------------- validation


def _call(**overrides):
    x, w, b, t = (torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE),
                  torch.randn(20, device=DEVICE), torch.randint(0, 20, (4,), device=DEVICE))
    args = dict(input=x, linear_weight=w, target=t, linear_bias=b)
    args.update(overrides)
    input, linear_weight, target = args.pop("input"), args.pop("linear_weight"), args.pop("target")
    return lce.linear_cross_entropy(input, linear_weight, target, **args)


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(input=[1.0]), TypeError, r"input must be a torch.Tensor, got list"),
    (dict(input=torch.randn(4, 8).double()), TypeError,
     r"input dtype must be float16, bfloat16 or float32, got torch.float64"),
    (dict(input=torch.tensor(1.0)), ValueError, r"input must have at least one dimension"),
    (dict(linear_weight=torch.randn(20, 9)), ValueError,
     r"linear_weight shape must be \(V, 8\) with V >= 1 .* got \(20, 9\)"),
    (dict(linear_weight=torch.randn(20, 8).half()), TypeError,
     r"linear_weight dtype must be input's dtype torch.float32, got torch.float16"),
    (dict(linear_bias=[1.0]), TypeError, r"linear_bias must be a torch.Tensor, got list"),
    (dict(linear_bias=torch.randn(21)), ValueError,
     r"linear_bias shape must be \(20,\) \(linear_weight's rows\), got \(21,\)"),
    (dict(linear_bias=torch.randn(20).half()), TypeError,
     r"linear_bias dtype must be input's dtype torch.float32, got torch.float16"),
    (dict(linear_weight=torch.randn(20, 8, device="meta")), ValueError,
     r"linear_weight must be on input's device .*, got meta"),
    (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError,
     r"target dtype must be torch.int64 \(class indices\), got torch.int32"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError,
     r"target shape must be input's shape without its last dim \(4,\), got \(5,\)"),
    (dict(reduction="avg"), ValueError,
     r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
    (dict(label_smoothing=1.5), ValueError,
     r"label_smoothing must be a float in \[0, 1\], got 1.5"),
    (dict(z_loss=-1.0), ValueError, r"z_loss must be a finite float >= 0, got -1.0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be a finite float >= 0 .* got inf"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int or None, got 0"),
])
def test_validation_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


# ------------------------------------------------------------------- opcheck and compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake kernels, autograd registration and AOT dispatch of both ops: the
    gradients made in the forward ("mean"), recomputed in backward ("none"), no bias."""
    x, w, b, t = (p.detach() for p in _inputs(7, 8, 40))
    fwd = torch.ops.fastattn.linear_cross_entropy_fwd.default
    bwd = torch.ops.fastattn.linear_cross_entropy_bwd.default
    for reduction, grad, bias in (("mean", True, b), ("none", False, None)):
        leaves = [None if p is None else p.clone().requires_grad_() for p in (x, w, bias)]
        torch.library.opcheck(fwd, (*leaves, t, -100, 0.1, 1e-3, 2.0, reduction, 4, grad,
                                    False, backend))
    lse = torch.logsumexp(F.linear(x, w, b), dim=-1)
    torch.library.opcheck(bwd, (torch.randn(7, device=DEVICE), x, w, b, t, lse, -100, 0.0,
                                0.0, 0.0, 4, backend))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    """torch.compile traces the op (fake kernels, autograd) in one graph and gives the
    eager result."""
    x, w, b, t = _inputs(9, 8, 40)

    def step(x, w, b, t):
        return lce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                        chunk_size=4).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with fastattn.use_backend("torch"):
        got = compiled(x, w, b, t)
        got_grads = torch.autograd.grad(got, (x, w, b))
        want = step(x, w, b, t)
        want_grads = torch.autograd.grad(want, (x, w, b))
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg)
