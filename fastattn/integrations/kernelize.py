"""One call that puts fastattn into a transformers model.

>>> from fastattn.integrations.kernelize import kernelize
>>> report = kernelize(model)        # attention, norms, activations, MLPs, rotary, loss
>>> print(report)

or, loading and kernelizing in one step (Liger's ``AutoLigerKernelForCausalLM`` style):

>>> model = from_config(config)                  # AutoModelForCausalLM by default
>>> model = from_pretrained("path/to/checkpoint", T5ForConditionalGeneration)

``kernelize`` patches INSTANCES (a ``forward`` of their own), never classes: a kernelized
model and an untouched one of the same class run side by side in one process.
Parameters, buffers and ``state_dict`` stay exactly as they were; a deep copy keeps the
patches. Each kind has a keyword to turn it off.

* ``attention``: ``register()`` and ``set_attn_implementation("fastattn")`` (see
  ``fastattn.integrations.transformers`` for what its attention function serves and where
  it falls back, with a warning). Counted per module whose forward calls transformers'
  attention interface; one that passes a ``position_bias`` (T5) is listed as left.
* ``norms``: ``nn.LayerNorm`` / ``nn.RMSNorm`` become ``fastattn.nn``'s (as ``swap`` does),
  and any other ``*Norm`` module whose forward reads, token for token, like one of the
  RMSNorm forms below gets a forward on ``fastattn.rms_norm`` that keeps that form's
  casting. transformers copies these forms into each model file, so a class is
  recognised by its code, not by its name (193 of the 201 RMSNorm and T5LayerNorm
  classes of transformers 5.24's model files); eps is read from ``variance_epsilon`` or
  ``eps``, as the form names it.

  - llama: ``w * norm(x.float()).to(x.dtype)``: ``w * rms_norm(x)``, the weight fused
    when x is fp32 (the cast is then a no-op);
  - fp32_weight: ``(w.float() * norm(x.float())).to(x.dtype)``: ``rms_norm(x, w.float())``;
  - gemma: ``(norm(x.float()) * (1 + w.float())).to(x.dtype)``:
    ``rms_norm(x, 1 + w.float())``;
  - unweighted: ``norm(x.float()).to(x.dtype)``: ``rms_norm(x)``;
  - gemma4: fp32_weight if ``with_scale``, else unweighted;
  - t5: ``w * norm(x)`` in fp32, first rounded to w's dtype when w is fp16/bf16: the same
    around ``rms_norm``.

* ``activations``: transformers' ``GELUActivation`` (erf), ``NewGELUActivation``,
  ``GELUTanh`` (= ``PytorchGELUTanh``), ``FastGELUActivation``, ``AccurateGELUActivation``
  (tanh form: the same function, rounded differently), ``ClippedGELUActivation``
  (``clip(gelu(x))``), ``SiLUActivation``, ``QuickGELUActivation`` (``x·σ(1.702x)`` =
  ``silu(1.702x) / 1.702``: the sigmoid on ``fastattn.silu``, the two scalings in torch),
  and torch's ``nn.GELU`` and ``nn.SiLU``. Any other activation module (a class of
  transformers' or torch's activation files, or one named like an activation) is listed
  as left, as is any ``*Norm*`` module whose forward is none of the forms above.
* ``mlp``: a module whose forward is LlamaMLP's, ``down_proj(act_fn(gate_proj(x)) *
  up_proj(x))``, with a SiLU or GELU ``act_fn``, becomes ``down_proj(swiglu(gate_proj(x),
  up_proj(x)))`` (``geglu`` for GELU): the gate in one pass, forward and backward.
* ``rope``: an attention module whose forward calls its file's ``apply_rotary_pos_emb``,
  where that function (and ``rotate_half``) is Llama's, gets its own copy of that forward
  whose code reads ``_fastattn_apply_rotary_pos_emb`` in that name's place: a name added
  to the model file's globals, bound to ``fastattn.apply_rotary_pos_emb``. Nothing the
  file had changes, so other instances and torch.compile see the file as it was.
* ``loss``: a causal LM whose forward hands ``self.lm_head(hidden)`` (unchanged, or
  softcapped by ``config.final_logit_softcapping``) to transformers' ``ForCausalLMLoss``
  gets a forward taking ``skip_logits`` (default: training with labels, as Liger's).
  Skipping, the LM head and the loss run as ``fastattn.linear_cross_entropy`` in chunks,
  the (tokens × vocab) logits are never formed, and the output's ``logits`` is None.
  (The instance's ``lm_head`` forward and ``loss_function`` switch to that route only
  inside such a call; otherwise they compute what they did.)

The returned ``KernelizeReport`` lists each module replaced (path, class, what with) and
each norm, activation, attention or MLP module left, with the reason.
"""
from __future__ import annotations

