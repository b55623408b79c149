"""``fastattn::rope_fwd`` / ``_bwd`` / ``rope_``: rotary position embedding of q and k.

* ``rope(q, k, cos, sin, ...)`` rotates q (B, H, T, D) and k (B, Hkv, T, D) in one
  launch, GPT-NeoX (``rotate_half``) or GPT-J (``interleaved=True``) layout, partial
  rotary (the first R = rotary_dim dims turn, the rest pass through), out of place or
  in place (``inplace=True``). The angles come from one of:

  - ``cos``, ``sin`` (B or 1, T, W): per position, as transformers' rotary embedding
    returns them (``LlamaRotaryEmbedding.forward``);
  - ``cos``, ``sin`` (P, W): a table over positions P, indexed by ``position_ids``
    (B, T) or by ``offset + arange(T)`` (decoding after ``offset`` cached positions);
  - neither: computed in fp32 from ``inv_freq`` (R/2,), by default transformers'
    ``1 / base^(2i/R)``, at ``position_ids`` or ``offset + arange(T)``.

  W is R (transformers' full width: the halves repeat in the NeoX layout, ``c0 c0 c1
  c1 ...`` in the GPT-J layout; only the first copy is read) or R/2, with R =
  ``rotary_dim`` (default: W when the tables are given, D when computed).
* ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` has the signature and
  semantics of transformers' Llama function (models/llama), so a model calls it
  unchanged; with cos narrower than the head dim it rotates the first dims only.

The forward op's autograd formula calls the backward op, the rotation by −θ; cos and
sin get no gradient. Each entry point validates its inputs, picks a backend (``triton``
on CUDA, ``torch`` on CPU, or the one forced by ``use_backend``) and calls the op. In
plain eager mode the op's function runs directly (``fastattn.ops._custom_op``).

Op semantics (the same for every backend), with cos, sin (B or 1, T, R/2), any strides:

* ``rope_fwd(q, k?, cos, sin, interleaved, backend) -> (q_out, k_out)``: q, k rotated by
  θ, in q's dtype, with q's and k's strides when those are dense (``empty_like``);
  k_out is an empty (0,) tensor without k.
* ``rope_bwd(dq, dk?, cos, sin, interleaved, backend) -> (dq_in, dk_in)``: dq, dk rotated
  by −θ, as ``rope_fwd``.
* ``rope_(q, k?, cos, sin, interleaved, backend) -> ()``: ``rope_fwd`` written into q, k.

In place is served where autograd does not record (under ``torch.no_grad()`` or for
tensors that do not require grad): a custom op that mutates its inputs has no autograd
formula in ``torch.library``. Asking for it while autograd records is an error.

Dtypes: q, k float16, bfloat16 or float32; cos, sin any float dtype (transformers gives
them in q's dtype). The rotation runs in fp32 (torch backend: in q's dtype, as eager).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fastattn import backends
from fastattn import reference
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op

OP = "rope"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512


def _triton_kernels():
    from fastattn.kernels import rope  # imports triton: only when used
    return rope


# ------------------------------------------------------------------ the torch backend


def _pairs(x: Tensor, r: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """Views of the two members of every rotated pair of x (..., D)."""
    if interleaved:
        return x[..., 0:r:2], x[..., 1:r:2]
    return x[..., :r // 2], x[..., r // 2:r]


def _torch_rotate(x: Tensor, c: Tensor, s: Tensor, interleaved: bool, sign: float,
                  out: Optional[Tensor]) -> Tensor:
    """x (B, H, T, D) rotated by sign·θ into ``out`` (a new tensor when None; x itself
    when ``out is x``). c, s: (B or 1, T, R/2)."""
    r = 2 * c.shape[-1]
    c, s = c[:, None], s[:, None]                          # (B|1, 1, T, R/2)
    x1, x2 = _pairs(x, r, interleaved)
    if out is x:
        x1_in = x1.clone()                                 # o2 needs x1 after o1 is written
        x1.mul_(c).addcmul_(x2, s, value=-sign)
        x2.mul_(c).addcmul_(x1_in, s, value=sign)
        return x
    out = torch.empty_like(x)
    o1, o2 = _pairs(out, r, interleaved)
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


def _rotate(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
            backend: str, inverse: bool, inplace: bool) -> tuple[Tensor, Optional[Tensor]]:
    if backend == "triton":
        return _triton_kernels().rope(q, k, cos, sin, interleaved, inverse, inplace)
    sign = -1.0 if inverse else 1.0
    qo = _torch_rotate(q, cos, sin, interleaved, sign, q if inplace else None)
    ko = None if k is None else _torch_rotate(k, cos, sin, interleaved, sign,
                                              k if inplace else None)
    return qo, ko


# ------------------------------------------------------------------ the custom ops


@kernel_op("fastattn::rope_fwd")
def _fwd(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
         backend: str) -> tuple[Tensor, Tensor]:
    qo, ko = _rotate(q, k, cos, sin, interleaved, backend, inverse=False, inplace=False)
    return qo, (q.new_empty(0) if ko is None else ko)


@_fwd.register_fake
def _(q, k, cos, sin, interleaved, backend):
    return torch.empty_like(q), (q.new_empty(0) if k is None else torch.empty_like(k))


@kernel_op("fastattn::rope_bwd")
def _bwd(dq: Tensor, dk: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
         backend: str) -> tuple[Tensor, Tensor]:
    dqi, dki = _rotate(dq, dk, cos, sin, interleaved, backend, inverse=True, inplace=False)
    return dqi, (dq.new_empty(0) if dki is None else dki)


@_bwd.register_fake
def _(dq, dk, cos, sin, interleaved, backend):
    return torch.empty_like(dq), (dq.new_empty(0) if dk is None else torch.empty_like(dk))


@kernel_op("fastattn::rope_", mutates_args=("q", "k"))
def _inplace(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
             backend: str) -> None:
    _rotate(q, k, cos, sin, interleaved, backend, inverse=False, inplace=True)


@_inplace.register_fake
def _(q, k, cos, sin, interleaved, backend):
    return None


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin)                     # the backward needs only the angles
    ctx.has_k, ctx.interleaved, ctx.backend = k is not None, interleaved, backend
    # An output that gets no gradient (k_out unused, or the empty one without k) stays
    # None instead of a zero tensor that the backward would rotate.
    ctx.set_materialize_grads(False)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    dk = dk if ctx.has_k and need[1] else None
    dq = dq if need[0] else None
    if dq is None and dk is None:
        return None, None, None, None, None, None
    if dq is None:                                     # only k_out was used: rotate dk alone
        dki, _ = _bwd(dk, None, cos, sin, ctx.interleaved, ctx.backend)
        return None, dki, None, None, None, None
    dqi, dki = _bwd(dq, dk, cos, sin, ctx.interleaved, ctx.backend)
    return dqi, (None if dk is None else dki), None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ validation


def _check_qk(q: Tensor, k: Optional[Tensor]) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, H, T, D), got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if k is None:
        return
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a torch.Tensor or None, got {type(k).__name__}")
    b, _, t, d = q.shape
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise ValueError(f"k must be (B, Hkv, T, D) = ({b}, Hkv, {t}, {d}) as q "
                         f"{tuple(q.shape)}, got shape {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype must equal q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")


def _check_table(name: str, t: object, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} dtype must be a floating point dtype, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: rope gives cos and sin no "
                         "gradient (detach them)")


def _rotary_dim(width: int, rotary_dim: Optional[int], head_dim: int) -> int:
    """R from a table width W (R or R/2) and the rotary_dim argument."""
    r = width if rotary_dim is None else rotary_dim
    if rotary_dim is not None and width not in (r, r // 2):
        raise ValueError(f"cos width must be rotary_dim={r} or rotary_dim/2={r // 2}, "
                         f"got {width}")
    if r % 2 != 0 or not 2 <= r <= head_dim:
        raise ValueError(f"rotary dim must be even and in [2, head dim {head_dim}], got {r}")
    return r


def _positions(q: Tensor, position_ids: Optional[Tensor], offset: int) -> Tensor:
    """(B or 1, T) integer positions: position_ids, or offset + arange(T)."""
    b, _, t, _ = q.shape
    if position_ids is None:
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        return torch.arange(offset, offset + t, device=q.device)[None]
    if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point \
            or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got "
                        f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) \
            or position_ids.shape[1] != t:
        raise ValueError(f"position_ids shape must be ({b}, {t}) or (1, {t}), got "
                         f"{tuple(position_ids.shape)}")
    if offset != 0:
        raise ValueError(f"offset must be 0 with position_ids (they say every position), "
                         f"got {offset!r}")
    return position_ids.to(q.device)


def _half(t: Tensor, r: int, interleaved: bool) -> Tensor:
    """The (…, R/2) view of a table of width R or R/2 (the first copy of each angle)."""
    if t.shape[-1] == r // 2:
        return t
    return t[..., 0:r:2] if interleaved else t[..., :r // 2]


def _given_tables(q: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                  offset: int, rotary_dim: Optional[int], interleaved: bool
                  ) -> tuple[Tensor, Tensor]:
    for name, t in (("cos", cos), ("sin", sin)):
        _check_table(name, t, q)
    if sin.shape != cos.shape:
        raise ValueError(f"sin shape must equal cos's {tuple(cos.shape)}, got {tuple(sin.shape)}")
    b, _, t, d = q.shape
    r = _rotary_dim(cos.shape[-1], rotary_dim, d)
    c, s = _half(cos, r, interleaved), _half(sin, r, interleaved)
    if cos.dim() == 3:
        if cos.shape[0] not in (1, b) or cos.shape[1] != t:
            raise ValueError(f"cos shape must be ({b} or 1, {t}, width) for q of shape "
                             f"{tuple(q.shape)}, got {tuple(cos.shape)}")
        if position_ids is not None or offset != 0:
            raise ValueError("position_ids and offset index a 2-D (positions, width) table; "
                             f"cos of shape {tuple(cos.shape)} already holds each position")
        return c, s
    if cos.dim() != 2:
        raise ValueError(f"cos must be 3-D (B or 1, T, width) or 2-D (positions, width), got "
                         f"shape {tuple(cos.shape)}")
    if position_ids is None:
        if not isinstance(offset, int) or offset < 0 or offset + t > cos.shape[0]:
            raise ValueError(f"offset must be an int in [0, {cos.shape[0] - t}] for {t} "
                             f"positions in a table of {cos.shape[0]}, got {offset!r}")
        return c[offset:offset + t][None], s[offset:offset + t][None]
    pos = _positions(q, position_ids, offset)
    return c[pos], s[pos]                                   # (B|1, T, R/2) gathered


def _computed_tables(q: Tensor, position_ids: Optional[Tensor], offset: int, base: float,
                     inv_freq: Optional[Tensor], rotary_dim: Optional[int]
                     ) -> tuple[Tensor, Tensor]:
    """cos, sin (B or 1, T, R/2) in fp32 from the positions and inverse frequencies
    (transformers' ``LlamaRotaryEmbedding`` without attention scaling)."""
    d = q.shape[-1]
    if inv_freq is None:
        r = _rotary_dim(d if rotary_dim is None else rotary_dim, None, d)
        if not base > 0:
            raise ValueError(f"base must be positive, got {base!r}")
        exponents = torch.arange(0, r, 2, dtype=torch.int64, device=q.device).float() / r
        inv_freq = 1.0 / (base ** exponents)
    else:
        if not isinstance(inv_freq, Tensor) or inv_freq.dim() != 1:
            raise ValueError(f"inv_freq must be a 1-D tensor (R/2,), got "
                             f"{getattr(inv_freq, 'shape', type(inv_freq).__name__)}")
        if rotary_dim is not None and 2 * inv_freq.shape[0] != rotary_dim:
            raise ValueError(f"inv_freq length must be rotary_dim/2={rotary_dim // 2}, got "
                             f"{inv_freq.shape[0]}")
        _rotary_dim(2 * inv_freq.shape[0], None, d)
    pos = _positions(q, position_ids, offset)
    freqs = pos[..., None].float() * inv_freq.to(q.device, torch.float32)   # (B|1, T, R/2)
    return freqs.cos(), freqs.sin()


def _check_inplace(q: Tensor, k: Optional[Tensor]) -> None:
    tensors = (q,) if k is None else (q, k)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError("inplace=True needs q and k outside autograd (torch.no_grad() or "
                         "no requires_grad): torch.library ops that write their inputs have "
                         "no gradient formula; use inplace=False")
    for name, t in zip(("q", "k"), tensors):
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"inplace=True cannot write {name}: it has stride 0 (an expanded "
                             f"tensor), strides {t.stride()}")
    if k is not None and k.numel() and q.data_ptr() == k.data_ptr():
        raise ValueError("inplace=True needs q and k in different memory; they start at "
                         "the same address")


