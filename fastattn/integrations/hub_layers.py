"""fastattn's layers in the form of the ``kernels`` package's layer mapping, the hook
transformers calls ``use_kernel_forward_from_hub``: from a local repository, no download.

A kernel layer is a stateless ``nn.Module`` class whose ``forward`` takes the arguments of
the forward it replaces; ``kernels.kernelize`` gives each marked module of a model that
forward (a ``kernel_layer_name`` on its class: transformers' classes are marked when
transformers accepts the installed ``kernels`` version). ``layers`` holds one class per
name transformers marks and fastattn serves:

* ``RMSNorm``: the RMSNorm forms ``kernelize`` reads (``fastattn.integrations.kernelize``),
  each with its own casting; a class of another form runs its own forward, with a
  ``FallbackWarning``;
* ``SiLU``, ``GeLU`` (erf), ``GeluTanh``, ``NewGELU``, ``FastGELU`` (tanh form) and
  ``QuickGELU`` (``silu(1.702x) / 1.702``);
* ``rotary_pos_emb``: transformers' ``apply_rotary_pos_emb`` (Llama's).

>>> import kernels
>>> with kernels.use_kernel_mapping(kernel_mapping()):
...     kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu")

``kernel_mapping()`` maps each name, per device type, to a ``LocalRepository``, whose
``load()`` returns the class from this module: nothing is fetched, nothing is built.
"""
from __future__ import annotations

import types

import torch.nn as nn
from torch import Tensor

from fastattn._warnings import warn_fallback
from fastattn.integrations._hf_layers import _norm_form, _norm_forward
from fastattn.ops.gelu import gelu
from fastattn.ops.rope import apply_rotary_pos_emb
from fastattn.ops.swiglu import silu

_QUICK = 1.702


def _rms_norm(module: nn.Module, hidden_states: Tensor) -> Tensor:
    form = _norm_form(module)
    if form is None:
        warn_fallback("fastattn hub layer RMSNorm", f"{type(module).__name__}'s forward is none "
                      "of the RMSNorm forms fastattn reproduces", key=type(module),
                      to=f"{type(module).__name__}.forward")
        return type(module).forward(module, hidden_states)
    return _norm_forward(*form)(module, hidden_states)


class RMSNorm(nn.Module):
    """transformers' ``*RMSNorm`` (weight and eps read from the module it replaces)."""
    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return _rms_norm(self, hidden_states)


class SiLU(nn.Module):
    can_torch_compile = True
    has_backward = True

    def forward(self, input: Tensor) -> Tensor:
        return silu(input)


class GeLU(nn.Module):
    can_torch_compile = True
    has_backward = True

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, "none")


class GeluTanh(nn.Module):
    can_torch_compile = True
    has_backward = True

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, "tanh")


class QuickGELU(nn.Module):
    """``x·σ(1.702x)`` as ``silu(1.702x) / 1.702``."""
    can_torch_compile = True
    has_backward = True

    def forward(self, input: Tensor) -> Tensor:
        return silu(input * _QUICK) / _QUICK


class RotaryPosEmb(nn.Module):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    can_torch_compile = True
    has_backward = True

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


# the names transformers marks its classes with -> fastattn's layer
layers = types.SimpleNamespace(RMSNorm=RMSNorm, SiLU=SiLU, GeLU=GeLU, GeluTanh=GeluTanh,
                               NewGELU=GeluTanh, FastGELU=GeluTanh, QuickGELU=QuickGELU,
                               rotary_pos_emb=RotaryPosEmb)


class LocalRepository:
    """A repository for the ``kernels`` mapping (its ``RepositoryProtocol``): the layer
    ``layer_name`` of this module, loaded in process."""

    def __init__(self, layer_name: str) -> None:
        if not hasattr(layers, layer_name):
            raise ValueError(f"layer_name must be one of {sorted(vars(layers))}, got "
                             f"{layer_name!r}")
        self.layer_name = layer_name

    def load(self) -> type[nn.Module]:
        return getattr(layers, self.layer_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalRepository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("fastattn", self.layer_name))

    def __str__(self) -> str:
        return f"fastattn (local), layer `{self.layer_name}`"


def kernel_mapping(devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """``{layer name: {device type: LocalRepository}}`` for ``kernels.use_kernel_mapping``
    / ``register_kernel_mapping``: every mode (training, inference, torch.compile)."""
    return {name: {device: LocalRepository(name) for device in devices}
            for name in vars(layers)}
