"""fastattn's layers through the ``kernels`` package's mapping (transformers'
``use_kernel_forward_from_hub`` hook), from the in-process repository: no download.

transformers 5.24 marks its classes only when it accepts the installed ``kernels``
(0.18.2 <= version < 0.19); PyPI's newest here is 0.17.2, so these tests mark the classes
themselves with ``kernels.replace_kernel_forward_from_hub``, which is what transformers'
decorator does, and take the marks off afterwards."""
import copy
import importlib.metadata
import importlib.util
import pathlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn.integrations.hub_layers import LocalRepository, kernel_mapping  # noqa: E402
from routing import fastattn_ops  # noqa: E402
from test_kernelize import MODELS, TOL, _assert_same_gradients, _inputs  # noqa: E402

act = transformers.activations


@pytest.fixture(scope="module")
def hub():
    """The ``kernels`` distribution: the repository's own ``kernels/`` folder (fastattn's
    Triton kernels) shadows it on ``sys.path`` when tests run from the repository root."""
    try:
        init = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels package is not installed (pip install kernels)")
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    for name in saved:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "kernels", init, submodule_search_locations=[str(pathlib.Path(init).parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
    yield module
    for name in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def _marked(hub, marks):
    """Mark classes as transformers' decorator would; returns a function taking them off."""
    for cls, name in marks:
        hub.replace_kernel_forward_from_hub(cls, name)

    def unmark():
        for cls, _ in marks:
            del cls.kernel_layer_name, cls.kernel_condition
    return unmark


def _kernelize(hub, model, mode):
    with hub.use_kernel_mapping(kernel_mapping(("cpu",)), inherit_mapping=False):
        hub.kernelize(model, mode=mode, device="cpu", use_fallback=hub.KernelizeFallback.NONE)


def test_llama_training_step_on_hub_layers(hub):
    """Every LlamaRMSNorm and SiLU of a Llama through the mapping: each ran a fastattn op;
    loss and every gradient as eager's on the same weights."""
    modeling = sys.modules["transformers.models.llama.modeling_llama"]
    unmark = _marked(hub, [(modeling.LlamaRMSNorm, "RMSNorm"), (act.SiLUActivation, "SiLU")])
    try:
        torch.manual_seed(0)
        eager = transformers.LlamaForCausalLM._from_config(copy.deepcopy(MODELS["llama"][1]),
                                                           attn_implementation="eager")
        fast = copy.deepcopy(eager)
        _kernelize(hub, fast, hub.Mode.TRAINING)
    finally:
        unmark()
    kw, _ = _inputs("llama")
    with fastattn_ops() as ran:
        out = fast(**kw)
        out.loss.backward()
    ref = eager(**kw)
    ref.loss.backward()
    assert ran["layer_norm_fwd"] == 5 and ran["swiglu_fwd"] == 2, dict(ran)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    _assert_same_gradients(fast, eager)


@pytest.mark.parametrize("cls, name", [
    (act.GELUActivation, "GeLU"), (act.GELUTanh, "GeluTanh"),
    (act.NewGELUActivation, "NewGELU"), (act.FastGELUActivation, "FastGELU"),
    (act.QuickGELUActivation, "QuickGELU"), (act.SiLUActivation, "SiLU")])
def test_activation_hub_layers_match_eager(hub, cls, name):
    unmark = _marked(hub, [(cls, name)])
    try:
        eager = torch.nn.Sequential(cls())
        fast = copy.deepcopy(eager)
        _kernelize(hub, fast, hub.Mode.TRAINING | hub.Mode.TORCH_COMPILE)
    finally:
        unmark()
    x = 3 * torch.randn(4, 37, generator=torch.Generator().manual_seed(7))
    with fastattn_ops() as ran:
        y = fast(x)
    assert sum(ran.values()) == 1, dict(ran)
    torch.testing.assert_close(y, eager(x), atol=1e-5, rtol=1e-5)


def test_local_repository_names_its_layers():
    assert LocalRepository("RMSNorm").load().__name__ == "RMSNorm"
    with pytest.raises(ValueError, match="layer_name must be one of .* got 'Nope'"):
        LocalRepository("Nope")
