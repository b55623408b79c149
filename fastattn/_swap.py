"""Putting fastattn's kernels into models that already exist.

* ``swap(model)`` replaces torch modules with fastattn's drop-ins, in place, keeping the
  very same parameter tensors (shared, not copied), device, dtype and train/eval mode,
  and returns a report of what it swapped and what it left and why.
* ``enable()`` sends calls of ``F.scaled_dot_product_attention``, ``F.layer_norm``,
  ``F.rms_norm`` and ``F.gelu`` made anywhere inside it to fastattn — for models that call
  those functions directly — through a ``TorchFunctionMode``.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import fastattn.functional  # noqa: F401  (registers the attention drop-in for enable())
from fastattn import nn as fnn
from fastattn._warnings import warn_fallback
from fastattn.ops import registry

# Every kind of module swap, from the registry (fastattn.nn declares them), plus the
# Linear → GELU fusion done here. fastattn's classes subclass the torch ones, so a swap
# changes the module's class in place and every attribute, parameter and hook stays.
LINEAR_GELU = "linear_gelu"


def kinds() -> tuple[str, ...]:
    """The keyword flags of ``swap``."""
    return (*registry.module_swaps(), LINEAR_GELU)


@dataclasses.dataclass
class SwapReport:
    """What ``swap`` did: ``swapped`` and ``left`` are lists of (module path, what, why)."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s), left {len(self.left)}"]
        lines += [f"  swapped {path or '<root>'}: {what} ({why})"
                  for path, what, why in self.swapped]
        lines += [f"  left    {path or '<root>'}: {what} ({why})" for path, what, why in self.left]
        return "\n".join(lines)


def swap(model: nn.Module, **enabled: bool) -> SwapReport:
    """Replace, in place, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GELU``,
    ``nn.MultiheadAttention`` and ``Linear → GELU`` pairs inside ``nn.Sequential`` with
    fastattn's modules. Keyword flags turn each kind off: ``layer_norm``, ``rms_norm``,
    ``gelu``, ``attention``, ``linear_gelu`` (``kinds()``; a new op's module adds its own).

    Weights are shared (the same ``Parameter`` objects), as are device, dtype, training
    mode and hooks; state dict keys do not change. Subclasses of those torch modules are
    left alone (they may override ``forward``), as are modules fastattn already provides,
    so swapping twice changes nothing. Returns a ``SwapReport``; its ``left`` also names
    the norm and activation modules of other classes (``LlamaRMSNorm``, ``nn.SiLU``,
    transformers' ``GELUActivation``), which swap does not touch.
    """
    unknown = sorted(set(enabled) - set(kinds()))
    if unknown:
        raise TypeError(f"swap() got unknown kind(s) {unknown}; kinds: {list(kinds())}")
    wanted = {kind: bool(enabled.get(kind, True)) for kind in kinds()}
    class_swaps = {torch_cls: (kind, fast_cls)
                   for kind, (torch_cls, fast_cls) in registry.module_swaps().items()}
    fastattn_classes = tuple(cls for _, cls in class_swaps.values()) + (fnn.LinearGELU,)
    report = SwapReport()
    if wanted[LINEAR_GELU]:
        _fuse_linear_gelu(model, report)
    for path, module in model.named_modules():
        cls = type(module)
        if isinstance(module, fastattn_classes):
            if not any(p == path for p, _, _ in report.swapped):
                report.left.append((path, cls.__name__, "already a fastattn module"))
            continue
        if cls in class_swaps:
            kind, new_cls = class_swaps[cls]
            if not wanted[kind]:
                report.left.append((path, cls.__name__, f"{kind}=False"))
                continue
            module.__class__ = new_cls
            report.swapped.append((path, f"nn.{cls.__name__} -> fastattn.nn.{new_cls.__name__}",
                                   "weights shared"))
        else:
            base = next((b for b in class_swaps if isinstance(module, b)), None)
            why = (f"a subclass of nn.{base.__name__} (may override forward)" if base is not None
                   else _unrecognised(module))
            if why is not None:
                report.left.append((path, cls.__name__, why))
    return report


