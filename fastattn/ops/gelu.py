"""``fastattn::gelu_fwd`` / ``_bwd``: GELU with an optional fused bias, and its API.

``gelu(input, approximate)`` has ``F.gelu``'s signature; ``bias_gelu(input, bias,
approximate)`` is ``gelu(input + bias)`` in one pass (the MLP's ``Linear`` bias fused into
its activation). Both validate their inputs (a few cheap tests for the everyday call,
``validate`` for anything else), pick a backend (``triton`` on CUDA, ``torch`` on CPU, or
the one forced by ``use_backend``) and call the forward op, whose registered autograd
formula calls the backward op. In plain eager mode the op's function runs directly
(``fastattn.ops._custom_op``).

Op semantics (the same for every backend):

* ``gelu_fwd(x, bias?, approximate, backend) -> y``: x (..., N) any strides, bias (N,);
  ``y = gelu(x + bias)``, contiguous, in x's dtype; ``approximate`` ``"none"`` (erf) or
  ``"tanh"``.
* ``gelu_bwd(dy, x, bias?, approximate, backend) -> (dx, dbias)``:
  ``dx = dy · gelu'(x + bias)`` (x's shape, contiguous) in x's dtype; ``dbias = Σ_rows dx``
  (N,) in bias's dtype, an empty (0,) tensor without bias.

The torch backend works on x as it comes; the Triton and C++ kernels
(``torch.ops.fastattn_ext.gelu_*``) take x as (M, N) rows with a unit-stride last dim,
which the op forms (a view when the strides allow it).

Dtypes: input float16, bfloat16 or float32; bias in input's dtype or float32. Any number
of elements, zero included (GELU is elementwise).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends
from fastattn import reference
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op
from fastattn.ops._validation import check_param, plain_param

OP = "gelu"
BACKENDS = ("triton", "ext", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
APPROXIMATE = ("none", "tanh")


def _triton_kernels():
    from fastattn.kernels import gelu  # imports triton: only when used
    return gelu


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _dense(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with a unit-stride last dim, as the Triton and C++ kernels take
    it (a 0-dim tensor is one 1-wide row); a view when the strides allow it."""
    n = t.shape[-1] if t.dim() > 0 else 1
    rows = t.reshape(math.prod(t.shape[:-1]), n)      # not -1: N may be 0
    return rows if rows.shape[-1] == 1 or rows.stride(-1) == 1 else rows.contiguous()


@kernel_op("fastattn::gelu_fwd")
def _fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    if backend == "torch":
        # A contiguous x gives a contiguous y, computed in the same order (bitwise the
        # same values) whatever x's layout.
        x = _dense(x)
        y = F.gelu(x if bias is None else x + bias, approximate=approximate)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if backend == "triton":
        y = _triton_kernels().gelu_fwd(_rows(x), _contig(bias), approximate)
    else:
        y = torch.ops.fastattn_ext.gelu_fwd(_rows(x).contiguous(), _contig(bias), approximate)
    return y.view(x.shape)


@_fwd.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@kernel_op("fastattn::gelu_bwd")
def _bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
         backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return _torch_bwd(dy, x, bias, approximate)
    if backend == "triton":
        dx, db = _triton_kernels().gelu_bwd(_rows(dy), _rows(x), _contig(bias), approximate)
        db = x.new_empty(0) if db is None else db
    else:
        dx, db = torch.ops.fastattn_ext.gelu_bwd(_rows(dy).contiguous(), _rows(x).contiguous(),
                                                  _contig(bias), approximate)
    return dx.view(x.shape), db


def _torch_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str
               ) -> tuple[Tensor, Tensor]:
    x, dy = _dense(x), _dense(dy)
    z = x if bias is None else x + bias
    dz = torch.ops.aten.gelu_backward(dy if dy.dtype == z.dtype else dy.to(z.dtype), z,
                                      approximate=approximate)
    dx = dz if dz.dtype == x.dtype else dz.to(x.dtype)
    if bias is None:
        return dx, x.new_empty(0)
    db = dz.reshape(-1, dz.shape[-1]).sum(dim=0, dtype=torch.float32)
    return dx, (db if db.dtype == bias.dtype else db.to(bias.dtype))


