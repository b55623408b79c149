"""The lean eager path (``fastattn.ops._custom_op.KernelOp``): in plain eager mode the
ops call their implementation directly, skipping the custom-op machinery; under a
dispatch mode (and torch.compile) they go through the ``fastattn::`` custom op. Both
paths must give bitwise the same outputs and gradients, including when only some
inputs require grad (the ``needs_input_grad`` handling is shared)."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from conftest import DEVICE, available_backends
from fastattn.ops import flash_attention as fa_ops
from fastattn.ops import gelu as gelu_ops
from fastattn.ops import layer_norm as ln_ops


class _PassThrough(TorchDispatchMode):
    """Does nothing but be a dispatch mode, which sends fastattn calls to the custom op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _t(*shape, grad=True):
    return lambda g: torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


# name -> (op module, input makers, call); the call returns a tuple of outputs.
CASES = {
    "layer_norm": (ln_ops, [_t(3, 5, 24), _t(24), _t(24)],
                   lambda x, w, b: (fastattn.layer_norm(x, (24,), w, b),)),
    "layer_norm_residual": (ln_ops, [_t(3, 5, 24), _t(3, 5, 24), _t(24), _t(24)],
                            lambda x, r, w, b: fastattn.layer_norm(
                                x, (24,), w, b, residual=r, return_residual=True)),
    "layer_norm_frozen_params": (ln_ops, [_t(7, 24), _t(24, grad=False), _t(24, grad=False)],
                                 lambda x, w, b: (fastattn.layer_norm(x, (24,), w, b),)),
    "rms_norm": (ln_ops, [_t(7, 24), _t(24)],
                 lambda x, w: (fastattn.rms_norm(x, (24,), w),)),
    "gelu": (gelu_ops, [_t(6, 33)], lambda x: (fastattn.gelu(x, "tanh"),)),
    "bias_gelu": (gelu_ops, [_t(6, 33), _t(33)], lambda x, b: (fastattn.bias_gelu(x, b),)),
    "bias_gelu_frozen_input": (gelu_ops, [_t(6, 33, grad=False), _t(33)],
                               lambda x, b: (fastattn.bias_gelu(x, b),)),
    "flash_attention": (fa_ops, [_t(1, 4, 9, 16), _t(1, 2, 9, 16), _t(1, 2, 9, 16)],
                        lambda q, k, v: (fastattn.flash_attention(q, k, v, causal=True),)),
    "flash_attention_frozen_kv": (fa_ops, [_t(1, 2, 5, 16), _t(1, 2, 7, 16, grad=False),
                                           _t(1, 2, 7, 16, grad=False)],
                                  lambda q, k, v: (fastattn.flash_attention(q, k, v),)),
}


def _run(case: str, backend: str):
    """Outputs of ``case`` and the gradients of its inputs that require grad."""
    _, makers, call = CASES[case]
    g = torch.Generator().manual_seed(0)
    inputs = [make(g) for make in makers]
    with fastattn.use_backend(backend):
        outs = call(*inputs)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=DEVICE)
                    .view(o.shape)).sum() for o in outs)
        loss.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs if t.requires_grad]


@pytest.fixture
def custom_op_calls(monkeypatch):
    """Count the calls that reach each custom op of the op modules (fwd and bwd)."""
    seen: Counter = Counter()
    for module in (ln_ops, gelu_ops, fa_ops):
        for kernel in (module._fwd, module._bwd):
            def counting(*args, _op=kernel.op, _name=kernel.name.split("::")[1]):
                seen[_name] += 1
                return _op(*args)
            monkeypatch.setattr(kernel, "op", counting)
    return seen


@pytest.mark.parametrize("backend", available_backends(("triton", "ext", "torch")))
@pytest.mark.parametrize("case", CASES)
def test_lean_path_matches_custom_op_bitwise(case, backend, custom_op_calls):
    if backend not in CASES[case][0].BACKENDS:
        pytest.skip(f"{case} has no {backend} backend")
    lean_outs, lean_grads = _run(case, backend)
    assert not custom_op_calls, f"plain eager went through the custom op: {custom_op_calls}"
    with _PassThrough():
        outs, grads = _run(case, backend)
    family = CASES[case][0].OP
    assert custom_op_calls == {f"{family}_fwd": 1, f"{family}_bwd": 1}
    assert len(lean_grads) == len(grads)
    for lean, custom in zip(lean_outs + lean_grads, outs + grads):
        assert torch.equal(lean, custom)


def test_no_grad_call_skips_the_custom_op(custom_op_calls):
    x = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        y = fastattn.gelu(x)
        assert not custom_op_calls
        with _PassThrough():
            assert torch.equal(fastattn.gelu(x), y)
    assert custom_op_calls == {"gelu_fwd": 1}


def test_profiler_sees_the_custom_ops(custom_op_calls):
    """Regression: with the lean path, ``fastattn profile`` and torch.profiler traces lost
    the ``fastattn::`` ops; under a running profiler the calls take the custom op."""
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    with torch.profiler.profile() as prof:
        fastattn.gelu(x).sum().backward()
    assert custom_op_calls == {"gelu_fwd": 1, "gelu_bwd": 1}
    assert "fastattn::gelu_fwd" in {e.key for e in prof.key_averages()}


def test_kernels_launch_directly_unless_traced():
    """A plain eager launch skips wrap_triton (its higher-order op's eager dispatch costs
    ~1 ms a launch); a traced one (torch.compile, any dispatch mode) goes through it."""
    from fastattn.kernels import _utils
    assert not _utils.tracing()
    with _PassThrough():
        assert _utils.tracing()
    assert torch.compile(lambda x: x + _utils.tracing(), fullgraph=True,
                         backend="eager")(torch.zeros(())) == 1