# Activations that are not torch's (transformers' GELUActivation, SiLUActivation, ...);
# norms are told by "Norm" in the class name (LlamaRMSNorm, T5LayerNorm, nn.GroupNorm).
ACTIVATION_NAME = re.compile(r"GELU|Gelu|SiLU|Swish|ReLU|Activation")


def _unrecognised(module: nn.Module) -> str | None:
    """Why a norm or activation module is left as it is, so the report names it; None for
    every other module."""
    name = type(module).__name__
    if "Norm" in name:
        return "a norm class fastattn does not recognise: swap replaces nn.LayerNorm, nn.RMSNorm"
    if type(module).__module__ == nn.GELU.__module__ or ACTIVATION_NAME.search(name):
        return "an activation class fastattn does not recognise: swap replaces nn.GELU"
    return None


def _fuse_linear_gelu(model: nn.Module, report: SwapReport) -> None:
    """In every ``nn.Sequential``, turn ``Linear, GELU`` into ``LinearGELU, Identity``: the
    indices (and so the state dict keys) stay, the bias add moves into the GELU kernel."""
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            lin, act = seq._modules[first], seq._modules[second]
            if type(lin) is nn.Linear and type(act) is nn.GELU:
                seq._modules[first] = _linear_gelu_from(lin, act.approximate)
                seq._modules[second] = nn.Identity()
                where = f"{path}.{first}" if path else first
                report.swapped.append((where, f"nn.Linear + nn.GELU (at {second}) -> "
                                       "fastattn.nn.LinearGELU + nn.Identity", "weights shared"))


def _linear_gelu_from(lin: nn.Linear, approximate: str) -> fnn.LinearGELU:
    new = fnn.LinearGELU.__new__(fnn.LinearGELU)
    nn.Module.__init__(new)
    new.in_features, new.out_features = lin.in_features, lin.out_features
    new.approximate = approximate
    new.weight = lin.weight                          # the same Parameter objects
    new.bias = lin.bias
    new.train(lin.training)
    return new


# --- enable(): intercept torch.nn.functional calls ---


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


class FastattnMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.rms_norm`` and
    ``F.gelu`` to fastattn. Calls fastattn does not serve (other dtypes; for attention,
    the cases ``fastattn.scaled_dot_product_attention`` documents) run torch's own."""

    def __init__(self) -> None:
        super().__init__()
        self.routes = registry.function_routes()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self.routes.get(func)
        if route is not None:
            spec, dropin = route
            first = _first_tensor(args, kwargs)
            if first is not None and first.dtype in spec.dtypes:
                return dropin(*args, **kwargs)
            warn_fallback(f"fastattn.enable ({func.__name__})",
                          f"dtype {None if first is None else first.dtype} (fastattn "
                          f"{spec.name} takes {', '.join(map(str, spec.dtypes))})")
        return func(*args, **kwargs)


_GLOBAL: list[FastattnMode] = []


@contextmanager
def enable() -> Iterator[None]:
    """Inside the block, calls of ``F.scaled_dot_product_attention``, ``F.layer_norm``,
    ``F.rms_norm`` and ``F.gelu`` — from any module or function — run on fastattn.

    >>> with fastattn.enable():
    ...     logits = model(tokens)      # a model that never heard of fastattn
    """
    with FastattnMode():
        yield


def enable_globally(on: bool = True) -> None:
    """Turn the interception of ``enable()`` on (or off) for everything that follows."""
    if on and not _GLOBAL:
        mode = FastattnMode()
        mode.__enter__()
        _GLOBAL.append(mode)
    elif not on and _GLOBAL:
        _GLOBAL.pop().__exit__(None, None, None)


def is_enabled_globally() -> bool:
    return bool(_GLOBAL)
