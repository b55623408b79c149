"""``fastattn::layer_norm_fwd`` / ``_bwd``: LayerNorm and RMSNorm custom ops and their API.

``layer_norm`` and ``rms_norm`` have ``F.layer_norm`` / ``F.rms_norm``'s signatures plus
a fused residual add (``residual=``, ``return_residual=``). They validate their inputs
once, flatten them to (rows, normalised width), pick a backend (``triton`` on CUDA,
``torch`` on CPU, or the one forced by ``use_backend``) and call the forward op, whose
registered autograd formula calls the backward op. The backend name is an argument of
both ops, so a compiled graph records which one ran.

Op semantics (the same for every backend, and for ``torch.ops.fastattn_ext``):

* ``layer_norm_fwd(x, weight?, bias?, residual?, eps, rms_norm, backend)
  -> (y, residual_out, mean, rstd)``: x (M, N); ``h = x + residual`` (rounded to x's
  dtype), ``y = norm(h) ⊙ weight + bias`` in x's dtype; ``residual_out`` = h, or an empty
  (0,) tensor without residual; ``mean`` (M,) fp32, empty (0,) for RMSNorm; ``rstd`` (M,)
  fp32. RMSNorm also adds a bias when one is given (the public ``rms_norm`` passes none).
* ``layer_norm_bwd(dy, h, weight?, mean, rstd, dresidual_out?, has_bias, rms_norm,
  backend) -> (dx, dweight, dbias)``: dx (M, N) in h's dtype, the LayerNorm gradient plus
  ``dresidual_out`` (so also the residual's gradient); dweight (N,) in weight's dtype;
  dbias (N,) in weight's dtype, or h's without weight; absent ones are empty (0,).

Dtypes: input float16, bfloat16 or float32. weight and bias are either in the input's
dtype or float32 (fp32 master weights with a low-precision activation, as in mixed
precision training); when both are given they share a dtype. The output has the input's
dtype; all statistics are computed in float32. A normalised width of 0 is an error
(there is nothing to average); zero rows give an empty output.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastattn import backends
from fastattn import reference
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op
from fastattn.ops._validation import check_param

OP = "layer_norm"
BACKENDS = ("triton", "ext", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = "float16, bfloat16 or float32"

_Shape = Union[int, Sequence[int], torch.Size]


def _triton_kernels():
    from fastattn.kernels import layer_norm  # imports triton: only when used
    return layer_norm


def _absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The empty (0,) tensor that stands for an absent output (ops cannot return None)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ------------------------------------------------------------------------------- ops


@kernel_op("fastattn::layer_norm_fwd")
def _fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
         residual: Optional[Tensor], eps: float, rms_norm: bool,
         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        y, h, mean, rstd = _triton_kernels().layer_norm_fwd(x, weight, bias, residual, eps,
                                                             rms_norm)
        return (y, _absent(x) if h is None else h,
                _absent(rstd) if mean is None else mean, rstd)
    if backend == "ext":
        y, h, mean, rstd = torch.ops.fastattn_ext.layer_norm_fwd(
            x.contiguous(), _contig(weight), _contig(bias), _contig(residual), eps, rms_norm)
        return y, h, mean, rstd
    return _torch_fwd(x, weight, bias, residual, eps, rms_norm)


@_fwd.register_fake
def _(x, weight, bias, residual, eps, rms_norm, backend):
    m, n = x.shape
    h = x.new_empty(m, n) if residual is not None else _absent(x)
    mean = x.new_empty(0 if rms_norm else m, dtype=torch.float32)
    return x.new_empty(m, n), h, mean, x.new_empty(m, dtype=torch.float32)


@kernel_op("fastattn::layer_norm_bwd")
def _bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
         dresidual_out: Optional[Tensor], has_bias: bool, rms_norm: bool,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        dx, dw, db = _triton_kernels().layer_norm_bwd(
            dy, h, weight, None if rms_norm else mean, rstd, dresidual_out, has_bias, rms_norm)
        return (dx, _absent(h) if dw is None else dw,
                _absent(h, _dbias_dtype(h, weight)) if db is None else db)
    if backend == "ext":
        dx, dw, db = torch.ops.fastattn_ext.layer_norm_bwd(
            dy.contiguous(), h.contiguous(), _contig(weight), mean, rstd,
            _contig(dresidual_out), has_bias, rms_norm)
        return dx, dw, db
    return _torch_bwd(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm)


@_bwd.register_fake
def _(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm, backend):
    m, n = h.shape
    dw = h.new_empty(n, dtype=weight.dtype) if weight is not None else _absent(h)
    db_dtype = _dbias_dtype(h, weight)
    db = h.new_empty(n, dtype=db_dtype) if has_bias else _absent(h, db_dtype)
    return h.new_empty(m, n), dw, db


def _dbias_dtype(h: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return h.dtype if weight is None else weight.dtype


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms_norm, backend = inputs
    _, h, mean, rstd = output
    need = ctx.needs_input_grad
    # dbias alone needs only dy; h, mean and rstd serve every other gradient, and the
    # weight serves dx, dresidual and dweight.
    if any(need[:4]):
        keep_weight = need[0] or need[1] or need[3]
        ctx.save_for_backward(x if residual is None else h, weight if keep_weight else None,
                              mean, rstd)
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.rms_norm, ctx.backend = rms_norm, backend
    ctx.set_materialize_grads(False)  # an unused residual_out brings no zero tensor


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    # mean and rstd are saved statistics: they carry no gradient.
    h, weight, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(h) if dy is None else _unit_last_stride(dy)
    if dresidual_out is not None:
        dresidual_out = _unit_last_stride(dresidual_out) if ctx.has_residual else None
    dx, dw, db = _bwd(dy, h, weight, mean, rstd, dresidual_out, ctx.has_bias, ctx.rms_norm,
                      ctx.backend)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw if need[1] else None,
            db.to(ctx.bias_dtype) if need[2] else None, dx if need[3] else None,
            None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------- eager (torch) backend


def _native_params(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """(h, weight, bias) for ``native_layer_norm`` so that it keeps fp32 statistics, or
    None when it cannot: the caller then runs it on an fp32 copy of h.

    On CPU, a low-precision input keeps fp16/bf16 statistics unless the parameters are
    fp32 (its mixed-precision kernel), so the parameters go up to fp32 (exact); without
    parameters there is nothing to promote. On CUDA the statistics are always fp32, but
    the parameters must have the input's dtype.
    """
    if h.dtype == torch.float32:
        return h, weight, bias
    params = [t for t in (weight, bias) if t is not None]
    if h.device.type == "cpu":
        if not params:
            return None
        return (h, None if weight is None else weight.float(),
                None if bias is None else bias.float())
    if all(t.dtype == h.dtype for t in params):
        return h, weight, bias
    return None


def _torch_fwd(x, weight, bias, residual, eps, rms_norm):
    m, n = x.shape
    h = x if residual is None else x + residual
    if rms_norm:
        hf = h.float()
        rstd = torch.rsqrt(hf.square().mean(dim=1) + eps)
        y = hf * rstd[:, None]
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        mean = _absent(rstd)
    else:
        native = _native_params(h, weight, bias)
        hn, wn, bn = (h.float(), _f32(weight), _f32(bias)) if native is None else native
        y, mean, rstd = torch.native_layer_norm(hn, [n], wn, bn, eps)
        mean, rstd = mean.view(m).float(), rstd.view(m).float()
    return y.to(x.dtype), (_absent(x) if residual is None else h), mean, rstd


def _torch_bwd(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm):
    m, n = h.shape
    if rms_norm:
        dyf = dy.float()
        xhat = h.float() * rstd[:, None]
        g = dyf if weight is None else dyf * weight.float()
        dx = rstd[:, None] * (g - xhat * (g * xhat).mean(dim=1, keepdim=True))
        dw = None if weight is None else (dyf * xhat).sum(dim=0)
    else:
        native = _native_params(h, weight, None)
        if native is None:
            dyn, hn, wn = dy.float(), h.float(), _f32(weight)
        else:
            dyn, (hn, wn, _) = dy, native
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dyn, hn, [n], mean.view(m, 1), rstd.view(m, 1), wn, None,
            [True, weight is not None, False])
    if dresidual_out is not None:
        dx = dx + dresidual_out
    dx = dx.to(h.dtype)
    dw = _absent(h) if weight is None else dw.to(weight.dtype)
    db_dtype = _dbias_dtype(h, weight)
    db = dy.sum(dim=0, dtype=torch.float32).to(db_dtype) if has_bias else _absent(h, db_dtype)
    return dx, dw, db


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


# ------------------------------------------------------------------ validation and API


def _normalized_shape(normalized_shape: _Shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        shape = tuple(int(d) for d in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    if not shape:
        raise ValueError("normalized_shape must name at least one dimension, got ()")
    return shape


def validate(input: Tensor, normalized_shape: tuple[int, ...], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, residual: Optional[Tensor]) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"input dtype must be {_DTYPE_NAMES}, got {input.dtype}")
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must equal the last {k} "
                         f"dim(s) of input, whose shape is {tuple(input.shape)}")
    if math.prod(normalized_shape) == 0:
        raise ValueError(f"normalized_shape {normalized_shape} has no elements: there is "
                         "nothing to normalise over (every normalised dim must be >= 1)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_param(name, t, input, normalized_shape, "normalized_shape")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight and bias must share one dtype, got weight {weight.dtype}, "
                        f"bias {bias.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"residual shape must equal input shape {tuple(input.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual dtype must equal input dtype {input.dtype}, "
                            f"got {residual.dtype}")
        if residual.device != input.device:
            raise ValueError(f"residual must be on input's device {input.device}, "
                             f"got {residual.device}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _unit_last_stride(t: Tensor) -> Tensor:
    """t itself if its last dim is unit-strided (rows may have any stride), else a copy."""
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def _as_rows(t: Tensor, n: int) -> Tensor:
    """(..., normalised dims) -> (M, n); a view when the strides allow it."""
    return _unit_last_stride(t.reshape(t.numel() // n, n))


def _norm(input, normalized_shape, weight, bias, eps, residual, return_residual, rms_norm):
    shape = _normalized_shape(normalized_shape)
    validate(input, shape, weight, bias, eps, residual)
    n = math.prod(shape)
    x = _as_rows(input, n)
    r = None if residual is None else _as_rows(residual, n)
    w = None if weight is None else weight.reshape(n).contiguous()
    b = None if bias is None else bias.reshape(n).contiguous()
    backend = backends.resolve("rms_norm" if rms_norm else OP, input.device, BACKENDS)
    y, h, _, _ = _fwd(x, w, b, r, float(eps), rms_norm, backend)
    y = y.view(input.shape)
    if not return_residual:
        return y
    return y, (input if residual is None else h.view(input.shape))


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None, return_residual: bool = False
               ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``F.layer_norm`` on fastattn's kernels, with an optional fused residual add.

    Args:
        input: (..., *normalized_shape); float16, bfloat16 or float32; any strides.
        normalized_shape: the trailing dims to normalise over (int or tuple); they are
            flattened into one width N >= 1.
        weight, bias: normalized_shape-shaped, input's dtype or float32 (both the same).
        eps: added to the variance, >= 0.
        residual: input-shaped, input's dtype. If given, normalises ``h = input + residual``
            (h rounded to input's dtype, as eager ``input + residual`` is).
        return_residual: also return h (``input`` itself when there is no residual): the
            pre-norm transformer's residual stream, summed and normalised in one pass.

    Returns y with input's shape and dtype (contiguous), or ``(y, h)``.
    """
    return _norm(input, normalized_shape, weight, bias, eps, residual, return_residual, False)


