"""The op registry (``fastattn.ops.registry``): every entry is complete and true.

Adding an op means a kernel file, an op file with its registry entry, and a test file;
this module fails when one of them, or what the registry promises, is missing. Each
entry is also run here, generically, against its float64 reference, forward and
backward, on every backend this machine has: a new op is checked from the moment it
is registered.
"""
from pathlib import Path

import pytest
import torch

import fastattn  # noqa: F401  (imports every drop-in layer, which register themselves)
from conftest import DEVICE, available_backends
from fastattn.ops import registry
from routing import fastattn_ops
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
SPECS = registry.specs()
IDS = [s.name for s in SPECS]
# Tiny shapes for the generic check: an odd size, so no kernel tile divides it.
TINY = {"T": 19, "N": 40}
TINY_OVERRIDES = {"T": {"batch": 1, "heads": 2, "head_dim": 16}, "N": {"batch": 5}}


def test_registry_lists_every_op():
    assert {"flash_attention", "layer_norm", "rms_norm", "gelu"} <= set(registry.names())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_has_its_files(spec):
    """One name through the layers: kernels/<family>.py, fastattn/ops/<family>.py and
    tests/test_<family>.py, whose float64 tests use the reference implementations."""
    for path in (f"kernels/{spec.family}.py", f"fastattn/ops/{spec.family}.py",
                 f"tests/test_{spec.family}.py"):
        assert (ROOT / path).is_file(), f"{spec.name}: {path} is missing"
    test_text = (ROOT / f"tests/test_{spec.family}.py").read_text()
    assert "float64" in test_text and "reference" in test_text, \
        f"tests/test_{spec.family}.py has no float64 reference test"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_custom_ops_exist(spec):
    assert spec.custom_ops, f"{spec.name} declares no custom op"
    for name in spec.custom_ops:
        namespace, op = name.split("::")
        assert namespace == "fastattn" and hasattr(torch.ops.fastattn, op), name


def test_every_family_has_a_dropin_for_enable():
    """``enable()`` reaches every op family through the torch function it replaces, or the
    family declares why torch has none (``registry.no_torch_function``)."""
    routed = {spec.family for spec, _ in registry.function_routes().values()}
    unrouted = registry.unrouted()
    assert all(unrouted.values()) and not routed & set(unrouted)
    assert routed | set(unrouted) == {spec.family for spec in SPECS}


def test_every_swap_kind_is_a_subclass_with_the_same_state_dict_keys():
    for kind, (torch_cls, fast_cls) in registry.module_swaps().items():
        assert issubclass(fast_cls, torch_cls), kind
        assert fast_cls.__init__ is torch_cls.__init__, f"{kind}: constructor differs"


@pytest.mark.parametrize("backend", available_backends(("triton", "ext", "torch")))
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_matches_its_float64_reference(spec, backend):
    """The entry's own inputs, fastattn call and reference agree, forward and backward,
    and the call runs the entry's custom ops (it is routed, not torch's own)."""
    if backend not in spec.backends:
        pytest.skip(f"{spec.name} has no {backend} backend")
    device = torch.device(DEVICE)
    shape = spec.shape(TINY[spec.x], device, **TINY_OVERRIDES[spec.x])
    inputs, grad = spec.inputs(shape, torch.float32, device, 0)
    backward = "fwd+bwd" in spec.modes                 # an inference-only op has no backward
    with fastattn.use_backend(backend), fastattn_ops() as ran:
        out = spec.fast(*inputs, **spec.options)
        grads = torch.autograd.grad(out, inputs, grad) if backward else ()
    assert {op.split("::")[1] for op in spec.custom_ops} <= set(ran), ran
    exact = [x.detach().double().requires_grad_() for x in inputs]
    ref = spec.reference(*exact, **spec.options)
    ref_grads = torch.autograd.grad(ref, exact, grad.double()) if backward else ()
    if spec.tolerance is not None:         # rounding of its own (fp8): the entry's bound
        err = (out.double() - ref).abs().max() / ref.abs().max()
        assert err <= spec.tolerance, f"{spec.name} out: relative error {err:.3g}"
    else:
        assert_close(out, ref, f"{spec.name} out")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, f"{spec.name} grad {i}")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_work_model(spec):
    """The work model grows with the size and counts the backward on top."""
    device = torch.device("cpu")
    small, big = (spec.shape(n, device) for n in (256, 512))
    for mode in spec.modes:
        assert 0 < spec.work(small, torch.float32, mode, **spec.options) < \
            spec.work(big, torch.float32, mode, **spec.options)
    if "fwd+bwd" in spec.modes:
        assert spec.work(small, torch.float32, "fwd+bwd", **spec.options) > \
            spec.work(small, torch.float32, "fwd", **spec.options)