@_bwd.register_fake
def _(dy, x, bias, approximate, backend):
    db = x.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), db


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bwd(dy, x, bias, ctx.approximate, ctx.backend)
    need = ctx.needs_input_grad
    return dx if need[0] else None, db if need[1] else None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def validate(input: Tensor, bias: Optional[Tensor], approximate: str) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"input dtype must be float16, bfloat16 or float32, got {input.dtype}")
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is None:
        return
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension for a bias to broadcast "
                         "over its last dim, got a 0-dim tensor")
    check_param("bias", bias, input, (input.shape[-1],), "input's last dim")


def _plain_call(input: Tensor, bias: Optional[Tensor], approximate: str) -> bool:
    """Whether this is the everyday call that ``validate`` would pass, decided with a few
    cheap tests (bias absent or (N,) in input's dtype on its device); anything else goes
    through ``validate``."""
    return (isinstance(input, Tensor) and input.dtype in DTYPES and approximate in APPROXIMATE
            and (bias is None or (input.dim() > 0 and plain_param(bias, input.shape[-1], input))))


def _bias_gelu(input: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    if not _plain_call(input, bias, approximate):
        validate(input, bias, approximate)
    backend = backends.resolve(OP, input.device, BACKENDS)
    return _fwd(input, bias, approximate, backend)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu`` on fastattn's kernels: ``x·Φ(x)`` (``approximate="none"``, via erf) or
    its tanh approximation (``"tanh"``). input: any shape and strides, float16, bfloat16
    or float32. Returns a contiguous tensor of input's shape and dtype."""
    return _bias_gelu(input, None, approximate)


def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(input + bias)`` in one pass; bias (N,) broadcasts over input's last dim N.

    input (..., N): float16, bfloat16 or float32, any strides; bias in input's dtype or
    float32. ``input + bias`` is formed in float32 and not rounded before the GELU (eager
    ``F.gelu(input + bias)`` rounds it to input's dtype first). Returns a contiguous
    tensor of input's shape and dtype; the backward gives input and bias gradients.
    """
    if bias is None:
        raise TypeError("bias must be a torch.Tensor, got None (use gelu() without a bias)")
    return _bias_gelu(input, bias, approximate)


# ------------------------------------------------------------------ registry entry


def _model_shape(batch: int, seq: int, d_model: int, n_head: int, n_kv_head: int,
                 mlp: int) -> dict:
    return {"M": batch * seq, "N": mlp}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device).manual_seed(seed)
    rows = (shape["M"], shape["N"])
    x = registry.randn(rows, dtype, device, g, grad=True)
    b = registry.randn((shape["N"],), dtype, device, g, 0.1, grad=True)
    return (x, b), registry.randn(rows, dtype, device, g)


def _launch_kernels(width: int, dtype: torch.dtype, approximate: str) -> None:
    kernels = _triton_kernels()
    x, b = torch.empty(4096, width, dtype=dtype), torch.empty(width, dtype=dtype)
    kernels.gelu_fwd(x, b, approximate)
    kernels.gelu_bwd(torch.empty_like(x), x, b, approximate)


registry.register(registry.OpSpec(
    name=OP, family=OP, summary="gelu(x + b) over (M, N), the bias add fused",
    backends=BACKENDS, dtypes=DTYPES,
    custom_ops=("fastattn::gelu_fwd", "fastattn::gelu_bwd"),
    x="N", sizes=registry.ROWWISE_SIZES, shape=registry.rowwise_shape,
    model_shape=_model_shape, inputs=_inputs,
    fast=lambda x, b, approximate: bias_gelu(x, b, approximate),
    naive=lambda x, b, approximate: reference.gelu(x, approximate, b),
    builtin=("F.gelu(x+b)", lambda x, b, approximate: F.gelu(x + b, approximate=approximate)),
    reference=lambda x, b, approximate: reference.gelu(x, approximate, b),
    work=registry.rowwise_bytes(2, 3),                     # x → y; dy, x → dx
    unit="bytes", options={"approximate": "none"}, launch_kernels=_launch_kernels,
    launch_sizes=registry.ROWWISE_LAUNCH_SIZES))
registry.replaces_function(OP, torch._C._nn.gelu, gelu)             # F.gelu is this builtin