# ------------------------------------------------------------------ API


def rope(q: Tensor, k: Optional[Tensor] = None, cos: Optional[Tensor] = None,
         sin: Optional[Tensor] = None, *, position_ids: Optional[Tensor] = None,
         offset: int = 0, base: float = 10000.0, inv_freq: Optional[Tensor] = None,
         rotary_dim: Optional[int] = None, interleaved: bool = False,
         inplace: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Rotary position embedding of q (B, H, T, D) and k (B, Hkv, T, D) in one launch.

    See the module docstring for where the angles come from (``cos``/``sin`` per position
    or as a table, else ``inv_freq``/``base`` at ``position_ids`` or ``offset +
    arange(T)``), the layouts (``interleaved``) and partial rotary (``rotary_dim``).
    q and k: any strides, float16, bfloat16 or float32, one dtype; k may be None.
    Returns (q_out, k_out) in q's dtype (k_out None without k); with ``inplace=True``,
    q and k themselves, rewritten (only outside autograd).
    """
    _check_qk(q, k)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or neither, to compute them "
                         f"from inv_freq/base); got cos={'None' if cos is None else 'a tensor'}"
                         f", sin={'None' if sin is None else 'a tensor'}")
    if cos is None:
        c, s = _computed_tables(q, position_ids, offset, base, inv_freq, rotary_dim)
    else:
        c, s = _given_tables(q, cos, sin, position_ids, offset, rotary_dim, interleaved)
    backend = backends.resolve(OP, q.device, BACKENDS)
    if inplace:
        _check_inplace(q, k)
        _inplace(q, k, c, s, bool(interleaved), backend)
        return q, k
    qo, ko = _fwd(q, k, c, s, bool(interleaved), backend)
    return qo, (None if k is None else ko)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                         unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (models/llama) on fastattn's kernel.

    q (B, H, T, D) and k (B, Hkv, T, D) with ``unsqueeze_dim=1``, or (B, T, H, D) and
    (B, T, Hkv, D) with ``unsqueeze_dim=2``; cos, sin (B or 1, T, R) as the model's
    rotary embedding returns them (NeoX layout, halves repeated). With R < D the first R
    dims turn and the rest pass through. Returns (q_embed, k_embed) in q's dtype, one
    launch for both (eager returns the promoted dtype when cos is wider than q).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ((B, H, T, D) inputs) or 2 ((B, T, H, D) "
                         f"inputs), got {unsqueeze_dim!r}")
    if isinstance(cos, Tensor) and cos.dim() != 3:
        raise ValueError(f"cos must be 3-D (B, T, rotary_dim) as transformers' rotary "
                         f"embedding returns it, got shape {tuple(cos.shape)}")
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)        # (B, H, T, D) views
    qo, ko = rope(q, k, cos, sin)
    if unsqueeze_dim == 2:
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko


# ------------------------------------------------------------------ registry entry


def _shape(size: int, device: torch.device, batch: int | None = None,
           heads: int | None = None, head_dim: int | None = None) -> dict:
    """q's and k's heads as one (B, H, T, D) tensor: a Llama-8B layer's 32 + 8 on CUDA."""
    gpu = device.type == "cuda"
    return {"B": batch or (8 if gpu else 2), "H": heads or (40 if gpu else 12), "T": size,
            "D": head_dim or (128 if gpu else 64)}


def _model_shape(batch: int, seq: int, d_model: int, n_head: int, n_kv_head: int,
                 mlp: int) -> dict:
    return {"B": batch, "H": n_head + n_kv_head, "T": seq, "D": d_model // n_head}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device).manual_seed(seed)
    size = (shape["B"], shape["H"], shape["T"], shape["D"])
    return (registry.randn(size, dtype, device, g, grad=True),), \
        registry.randn(size, dtype, device, g)


@functools.lru_cache(maxsize=4)
def _tables(t: int, d: int, dtype: torch.dtype, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full-width (1, T, D) cos and sin as transformers computes them (in float64 for a
    float64 x, else in fp32 and then cast to x's dtype), and their (1, T, D/2) halves.
    Cached: a model computes them once per forward for all its layers."""
    up = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device, dtype=up) / d))
    freqs = torch.arange(t, device=device, dtype=up)[None, :, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return cos, sin, cos[..., :d // 2].contiguous(), sin[..., :d // 2].contiguous()


def _naive(x: Tensor) -> Tensor:
    """transformers' formula: ``x·cos + rotate_half(x)·sin`` with full-width tables."""
    cos, sin, _, _ = _tables(x.shape[2], x.shape[3], x.dtype, x.device)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def _eager_half(x: Tensor) -> Tensor:
    """The same rotation with half-width tables: four products and one concatenation."""
    _, _, c, s = _tables(x.shape[2], x.shape[3], x.dtype, x.device)
    return reference.rope(x, c, s)


def _fast(x: Tensor) -> Tensor:
    cos, sin, _, _ = _tables(x.shape[2], x.shape[3], x.dtype, x.device)
    return rope(x, None, cos, sin)[0]


def _work(shape: dict, dtype: torch.dtype, mode: str) -> float:
    """x read and the output written; the same for the gradient (tables ignored)."""
    tensors = 4 if mode == "fwd+bwd" else 2
    return tensors * shape["B"] * shape["H"] * shape["T"] * shape["D"] * \
        torch.finfo(dtype).bits / 8


def _launch_kernels(head_dim: int, dtype: torch.dtype) -> None:
    kernels = _triton_kernels()
    q, k = torch.empty(1, 32, 1024, head_dim, dtype=dtype), torch.empty(1, 8, 1024, head_dim,
                                                                         dtype=dtype)
    cos = torch.empty(1, 1024, head_dim // 2, dtype=torch.float32)
    kernels.rope(q, k, cos, cos, interleaved=False)
    kernels.rope(q, k, cos, cos, interleaved=False, inverse=True)
    quarter = cos[..., :head_dim // 4]          # GPT-J's partial rotary: R = D/2, copies D/2
    kernels.rope(q, k, quarter, quarter, interleaved=True)


registry.register(registry.OpSpec(
    name=OP, family=OP,
    summary="rotary embedding of (B, H, T, D) heads (q's and k's: one launch), NeoX layout",
    backends=BACKENDS, dtypes=DTYPES,
    custom_ops=("fastattn::rope_fwd", "fastattn::rope_bwd"),
    x="T", sizes={"cuda": (1024, 2048, 4096, 8192), "cpu": (256, 512, 1024, 2048)},
    shape=_shape, model_shape=_model_shape, inputs=_inputs,
    fast=_fast, naive=_naive, builtin=("eager half tables", _eager_half),
    reference=_eager_half, work=_work, unit="bytes",
    launch_kernels=_launch_kernels, launch_dim="D",
    launch_sizes=(64, 128, 256)))
registry.no_torch_function(OP, "torch has no rotary-embedding function; models reach rope "
                               "through apply_rotary_pos_emb (transformers' signature)")