import ast
import dis
import functools
import inspect
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

import fastattn.integrations.transformers as fastattn_hf
from fastattn.ops.linear_cross_entropy import linear_cross_entropy
from fastattn.ops.rope import apply_rotary_pos_emb
from fastattn.integrations._hf_layers import (KernelizeReport, _claim, _code, _is_activation,
                                              _kernelize_activation, _kernelize_mlp,
                                              _kernelize_norm, _patched, _set_forward)

KINDS = ("attention", "norms", "activations", "mlp", "rope", "loss")




# ------------------------------------------------------------------ rotary embeddings

def _llama_rope_code() -> tuple[str | None, str | None]:
    from transformers.models.llama import modeling_llama
    return _code(modeling_llama.apply_rotary_pos_emb), _code(modeling_llama.rotate_half)


_ROPE = "_fastattn_apply_rotary_pos_emb"     # the name a kernelized forward reads


def _reading(code: types.CodeType, name: str, new: str) -> types.CodeType | None:
    """``code`` with its global ``name`` read as ``new``; None if ``name`` is used in
    any other way (an attribute, a store, a nested function), which renaming would hit."""
    uses = {i.opname for i in dis.get_instructions(code) if i.argval == name}
    nested = any(isinstance(c, types.CodeType) and name in c.co_names for c in code.co_consts)
    if uses != {"LOAD_GLOBAL"} or nested:
        return None
    return code.replace(co_names=tuple(new if n == name else n for n in code.co_names))


def _with_code(fn: Callable, code: types.CodeType) -> Callable | None:
    """A copy of ``fn`` whose innermost function (past its decorators) runs ``code``;
    each decorator wrapper is copied holding the copy of what it wraps in its closure.
    None where a wrapper does not hold what it wraps."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
    else:
        new_inner = _with_code(inner, code)
        cells = fn.__closure__ or ()
        if new_inner is None or not any(c.cell_contents is inner for c in cells):
            return None
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c
                        for c in cells)
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                  closure)
        copy.__wrapped__ = new_inner
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    copy.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "__wrapped__"})
    return copy


def _global_names(module: nn.Module) -> tuple[str, ...]:
    """The global names the forward of module's class reads (past its decorators)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return () if code is None else code.co_names


def _kernelize_rope(path: str, module: nn.Module, report: KernelizeReport) -> None:
    forward = type(module).forward
    inner = inspect.unwrap(forward)
    name = type(module).__name__
    theirs = inner.__globals__.get("apply_rotary_pos_emb")
    rope_code, half_code = _llama_rope_code()
    if theirs is None or _code(theirs) != rope_code or \
            _code(inner.__globals__.get("rotate_half", len)) != half_code:
        report.left.append(("rope", path, name, "its apply_rotary_pos_emb is not Llama's "
                            "(e.g. partial or interleaved rotary written differently)"))
        return
    if not _claim("rope", path, module, report):
        return
    code = _reading(inner.__code__, "apply_rotary_pos_emb", _ROPE)
    copy = None if code is None else _with_code(forward, code)
    if copy is None:
        report.left.append(("rope", path, name, "its forward uses apply_rotary_pos_emb "
                            "other than as a call, or is wrapped by a decorator kernelize "
                            "cannot copy"))
        return
    inner.__globals__[_ROPE] = apply_rotary_pos_emb
    _set_forward(module, copy)
    report.replaced.append(("rope", path, name, "forward with fastattn.apply_rotary_pos_emb"))


# ------------------------------------------------------------------ attention