def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, residual: Optional[Tensor] = None,
             return_residual: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``F.rms_norm`` on fastattn's kernels: ``h / sqrt(mean(h²) + eps) ⊙ weight``.

    Same arguments as ``layer_norm`` without bias; ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as in torch.
    """
    if eps is None and isinstance(input, Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(input.dtype).eps
    return _norm(input, normalized_shape, weight, None, eps, residual, return_residual, True)


# ----------------------------------------------------------------- registry entries


def _model_shape(batch: int, seq: int, d_model: int, n_head: int, n_kv_head: int,
                 mlp: int) -> dict:
    return {"M": batch * seq, "N": d_model}


def _params(shape: dict, dtype: torch.dtype, device: torch.device, g: torch.Generator,
            bias: bool = True) -> tuple[Tensor, ...]:
    w = (1 + registry.randn((shape["N"],), dtype, device, g, 0.1)).requires_grad_()
    if not bias:
        return (w,)
    return w, registry.randn((shape["N"],), dtype, device, g, 0.1, grad=True)


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int,
            residual: bool = False, bias: bool = True):
    g = torch.Generator(device).manual_seed(seed)
    rows = (shape["M"], shape["N"])
    x = registry.randn(rows, dtype, device, g, grad=True)
    params = _params(shape, dtype, device, g, bias)
    r = (registry.randn(rows, dtype, device, g, grad=True),) if residual else ()
    return (x, *r, *params), registry.randn(rows, dtype, device, g)


def _fused_residual(x: Tensor, r: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return layer_norm(x, x.shape[-1:], w, b, residual=r, return_residual=True)[0]


def _launch_kernels(width: int, dtype: torch.dtype) -> None:
    """The heaviest variant: weight, bias and the fused residual add (the GPT's ln2)."""
    ln = _triton_kernels()
    x = torch.empty(4096, width, dtype=dtype)
    w, b = torch.empty(width, dtype=dtype), torch.empty(width, dtype=dtype)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, b, torch.empty_like(x), 1e-5, False)
    ln.layer_norm_bwd(torch.empty_like(y), h, w, mean, rstd, torch.empty_like(x), True, False)


