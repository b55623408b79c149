"""The layers ``kernelize`` puts on fastattn, recognised by their code: RMSNorm forms,
GELU/SiLU activations and Llama-style gated MLPs (see ``fastattn.integrations.kernelize``
for the rules), and the helpers that read a module's code and give it a forward."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import weakref
from collections import Counter
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from transformers import activations as hf_act

from fastattn import nn as fnn
from fastattn._swap import ACTIVATION_NAME
from fastattn.ops.gelu import gelu
from fastattn.ops.layer_norm import rms_norm
from fastattn.ops.swiglu import geglu, silu, swiglu


@dataclasses.dataclass
class KernelizeReport:
    """What ``kernelize`` did. ``replaced`` and ``left`` hold (kind, module path, class,
    how or why); ``kind`` is one of ``KINDS``."""

    replaced: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

    def counts(self) -> Counter:
        """(kind, class, how) -> number of modules replaced that way."""
        return Counter((kind, cls, how) for kind, _, cls, how in self.replaced)

    def share(self, kind: str) -> tuple[int, int]:
        """(modules of ``kind`` replaced, modules of ``kind`` found)."""
        done = sum(1 for k, *_ in self.replaced if k == kind)
        return done, done + sum(1 for k, *_ in self.left if k == kind)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.left)}"]
        lines += [f"  {kind:<11} {cls} x{n}: {how}"
                  for (kind, cls, how), n in sorted(self.counts().items())]
        lines += [f"  left {kind:<6} {path or '<root>'} ({cls}): {why}"
                  for kind, path, cls, why in self.left]
        return "\n".join(lines)


# ------------------------------------------------------------------ reading code

@functools.lru_cache(maxsize=None)
def _code(fn: Callable) -> str | None:
    """The body of ``fn`` (past its decorators), docstring and comments dropped, as
    ``ast.unparse`` writes it: equal for two copies of one function. None if unreadable."""
    fn = inspect.unwrap(fn)
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "\n".join(ast.unparse(s) for s in body)


def _method_code(module: nn.Module, *names: str) -> str:
    """The code of the methods ``names`` of module's class, each ``name:`` + body."""
    parts = []
    for name in names:
        fn = getattr(type(module), name, None)
        if fn is not None:
            parts.append(f"{name}:\n{_code(fn)}")
    return "\n".join(parts)


def _patched(module: nn.Module) -> str | None:
    """Whose forward this instance has of its own: "fastattn" (kernelize's), "other"
    (someone else's), or None (its class's)."""
    own = vars(module).get("forward")
    if own is None:
        return None
    return "fastattn" if getattr(own, "__func__", None) in _FORWARDS else "other"


_FORWARDS: "weakref.WeakSet[Callable]" = weakref.WeakSet()
_ALREADY = "already kernelized"
_THEIRS = "the instance already has a forward of its own"


def _set_forward(module: nn.Module, forward: Callable) -> None:
    """Give this instance ``forward`` (bound to it, so a deep copy rebinds it)."""
    _FORWARDS.add(forward)
    module.forward = types.MethodType(forward, module)


def _claim(kind: str, path: str, module: nn.Module, report: KernelizeReport) -> bool:
    """True if the module's forward is its class's, free to replace; else report it."""
    state = _patched(module)
    if state == "fastattn":
        report.replaced.append((kind, path, type(module).__name__, _ALREADY))
    elif state == "other":
        report.left.append((kind, path, type(module).__name__, _THEIRS))
    return state is None


# ------------------------------------------------------------------ norms

def _norm_code(forward: str, norm: str | None = None) -> str:
    code = f"forward:\n{textwrap.dedent(forward).strip()}"
    return code if norm is None else f"{code}\n_norm:\n{textwrap.dedent(norm).strip()}"


_LLAMA = """
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    {}"""
_NORM_X = "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"