@functools.lru_cache(maxsize=None)
def _attention_keywords(cls: type) -> frozenset[str] | None:
    """The keywords the forward of ``cls`` passes to transformers' attention interface,
    or None if it does not call the interface (``ALL_ATTENTION_FUNCTIONS``)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    if code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names:
        return None
    tree = ast.parse(_code(cls.forward) or "")
    return frozenset(k.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and ast.unparse(node.func) == "attention_interface"
                     for k in node.keywords)


def _kernelize_attention(path: str, module: nn.Module, keywords: frozenset[str], enabled: bool,
                         report: KernelizeReport) -> None:
    name = type(module).__name__
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if not enabled:
        report.left.append(("attention", path, name, "attention=False"))
    elif "position_bias" in keywords:
        report.left.append(("attention", path, name, "passes a position_bias (relative "
                            "attention bias): fastattn hands these calls to SDPA"))
    elif implementation != fastattn_hf.NAME:
        report.left.append(("attention", path, name, f"its config's attention "
                            f"implementation is {implementation!r}"))
    else:
        report.replaced.append(("attention", path, name, "attn_implementation='fastattn'"))


# ------------------------------------------------------------------ loss

_SOFTCAP = ("if self.config.final_logit_softcapping is not None:\n"
            "    logits = logits / self.config.final_logit_softcapping\n"
            "    logits = torch.tanh(logits)\n"
            "    logits = logits * self.config.final_logit_softcapping")


def _hands_logits_to_loss(stmt: ast.stmt) -> bool:
    """``if labels is not None: loss = self.loss_function(logits, labels, ...)``."""
    if not (isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "labels is not None"
            and len(stmt.body) == 1 and not stmt.orelse):
        return False
    call = getattr(stmt.body[0], "value", None)
    if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "self.loss_function"):
        return False
    given = [ast.unparse(a) for a in call.args[:2]]
    given += [f"{k.arg}={ast.unparse(k.value)}" for k in call.keywords if k.arg in
              ("logits", "labels")]
    return sorted(given) in (["labels", "logits"], ["labels=labels", "logits=logits"])


def _logit_flow(model: nn.Module) -> tuple[bool, bool] | None:
    """(served, softcapped): whether model's forward computes ``logits =
    self.lm_head(...)`` and hands them to ``self.loss_function`` with nothing in between
    but ``loss = None`` and, optionally, Gemma's final-logit softcap. None if not."""
    code = _code(type(model).forward)
    if code is None:
        return None
    body = ast.parse(code).body
    start = next((i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                  and ast.unparse(s.targets) == "logits"
                  and ast.unparse(s.value).startswith("self.lm_head(")), None)
    if start is None or not isinstance(body[-1], ast.Return):
        return None
    softcapped, handed = False, False
    for stmt in body[start + 1:-1]:
        if ast.unparse(stmt) == _SOFTCAP and not handed:
            softcapped = True
        elif ast.unparse(stmt) == "loss = None":
            continue
        elif _hands_logits_to_loss(stmt) and not handed:
            handed = True
        else:
            return None
    return (True, softcapped) if handed else None


class _FusedLoss:
    """A kernelized causal LM's loss state. While ``active`` (one forward with labels and
    logits skipped), its LM head keeps its input and returns an empty placeholder, and
    its loss function computes the loss from that input; otherwise both run as before.
    Kept on the LM head (``_fastattn_loss``), so a deep copy carries its own."""

    def __init__(self, softcap: float) -> None:
        self.softcap, self.active = softcap, False
        self.hidden: Tensor | None = None


def _head_forward(self: nn.Linear, hidden: Tensor) -> Tensor:
    state = self._fastattn_loss
    if not state.active:
        return nn.Linear.forward(self, hidden)
    state.hidden = hidden                                            # (B, T, C)
    return hidden.new_empty(*hidden.shape[:-1], 0)