_ROWWISE = dict(backends=BACKENDS, dtypes=DTYPES, x="N", sizes=registry.ROWWISE_SIZES,
                shape=registry.rowwise_shape, model_shape=_model_shape, unit="bytes",
                custom_ops=("fastattn::layer_norm_fwd", "fastattn::layer_norm_bwd"))
registry.register(registry.OpSpec(
    name=OP, family=OP, summary="LayerNorm over the last dim of (M, N)", **_ROWWISE,
    inputs=_inputs,
    fast=lambda x, w, b: layer_norm(x, x.shape[-1:], w, b),
    naive=lambda x, w, b: reference.layer_norm(x, w, b),
    builtin=("F.layer_norm", lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b)),
    reference=lambda x, w, b: reference.layer_norm(x, w, b),
    work=registry.rowwise_bytes(2, 3),                      # x → y; dy, x → dx
    launch_kernels=_launch_kernels, launch_sizes=registry.ROWWISE_LAUNCH_SIZES))
registry.register(registry.OpSpec(
    name="residual_layer_norm", family=OP,
    summary="LayerNorm(x + r) returning the sum too (a pre-LN block's second norm)",
    **_ROWWISE, inputs=lambda *a: _inputs(*a, residual=True), fast=_fused_residual,
    naive=lambda x, r, w, b: reference.layer_norm(x + r, w, b),
    builtin=("add+F.layer_norm",
             lambda x, r, w, b: torch.nn.functional.layer_norm(x + r, x.shape[-1:], w, b)),
    reference=lambda x, r, w, b: reference.layer_norm(x, w, b, residual=r),
    work=registry.rowwise_bytes(4, 3)))                     # x, r → h, y; dy, h → dx
registry.register(registry.OpSpec(
    name="rms_norm", family=OP, summary="RMSNorm over the last dim of (M, N)", **_ROWWISE,
    inputs=lambda *a: _inputs(*a, bias=False),
    fast=lambda x, w: rms_norm(x, x.shape[-1:], w, 1e-6),
    naive=lambda x, w: reference.rms_norm(x, w),
    builtin=("F.rms_norm", lambda x, w: torch.nn.functional.rms_norm(x, x.shape[-1:], w, 1e-6)),
    reference=lambda x, w: reference.rms_norm(x, w),
    work=registry.rowwise_bytes(2, 3)))
registry.replaces_function(OP, torch.nn.functional.layer_norm, layer_norm)
registry.replaces_function("rms_norm", torch.nn.functional.rms_norm, rms_norm)
