"""``fastattn::layer_norm_fwd`` / ``_bwd``: LayerNorm and RMSNorm custom ops and their API.

``layer_norm`` and ``rms_norm`` have ``F.layer_norm`` / ``F.rms_norm``'s signatures plus
a fused residual add (``residual=``, ``return_residual=``). They validate their inputs
(a few cheap tests for the everyday call, ``validate`` for anything else), flatten
several normalised dims into one, pick a backend (``triton`` on CUDA, ``torch`` on CPU,
or the one forced by ``use_backend``) and call the forward op, whose registered autograd
formula calls the backward op. In plain eager mode the op's function runs directly
(``fastattn.ops._custom_op``). The backend name is an argument of both ops, so a
compiled graph records which one ran.

Op semantics (the same for every backend), normalising over the last dim N:

* ``layer_norm_fwd(x, weight?, bias?, residual?, eps, rms_norm, backend)
  -> (y, residual_out, mean, rstd)``: x (..., N) any strides; ``h = x + residual``
  (rounded to x's dtype), ``y = norm(h) ⊙ weight + bias`` in x's dtype, contiguous;
  ``residual_out`` = h (contiguous), or an empty (0,) tensor without residual; ``mean``
  (..., 1) fp32, empty (0,) for RMSNorm; ``rstd`` (..., 1) fp32 (the statistics keep
  their last dim, as ``torch.native_layer_norm``'s do). RMSNorm also adds a bias when one
  is given (the public ``rms_norm`` passes none).
* ``layer_norm_bwd(dy, h, weight?, mean, rstd, dresidual_out?, has_bias, rms_norm,
  backend) -> (dx, dweight, dbias)``: dx (h's shape) in h's dtype, the LayerNorm gradient
  plus ``dresidual_out`` (so also the residual's gradient); dweight (N,) in weight's
  dtype; dbias (N,) in weight's dtype, or h's without weight; absent ones are empty (0,).

The torch backend works on x as it comes; the Triton and C++ kernels
(``torch.ops.fastattn_ext.layer_norm_*``) take (M, N) rows with a unit-stride last dim and
(M,) statistics, which the op forms (views when the strides allow it).

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
from fastattn.ops._validation import check_param, plain_param

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


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """(..., N) -> (M, N) with a unit-stride last dim, as the Triton and C++ kernels take
    it; a view when the strides allow it."""
    return None if t is None else _unit_last_stride(t.reshape(-1, t.shape[-1]))


def _stats_shape(x: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], 1)


# ------------------------------------------------------------------------------- ops


@kernel_op("fastattn::layer_norm_fwd")
def _fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
         residual: Optional[Tensor], eps: float, rms_norm: bool,
         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _torch_fwd(x, weight, bias, residual, eps, rms_norm)
    # The kernels take rows: (M, N) in, (M, N) and (M,) out.
    rows, r = _rows(x), _rows(residual)
    if backend == "triton":
        y, h, mean, rstd = _triton_kernels().layer_norm_fwd(
            rows, _contig(weight), _contig(bias), r, eps, rms_norm)
    else:
        y, h, mean, rstd = torch.ops.fastattn_ext.layer_norm_fwd(
            rows.contiguous(), _contig(weight), _contig(bias), _contig(r), eps, rms_norm)
    stats = _stats_shape(x)
    return (y.view(x.shape), _absent(x) if residual is None else h.view(x.shape),
            _absent(rstd) if rms_norm else mean.view(stats), rstd.view(stats))


@_fwd.register_fake
def _(x, weight, bias, residual, eps, rms_norm, backend):
    h = x.new_empty(x.shape) if residual is not None else _absent(x)
    mean = x.new_empty(0 if rms_norm else _stats_shape(x), dtype=torch.float32)
    return x.new_empty(x.shape), h, mean, x.new_empty(_stats_shape(x), dtype=torch.float32)


@kernel_op("fastattn::layer_norm_bwd")
def _bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
         dresidual_out: Optional[Tensor], has_bias: bool, rms_norm: bool,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _torch_bwd(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm)
    rows, dy_rows, dres = _rows(h), _rows(dy), _rows(dresidual_out)
    mean, rstd = (None if rms_norm else mean.view(-1)), rstd.view(-1)
    if backend == "triton":
        dx, dw, db = _triton_kernels().layer_norm_bwd(
            dy_rows, rows, _contig(weight), mean, rstd, dres, has_bias, rms_norm)
        dw = _absent(h) if dw is None else dw
        db = _absent(h, _dbias_dtype(h, weight)) if db is None else db
    else:
        dx, dw, db = torch.ops.fastattn_ext.layer_norm_bwd(
            dy_rows.contiguous(), rows.contiguous(), _contig(weight),
            _absent(rstd) if mean is None else mean, rstd, _contig(dres), has_bias, rms_norm)
    return dx.view(h.shape), dw, db


@_bwd.register_fake
def _(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm, backend):
    n = h.shape[-1]
    dw = h.new_empty(n, dtype=weight.dtype) if weight is not None else _absent(h)
    db_dtype = _dbias_dtype(h, weight)
    db = h.new_empty(n, dtype=db_dtype) if has_bias else _absent(h, db_dtype)
    return h.new_empty(h.shape), dw, db


def _dbias_dtype(h: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return h.dtype if weight is None else weight.dtype


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms_norm, backend = inputs
    _, h, mean, rstd = output
    need = ctx.needs_input_grad
    # dbias alone needs only dy; h, mean and rstd serve every other gradient, and the
    # weight serves dx, dresidual and dweight.
    if need[0] or need[1] or need[3]:
        ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    elif need[2]:
        ctx.save_for_backward(x if residual is None else h, None, mean, rstd)
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.rms_norm, ctx.backend = rms_norm, backend
    ctx.set_materialize_grads(False)  # an unused residual_out brings no zero tensor


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    # mean and rstd are saved statistics: they carry no gradient.
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    if dresidual_out is not None and not ctx.has_residual:
        dresidual_out = None
    dx, dw, db = _bwd(dy, h, weight, mean, rstd, dresidual_out, ctx.has_bias, ctx.rms_norm,
                      ctx.backend)
    need = ctx.needs_input_grad
    if need[2] and db.dtype != ctx.bias_dtype:
        db = db.to(ctx.bias_dtype)
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            dx if need[3] else None, None, None, None)


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
    if h.dtype is torch.float32:
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


def _dense(t: Tensor) -> Tensor:
    """t, or a contiguous copy: the outputs are contiguous, as the fake ones are."""
    return t if t.is_contiguous() else t.contiguous()


def _torch_fwd(x, weight, bias, residual, eps, rms_norm):
    # Works on (..., N) as it comes: no reshape, statistics (..., 1) as
    # native_layer_norm returns them. Conversions only where a dtype differs.
    h = x if residual is None else _dense(x + residual)
    if rms_norm:
        hf = _dense(h.float())
        rstd = torch.rsqrt(hf.square().mean(dim=-1, keepdim=True) + eps)
        y = hf * rstd
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        mean = _absent(rstd)
    else:
        native = _native_params(h, weight, bias)
        hn, wn, bn = (h.float(), _f32(weight), _f32(bias)) if native is None else native
        y, mean, rstd = torch.native_layer_norm(hn, [x.shape[-1]], wn, bn, eps)
        if mean.dtype != torch.float32:
            mean, rstd = mean.float(), rstd.float()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, (_absent(x) if residual is None else h), mean, rstd


def _torch_bwd(dy, h, weight, mean, rstd, dresidual_out, has_bias, rms_norm):
    n = h.shape[-1]
    if rms_norm:
        dyf = dy.float()
        xhat = h.float() * rstd
        g = dyf if weight is None else dyf * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
        dw = None if weight is None else (dyf * xhat).reshape(-1, n).sum(dim=0)
    else:
        native = _native_params(h, weight, None)
        if native is None:
            dyn, hn, wn = dy.float(), h.float(), _f32(weight)
        else:
            dyn, (hn, wn, _) = dy, native
        # The bias gradient (Σ dy) does not read the bias, only its shape and dtype, which
        # the weight shares: passed in its place, the kernel sums dbias in the same pass.
        fused_db = has_bias and wn is not None
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dyn, hn, [n], mean, rstd, wn, wn if fused_db else None,
            [True, weight is not None, fused_db])
    if dresidual_out is not None:
        dx = dx + dresidual_out
    dx = _dense(dx) if dx.dtype == h.dtype else _dense(dx.to(h.dtype))
    if weight is None:
        dw = _absent(h)
    elif dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    db_dtype = _dbias_dtype(h, weight)
    if not has_bias:
        db = _absent(h, db_dtype)
    elif rms_norm or weight is None:
        db = dy.reshape(-1, n).sum(dim=0, dtype=torch.float32)
    if db.dtype != db_dtype:
        db = db.to(db_dtype)
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


def _plain_call(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, residual: Optional[Tensor]) -> bool:
    """Whether this is the everyday call that ``validate`` would pass, decided with a few
    cheap tests: one normalised dim, weight and bias absent or (N,) in input's dtype on
    its device, a float eps >= 0. Anything else goes through ``validate``."""
    if type(normalized_shape) is int:
        n = normalized_shape
    elif type(normalized_shape) in _SEQUENCES and len(normalized_shape) == 1:
        n = normalized_shape[0]
    else:
        return False
    if not (isinstance(input, Tensor) and input.dtype in DTYPES and input.dim() >= 1
            and input.shape[-1] == n and n > 0 and type(eps) is float and 0.0 <= eps < math.inf):
        return False
    return (plain_param(weight, n, input) and plain_param(bias, n, input)
            and plain_param(residual, input.shape, input))


_SEQUENCES = (tuple, list, torch.Size)


def _norm(input, normalized_shape, weight, bias, eps, residual, return_residual, rms_norm):
    x, w, b, r = input, weight, bias, residual
    if not _plain_call(input, normalized_shape, weight, bias, eps, residual):
        shape = _normalized_shape(normalized_shape)
        validate(input, shape, weight, bias, eps, residual)
        eps = float(eps)
        if len(shape) > 1:
            # The ops normalise over the last dim: flatten the normalised ones into it.
            n = math.prod(shape)
            x = input.flatten(-len(shape))
            r = None if residual is None else residual.flatten(-len(shape))
            w = None if weight is None else weight.reshape(n)
            b = None if bias is None else bias.reshape(n)
    backend = backends.resolve("rms_norm" if rms_norm else OP, input.device, BACKENDS)
    y, h, _, _ = _fwd(x, w, b, r, eps, rms_norm, backend)
    if x is not input:
        y, h = y.view(input.shape), (h if residual is None else h.view(input.shape))
    if not return_residual:
        return y
    return y, (input if residual is None else h)


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