# code of forward (and _norm) -> (form, eps attribute)
_NORM_FORMS = {
    _norm_code(_LLAMA.format("return self.weight * hidden_states.to(input_dtype)")):
        ("llama", "variance_epsilon"),
    _norm_code("output = self._norm(x.float()).type_as(x)\nreturn output * self.weight",
               _NORM_X): ("llama", "eps"),
    _norm_code(_LLAMA.format("return (self.weight * hidden_states).to(input_dtype)")):
        ("fp32_weight", "variance_epsilon"),
    _norm_code(_LLAMA.format(
        "return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)")):
        ("fp32_weight", "variance_epsilon"),
    _norm_code("output = self._norm(x.float())\noutput = output * self.weight.float()\n"
               "return output.type_as(x)", _NORM_X): ("fp32_weight", "eps"),
    _norm_code("output = self._norm(x.float())\noutput = output * (1.0 + self.weight.float())"
               "\nreturn output.type_as(x)", _NORM_X): ("gemma", "eps"),
    _norm_code("return self._norm(x.float()).type_as(x)", _NORM_X): ("unweighted", "eps"),
    _norm_code("input_dtype = hidden_states.dtype\nhidden_states = hidden_states.float()\n"
               "hidden_states = hidden_states * torch.rsqrt(hidden_states.square().mean(-1, "
               "keepdim=True) + self.eps)\nreturn hidden_states.to(input_dtype)"):
        ("unweighted", "eps"),
    _norm_code("normed_output = self._norm(hidden_states.float())\nif self.with_scale:\n"
               "    normed_output = normed_output * self.weight.float()\n"
               "return normed_output.type_as(hidden_states)",
               "mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps\n"
               "return hidden_states * torch.pow(mean_squared, -0.5)"): ("gemma4", "eps"),
    _norm_code("variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)\n"
               "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)\n"
               "if self.weight.dtype in [torch.float16, torch.bfloat16]:\n"
               "    hidden_states = hidden_states.to(self.weight.dtype)\n"
               "return self.weight * hidden_states"): ("t5", "variance_epsilon"),
}
_HALF = (torch.float16, torch.bfloat16)


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return rms_norm(x, (x.shape[-1],), weight, eps)


def _norm_forward(form: str, eps_name: str) -> Callable:
    """A forward on ``fastattn.rms_norm`` with ``form``'s casting (module docstring)."""
    def llama(self, x):
        eps = getattr(self, eps_name)
        if x.dtype == torch.float32:            # the cast back is a no-op: fuse the weight
            return _rms(x, self.weight.float(), eps)
        return self.weight * _rms(x, None, eps)

    def fp32_weight(self, x):
        return _rms(x, self.weight.float(), getattr(self, eps_name))

    def gemma(self, x):
        return _rms(x, 1.0 + self.weight.float(), getattr(self, eps_name))

    def unweighted(self, x):
        return _rms(x, None, getattr(self, eps_name))

    def gemma4(self, x):
        return _rms(x, self.weight.float() if self.with_scale else None, getattr(self, eps_name))

    def t5(self, x):
        eps, w = getattr(self, eps_name), self.weight
        if w.dtype in _HALF:                    # normalised in fp32, rounded to w's dtype
            return w * _rms(x if x.dtype == w.dtype else x.float(), None, eps).to(w.dtype)
        return _rms(x.float(), w.float(), eps)

    return locals()[form]


def _norm_form(module: nn.Module) -> tuple[str, str] | None:
    return _NORM_FORMS.get(_method_code(module, "forward", "_norm"))


def _kernelize_norm(path: str, module: nn.Module, report: KernelizeReport) -> None:
    cls = type(module)
    name = cls.__name__
    if cls in (nn.LayerNorm, nn.RMSNorm):
        module.__class__ = fnn.LayerNorm if cls is nn.LayerNorm else fnn.RMSNorm
        report.replaced.append(("norms", path, f"nn.{name}", f"fastattn.nn.{name}"))
        return
    if isinstance(module, (fnn.LayerNorm, fnn.RMSNorm)):
        report.replaced.append(("norms", path, name, _ALREADY))
        return
    form = _norm_form(module)
    if form is None:
        base = "a subclass of nn.LayerNorm/nn.RMSNorm (may override forward)" \
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) else \
            "its forward reads like none of the RMSNorm forms kernelize reproduces"
        report.left.append(("norms", path, name, base))
        return
    if not _claim("norms", path, module, report):
        return
    _set_forward(module, _norm_forward(*form))
    report.replaced.append(("norms", path, name, f"fastattn.rms_norm ({form[0]} form)"))


# ------------------------------------------------------------------ activations

_EXACT_GELU = {hf_act.GELUActivation: "none", hf_act.NewGELUActivation: "tanh",
               hf_act.GELUTanh: "tanh", hf_act.FastGELUActivation: "tanh",
               hf_act.AccurateGELUActivation: "tanh"}
