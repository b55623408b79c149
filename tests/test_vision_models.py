"""torchvision's and timm's Vision Transformers on fastattn through ``swap`` + ``enable``:
every attention, LayerNorm and GELU call runs on fastattn, in training and evaluation,
with logits and gradients as eager's on the same weights. ``swap`` replaces torchvision's
``nn.MultiheadAttention``, ``nn.LayerNorm`` and ``nn.GELU`` and timm's ``nn.GELU``;
``enable`` serves timm's attention (``F.scaled_dot_product_attention``) and its
``LayerNorm`` subclass (``F.layer_norm``), which ``swap`` leaves as it has its own forward.

Calls are counted as in tests/test_model_coverage.py: on the untouched eager model by
forward hooks on its attention, norm and activation modules, on the swapped one as the
``fastattn::`` ops that ran. Both libraries are optional: torchvision has no build for
every torch (none beside the CPU torch 2.13 that CI installs), and timm needs torchvision,
so without them this file skips (run it in an environment that has them, e.g.
``pip install torch==2.14.1 torchvision==0.29.1 timm``).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from conftest import DEVICE
from routing import count_module_calls, fastattn_ops

TOL = dict(atol=1e-4, rtol=1e-4)
OPS = {"attention": ("flash_attention_fwd",), "norms": ("layer_norm_fwd",),
       "activations": ("gelu_fwd",)}


def _torchvision_vit():
    models = pytest.importorskip("torchvision.models")
    return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                    hidden_dim=32, mlp_dim=64, num_classes=10)


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             num_classes=10)


BUILDERS = {"torchvision": _torchvision_vit, "timm": _timm_vit}


def _kind(module):
    name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention) or name == "Attention":
        return "attention"
    if isinstance(module, nn.LayerNorm):
        return "norms"
    return "activations" if isinstance(module, nn.GELU) else None


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("library", list(BUILDERS))
def test_vit_runs_on_fastattn_and_matches_eager(library, train):
    torch.manual_seed(0)
    eager = BUILDERS[library]().to(DEVICE).train(train)
    fast = copy.deepcopy(eager)
    fastattn.swap(fast)      # timm's LayerNorm subclass is left: enable() serves its F.layer_norm
    calls = count_module_calls(eager, _kind, OPS)
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    labels = torch.tensor([1, 4, 7], device=DEVICE)

    ref = eager(images)
    F.cross_entropy(ref, labels).backward()
    with fastattn_ops() as ran, fastattn.enable():
        out = fast(images)
        F.cross_entropy(out, labels).backward()

    torch.testing.assert_close(out, ref, **TOL)
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    for kind, ops in OPS.items():
        assert calls[kind] > 0, (kind, calls)
        assert sum(ran[op] for op in ops) == calls[kind], (kind, dict(ran), calls)
