"""``fastattn::swiglu_fwd`` / ``_bwd``: gated activations (SwiGLU, GEGLU) and their API.

* ``swiglu(a, b)`` is ``silu(a) · b`` in one pass, forward and backward: the Llama MLP's
  ``act_fn(gate_proj(x)) * up_proj(x)``. ``swiglu(x)`` with one (…, 2N) tensor splits its
  last dim in halves, gate first (a fused ``gate_up_proj``, as Phi-3 has); its gradient
  is written in one piece, without a concatenation.
* ``geglu(a, b, approximate)`` is the same with ``gelu`` (exact or tanh).
* ``silu(input, inplace)`` has ``F.silu``'s signature (what ``enable()`` routes to the
  family: transformers' ``SiLUActivation`` calls ``F.silu``).

Each validates its inputs (a few cheap tests for the everyday call, ``validate`` for
anything else), picks a backend (``triton`` on CUDA, ``torch`` on CPU, or the one forced
by ``use_backend``) and calls the forward op, whose autograd formula calls the backward
op. In plain eager mode the op's function runs directly (``fastattn.ops._custom_op``).

Op semantics (the same for every backend), ``act`` one of ``silu``, ``gelu``,
``gelu_tanh``:

* ``swiglu_fwd(a, b?, activation, packed, save_act, backend) -> (y, act)``: with b, a and
  b (..., N) of one shape and dtype, ``y = act(a) · b``; without b and ``packed``, a is
  (..., 2N) and ``y = act(a[..., :N]) · a[..., N:]``; without b and not packed,
  ``y = act(a)``. y is contiguous, in a's dtype. ``act`` is act(a) (y's shape) when the
  torch backend is asked to keep it for the backward (``save_act``: GELU's, see
  ``_CHUNK``), else an empty (0,) tensor; it gets no gradient.
* ``swiglu_bwd(dy, a, b?, act?, activation, packed, backend) -> (da, db)``: the gradients,
  contiguous, shaped and typed as a and b (packed: da (..., 2N) holds both halves); db
  is an empty (0,) tensor without b. act(a) is recomputed where ``act`` is absent.

The torch backend runs eager ``F.silu``/``F.gelu`` and their ``aten`` backward ops; the
Triton kernels take (M, N) rows with a unit-stride last dim, which the op forms (views
when the strides allow it). Dtypes: float16, bfloat16, float32; any number of elements.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends
from fastattn import reference
from fastattn._warnings import warn_fallback
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op

OP = "swiglu"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}     # F.gelu's name -> activation


def _triton_kernels():
    from fastattn.kernels import swiglu  # imports triton: only when used
    return swiglu


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with a unit-stride last dim (a 0-dim tensor is one 1-wide row);
    a view when the strides allow it."""
    n = t.shape[-1] if t.dim() > 0 else 1
    rows = t.reshape(math.prod(t.shape[:-1]), n)      # not -1: N may be 0
    return rows if rows.shape[-1] == 1 or rows.stride(-1) == 1 else rows.contiguous()


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def _out_shape(a: Tensor, packed: bool) -> tuple[int, ...]:
    return (*a.shape[:-1], a.shape[-1] // 2) if packed else tuple(a.shape)


# ------------------------------------------------------------------ the torch backend
# Eager torch makes several passes over whole tensors (act, product; in the backward
# three more, through a temporary). This backend runs the same aten ops over chunks of
# 2**19 elements (2 MB of fp32) per tensor, so a chunk's passes after the first find it
# in the cache, and its backward writes straight into da and db (act(a) and dy·b go
# into the chunk of da that is overwritten last), allocating nothing else. What the
# backward needs of act(a) depends on its price: SiLU's is an exp per element, cheaper
# than storing and reading act(a) again, so it is computed again per chunk and only a
# and b are kept; GELU's erf or tanh costs more than that traffic, so act(a) is kept,
# as eager autograd does (``save_act``). On the 2-core development CPU (fp32, M = 4096,
# N = 768-4096, fwd+bwd, side by side with eager autograd) SwiGLU ran 1.10-1.31x eager
# this way and 0.83-0.90x keeping act(a); GEGLU 0.97-1.06x keeping it and 0.80-0.90x
# computing it again. The values are eager's up to the last ulp (a chunk boundary
# moves which elements torch's vector loop takes).
_CHUNK = 1 << 19


def _2d(t: Tensor) -> Tensor:
    """(..., N) -> (M, N), a view when the strides allow it (a 0-dim tensor: (1, 1))."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1] if t.dim() else 1)


def _chunks(m: int, n: int) -> list[slice]:
    rows = max(1, _CHUNK // max(n, 1))
    return [slice(i, i + rows) for i in range(0, m, rows)]


def _torch_act(a: Tensor, activation: str, out: Tensor) -> Tensor:
    """act(a) into ``out`` (``aten``'s out= variants)."""
    if activation == "silu":
        return torch.ops.aten.silu.out(a, out=out)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu.out(a, approximate=approximate, out=out)


def _torch_act_backward(g: Tensor, a: Tensor, activation: str, out: Tensor) -> None:
    """out ← g · act'(a) (``aten``'s backward ops, writing into ``out``, which may be g)."""
    if activation == "silu":
        torch.ops.aten.silu_backward.grad_input(g, a, grad_input=out)
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        torch.ops.aten.gelu_backward.grad_input(g, a, approximate=approximate, grad_input=out)


def _torch_fwd(a: Tensor, b: Optional[Tensor], activation: str, packed: bool,
               save_act: bool) -> tuple[Tensor, Tensor]:
    a2, b2 = _2d(a), None if b is None else _2d(b)
    if packed:
        a2, b2 = _halves(a2)
    save_act = save_act and b2 is not None      # act(a) alone: the backward reads only a
    y = a.new_empty(a2.shape)
    act = a.new_empty(a2.shape) if save_act else a.new_empty(0)
    for rows in _chunks(*a2.shape):
        h = _torch_act(a2[rows], activation, out=(act if save_act else y)[rows])
        if save_act:
            torch.mul(h, b2[rows], out=y[rows])
        elif b2 is not None:
            h.mul_(b2[rows])
    shape = _out_shape(a, packed)
    return y.view(shape), (act.view(shape) if save_act else act)


def _torch_bwd(dy: Tensor, a: Tensor, b: Optional[Tensor], act: Optional[Tensor],
               activation: str, packed: bool) -> tuple[Tensor, Tensor]:
    a2, dy2 = _2d(a), _2d(dy)
    da = torch.empty(a2.shape, dtype=a.dtype, device=a.device)
    if packed:
        (a2, b2), (da_a, db) = _halves(a2), _halves(da)
    else:
        b2, da_a = None if b is None else _2d(b), da
        db = None if b is None else torch.empty(b2.shape, dtype=b.dtype, device=b.device)
    act2 = None if act is None or act.numel() == 0 else _2d(act)
    for rows in _chunks(*a2.shape):
        g, x, out = dy2[rows], a2[rows], da_a[rows]
        if b2 is not None:
            h = _torch_act(x, activation, out=out) if act2 is None else act2[rows]
            torch.mul(g, h, out=db[rows])                   # db = dy · act(a)
            g = torch.mul(g, b2[rows], out=out)             # then da = (dy · b) · act'(a)
        _torch_act_backward(g, x, activation, out)
    if packed or b is None:
        return da.view(a.shape), a.new_empty(0)
    return da.view(a.shape), db.view(b.shape)


# ------------------------------------------------------------------ the custom ops


@kernel_op("fastattn::swiglu_fwd")
def _fwd(a: Tensor, b: Optional[Tensor], activation: str, packed: bool, save_act: bool,
         backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return _torch_fwd(a, b, activation, packed, save_act)
    kernels = _triton_kernels()
    if packed:
        gate, up = _halves(_rows(a))
        y = kernels.swiglu_fwd(gate, up, activation)
    else:
        y = kernels.swiglu_fwd(_rows(a), None if b is None else _rows(b), activation)
    return y.view(_out_shape(a, packed)), a.new_empty(0)     # the backward recomputes act


@_fwd.register_fake
def _(a, b, activation, packed, save_act, backend):
    shape = _out_shape(a, packed)
    save = save_act and backend == "torch" and (b is not None or packed)
    return a.new_empty(shape), (a.new_empty(shape) if save else a.new_empty(0))


@kernel_op("fastattn::swiglu_bwd")
def _bwd(dy: Tensor, a: Tensor, b: Optional[Tensor], act: Optional[Tensor], activation: str,
         packed: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return _torch_bwd(dy, a, b, act, activation, packed)
    kernels = _triton_kernels()
    if packed:
        return kernels.swiglu_packed_bwd(_rows(dy), _rows(a), activation).view(a.shape), \
            a.new_empty(0)
    da, db = kernels.swiglu_bwd(_rows(dy), _rows(a), None if b is None else _rows(b),
                                activation)
    return da.view(a.shape), (a.new_empty(0) if db is None else db.view(b.shape))


@_bwd.register_fake
def _(dy, a, b, act, activation, packed, backend):
    return a.new_empty(a.shape), (a.new_empty(0) if b is None else b.new_empty(b.shape))


def _setup_context(ctx, inputs, output):
    a, b, activation, packed, save_act, backend = inputs
    # act gets no gradient; unmaterialised, autograd does not fill a zero tensor for it.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(a, b, output[1] if output[1].numel() else None)
    ctx.activation, ctx.packed, ctx.backend = activation, packed, backend


def _backward(ctx, dy, _dact):
    if dy is None:
        return None, None, None, None, None, None
    a, b, act = ctx.saved_tensors
    da, db = _bwd(dy, a, b, act, ctx.activation, ctx.packed, ctx.backend)
    need = ctx.needs_input_grad
    return da if need[0] else None, db if need[1] else None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ validation and API


def validate(a: Tensor, b: Optional[Tensor], packed: bool, name_a: str = "a") -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    if not isinstance(a, Tensor):
        raise TypeError(f"{name_a} must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in DTYPES:
        raise TypeError(f"{name_a} dtype must be float16, bfloat16 or float32, got {a.dtype}")
    if packed:
        if a.dim() == 0 or a.shape[-1] % 2 != 0:
            raise ValueError(f"{name_a} must have an even last dim to split into (gate, up) "
                             f"halves when b is None, got shape {tuple(a.shape)}")
        return
    if b is None:
        return
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a torch.Tensor or None, got {type(b).__name__}")
    if b.shape != a.shape:
        raise ValueError(f"b shape must equal a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b dtype must equal a's dtype {a.dtype}, got {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"b must be on a's device {a.device}, got {b.device}")


def _gated(a: Tensor, b: Optional[Tensor], activation: str) -> Tensor:
    packed = b is None
    plain = (isinstance(a, Tensor) and a.dtype in DTYPES and
             (a.dim() > 0 and a.shape[-1] % 2 == 0 if packed else
              isinstance(b, Tensor) and b.shape == a.shape and b.dtype is a.dtype
              and b.device == a.device))
    if not plain:
        validate(a, b, packed)
    backend = backends.resolve(OP, a.device, BACKENDS)
    # The torch backend keeps GELU's act(a) for the backward (see _CHUNK).
    save_act = (backend == "torch" and activation != "silu" and torch.is_grad_enabled()
                and (a.requires_grad or (b is not None and b.requires_grad)))
    return _fwd(a, b, activation, packed, save_act, backend)[0]


def swiglu(a: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``silu(a) · b`` in one pass (forward and backward), ``silu(a) = a · σ(a)``.

    a, b (..., N): one shape and dtype (float16, bfloat16 or float32), any strides. With
    b None, a is (..., 2N) and splits into gate ``a[..., :N]`` and up ``a[..., N:]``.
    Returns a contiguous (..., N) tensor in a's dtype; gradients flow to a and b.
    """
    return _gated(a, b, "silu")


def geglu(a: Tensor, b: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(a) · b`` in one pass, ``approximate`` ``"none"`` (erf) or ``"tanh"``; shapes,
    dtypes and the one-tensor form as ``swiglu``."""
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated(a, b, APPROXIMATE[approximate])


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.silu`` on fastattn's kernels: ``input · σ(input)``, any shape and strides,
    float16, bfloat16 or float32; returns a contiguous tensor of input's shape and dtype.
    ``inplace=True`` is handed to ``F.silu`` (with a one-time ``FallbackWarning``)."""
    if inplace:
        warn_fallback("fastattn.silu", "inplace=True")
        return F.silu(input, inplace=True)
    if not (isinstance(input, Tensor) and input.dtype in DTYPES):
        validate(input, None, False, "input")
    backend = backends.resolve(OP, input.device, BACKENDS)
    return _fwd(input, None, "silu", False, False, backend)[0]


# ------------------------------------------------------------------ registry entries


def _model_shape(batch: int, seq: int, d_model: int, n_head: int, n_kv_head: int,
                 mlp: int) -> dict:
    return {"M": batch * seq, "N": mlp}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device).manual_seed(seed)
    rows = (shape["M"], shape["N"])
    a = registry.randn(rows, dtype, device, g, 2.0, grad=True)   # gate: both σ tails
    b = registry.randn(rows, dtype, device, g, grad=True)
    return (a, b), registry.randn(rows, dtype, device, g)


def _launch_kernels(width: int, dtype: torch.dtype, approximate: str = "") -> None:
    kernels = _triton_kernels()
    activation = APPROXIMATE.get(approximate, "silu")
    x = torch.empty(4096, 2 * width, dtype=dtype)
    a, b = x[:, :width], x[:, width:]
    kernels.swiglu_fwd(a, b, activation)
    kernels.swiglu_bwd(torch.empty(4096, width, dtype=dtype), a, b, activation)


_COMMON = dict(
    family=OP, backends=BACKENDS, dtypes=DTYPES,
    custom_ops=("fastattn::swiglu_fwd", "fastattn::swiglu_bwd"),
    x="N", sizes=registry.ROWWISE_SIZES, shape=registry.rowwise_shape,
    model_shape=_model_shape, inputs=_inputs,
    work=registry.rowwise_bytes(3, 5),       # a, b → y; dy, a, b → da, db
    unit="bytes", launch_sizes=registry.ROWWISE_LAUNCH_SIZES)

registry.register(registry.OpSpec(
    name="swiglu", summary="silu(a) · b over (M, N): the Llama MLP's gate, one pass",
    fast=lambda a, b: swiglu(a, b),
    naive=lambda a, b: reference.swiglu(a, b),
    builtin=("F.silu(a)*b", lambda a, b: F.silu(a) * b),
    reference=lambda a, b: reference.swiglu(a, b),
    launch_kernels=_launch_kernels, **_COMMON))

registry.register(registry.OpSpec(
    name="geglu", summary="gelu(a) · b over (M, N), tanh GELU, one pass",
    fast=lambda a, b, approximate: geglu(a, b, approximate),
    naive=lambda a, b, approximate: reference.geglu(a, b, approximate),
    builtin=("F.gelu(a)*b", lambda a, b, approximate: F.gelu(a, approximate=approximate) * b),
    reference=lambda a, b, approximate: reference.geglu(a, b, approximate),
    options={"approximate": "tanh"}, launch_kernels=_launch_kernels, **_COMMON))

registry.replaces_function(OP, F.silu, silu)      # F.silu is a Python function