_SILU = (hf_act.SiLUActivation, nn.SiLU)
_QUICK = 1.702                  # QuickGELU: x·σ(1.702x) = silu(1.702x) / 1.702


def _activation_forward(module: nn.Module) -> tuple[Callable, str] | None:
    """(forward, what it runs) for a served activation module, else None."""
    cls = type(module)
    if cls in _EXACT_GELU:
        approximate = _EXACT_GELU[cls]
        return (lambda self, input: gelu(input, approximate)), f"fastattn.gelu ({approximate})"
    if cls is hf_act.ClippedGELUActivation:
        return (lambda self, x: torch.clip(gelu(x), self.min, self.max)), \
            "fastattn.gelu, then clip"
    if cls in _SILU and not getattr(module, "inplace", False):
        return (lambda self, input: silu(input)), "fastattn.silu"
    if cls is hf_act.QuickGELUActivation:
        return (lambda self, input: silu(input * _QUICK) / _QUICK), \
            "fastattn.silu(1.702x) / 1.702"
    return None


def _gate(module: nn.Module) -> tuple[Callable, str] | None:
    """The fused gate for an MLP ``act_fn``: (fn(gate, up), name), or None."""
    cls = type(module)
    if cls in _SILU:
        return swiglu, "swiglu"
    approximate = _EXACT_GELU.get(cls) or (module.approximate if cls in (nn.GELU, fnn.GELU)
                                            else None)
    if approximate is None:
        return None
    return functools.partial(geglu, approximate=approximate), f"geglu ({approximate})"


# torch.nn.modules.activation also holds these, which are not elementwise activations
_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)


def _is_activation(module: nn.Module) -> bool:
    """transformers' activation classes, torch's elementwise ones, and any class named
    like an activation (``GELU``, ``SiLU``, ``Activation``...; the report lists those it
    leaves)."""
    cls = type(module)
    return cls is fnn.GELU or (
        (cls.__module__ in (hf_act.__name__, nn.GELU.__module__)
         or ACTIVATION_NAME.search(cls.__name__) is not None)
        and not issubclass(cls, _NOT_ACTIVATIONS))


def _kernelize_activation(path: str, module: nn.Module, report: KernelizeReport) -> None:
    cls = type(module)
    if cls is nn.GELU:
        module.__class__ = fnn.GELU
        report.replaced.append(("activations", path, "nn.GELU", "fastattn.nn.GELU"))
        return
    if cls is fnn.GELU:
        report.replaced.append(("activations", path, cls.__name__, _ALREADY))
        return
    served = _activation_forward(module)
    if served is None:
        why = "inplace=True" if getattr(module, "inplace", False) else \
            "an activation fastattn has no kernel for"
        report.left.append(("activations", path, cls.__name__, why))
        return
    if not _claim("activations", path, module, report):
        return
    _set_forward(module, served[0])
    report.replaced.append(("activations", path, cls.__name__, served[1]))


# ------------------------------------------------------------------ gated MLPs

_LLAMA_MLP = "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n" \
             "return down_proj"


def _kernelize_mlp(path: str, module: nn.Module, report: KernelizeReport) -> bool:
    """Fuse the gate of a LlamaMLP-style module; True if it was fused (its ``act_fn``
    then never runs, and counts as an activation served)."""
    if _method_code(module, "forward") != f"forward:\n{_LLAMA_MLP}":
        return False
    gate = _gate(module.act_fn)
    act_name = type(module.act_fn).__name__
    if gate is None:
        report.left.append(("mlp", path, type(module).__name__,
                            f"act_fn {act_name} has no fused gated kernel"))
        return False
    fused, name = gate

    def forward(self, x):
        return self.down_proj(fused(self.gate_proj(x), self.up_proj(x)))

    if _claim("mlp", path, module, report):
        _set_forward(module, forward)
        report.replaced.append(("mlp", path, type(module).__name__, f"down_proj(fastattn."
                                f"{name}(gate_proj(x), up_proj(x)))"))
    elif _patched(module) != "fastattn":
        return False
    report.replaced.append(("activations", f"{path}.act_fn" if path else "act_fn", act_name,
                            f"fused into the MLP's fastattn.{name}"))
    return True