def _loss_function(self: nn.Module, logits: Tensor, labels: Tensor,
                   vocab_size: int | None = None,
                   num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: Tensor | None = None, **kwargs) -> Tensor:
    """``ForCausalLMLoss`` (labels shifted left by one; mean over the targets that are not
    ``ignore_index``, or sum / ``num_items_in_batch``); fused while the state is active."""
    head = self.lm_head
    state = head._fastattn_loss
    if not state.active:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                               shift_labels, **kwargs)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = state.hidden.reshape(-1, state.hidden.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, head.weight, target, linear_bias=head.bias,
                                reduction=reduction, ignore_index=ignore_index,
                                softcap=state.softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_forward(plain: Callable, labels_at: int | None) -> Callable:
    """The causal LM's forward, taking ``skip_logits`` (see the module docstring)."""
    @functools.wraps(plain)
    def forward(self, *args, skip_logits: bool | None = None, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        skip = (self.training and labels is not None) if skip_logits is None else skip_logits
        if not skip:
            return plain(self, *args, **kwargs)
        if labels is None:
            raise ValueError("skip_logits=True needs labels: without them there is no loss "
                             "to compute and the logits were skipped")
        state = self.lm_head._fastattn_loss
        state.active = True
        try:
            out = plain(self, *args, **kwargs)
        finally:
            state.active, state.hidden = False, None
        if isinstance(out, tuple):              # return_dict=False: (loss, logits, ...)
            return out[:1] + out[2:]
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return forward


def _kernelize_loss(model: nn.Module, report: KernelizeReport) -> None:
    name = type(model).__name__
    flow = _logit_flow(model) if hasattr(model, "lm_head") else None
    loss_type = getattr(model, "loss_type", None)
    why = None
    if not hasattr(model, "lm_head"):
        why = "no lm_head (the fused loss serves language-model heads)"
    elif flow is None:
        why = ("its forward does not hand self.lm_head's logits straight to "
               "self.loss_function")
    elif type(model.lm_head) is not nn.Linear:
        why = f"its lm_head is a {type(model.lm_head).__name__}, not a plain nn.Linear"
    elif LOSS_MAPPING.get(loss_type, ForCausalLMLoss) is not ForCausalLMLoss:
        why = f"its loss is not transformers' ForCausalLMLoss (loss_type {loss_type!r})"
    elif _patched(model) != "fastattn" and ("_loss_function" in vars(model)
                                            or _patched(model.lm_head) is not None):
        why = "the instance already has its own loss_function or lm_head forward"
    if why is not None:
        report.left.append(("loss", "", name, why))
        return
    if not _claim("loss", "", model, report):
        return
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0) \
        if flow[1] else 0.0
    plain = type(model).forward
    parameters = list(inspect.signature(plain).parameters)
    labels_at = parameters.index("labels") - 1 if "labels" in parameters else None  # no self
    model.lm_head._fastattn_loss = _FusedLoss(softcap)
    _set_forward(model.lm_head, _head_forward)
    model.loss_function = types.MethodType(_loss_function, model)
    _set_forward(model, _fused_forward(plain, labels_at))
    report.replaced.append(("loss", "", name, "fastattn.linear_cross_entropy when logits are "
                            "skipped (skip_logits; default: training with labels)"))


# ------------------------------------------------------------------ the one call

def kernelize(model: nn.Module, *, attention: bool = True, norms: bool = True,
              activations: bool = True, mlp: bool = True, rope: bool = True,
              loss: bool = True) -> KernelizeReport:
    """Put fastattn into a transformers model, in place, instance by instance (module
    docstring). Each keyword turns one kind off. Weights are not touched. Kernelizing
    twice changes nothing more. Returns a ``KernelizeReport``.

    The attention implementation is set on the model's config (and its sub-configs):
    a second model built on the very same config object sees it too.
    """
    report = KernelizeReport()
    if attention:
        fastattn_hf.register()
        if getattr(model.config, "_attn_implementation", None) != fastattn_hf.NAME:
            model.set_attn_implementation(fastattn_hf.NAME)
    fused_acts: set[int] = set()
    for path, module in model.named_modules():
        keywords = _attention_keywords(type(module))
        if keywords is not None:
            _kernelize_attention(path, module, keywords, attention, report)
        if "apply_rotary_pos_emb" in _global_names(module):
            if rope:
                _kernelize_rope(path, module, report)
            else:
                report.left.append(("rope", path, type(module).__name__, "rope=False"))
        if "Norm" in type(module).__name__:
            if norms:
                _kernelize_norm(path, module, report)
            else:
                report.left.append(("norms", path, type(module).__name__, "norms=False"))
        if mlp and _kernelize_mlp(path, module, report):
            fused_acts.add(id(module.act_fn))
        if _is_activation(module) and id(module) not in fused_acts:
            if activations:
                _kernelize_activation(path, module, report)
            else:
                report.left.append(("activations", path, type(module).__name__,
                                    "activations=False"))
    if loss:
        _kernelize_loss(model, report)
    return report


def _load(load: Callable, kinds: dict, kwargs: dict) -> nn.Module:
    if kinds["attention"]:
        fastattn_hf.register()
        kwargs.setdefault("attn_implementation", fastattn_hf.NAME)
    model = load(**kwargs)
    model.fastattn_report = kernelize(model, **kinds)
    return model


def from_config(config, model_class=None, *, attention: bool = True, norms: bool = True,
                activations: bool = True, mlp: bool = True, rope: bool = True,
                loss: bool = True, **kwargs) -> nn.Module:
    """Build a model from ``config`` (``model_class``: an ``AutoModel*`` class, default
    ``AutoModelForCausalLM``, or a model class) and kernelize it; the report is
    ``model.fastattn_report``. ``kwargs`` go to the constructor (e.g. ``dtype``)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    build = getattr(model_class, "from_config", None) or model_class._from_config
    kinds = dict(attention=attention, norms=norms, activations=activations, mlp=mlp,
                 rope=rope, loss=loss)
    return _load(functools.partial(build, config), kinds, kwargs)


def from_pretrained(name_or_path, model_class=None, *, attention: bool = True,
                    norms: bool = True, activations: bool = True, mlp: bool = True,
                    rope: bool = True, loss: bool = True, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(name_or_path, **kwargs)`` (default
    ``AutoModelForCausalLM``), kernelized; the report is ``model.fastattn_report``."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kinds = dict(attention=attention, norms=norms, activations=activations, mlp=mlp,
                 rope=rope, loss=loss)
    return _load(functools.partial(model_class.from_pretrained, name_or_path), kinds, kwargs)
