"""``fastattn::flash_attention_fp8_fwd``: attention on float8 (e4m3) q, k, v, for inference.

``flash_attention_fp8(q, k, v, q_descale, k_descale, v_descale, causal, ...)`` takes
q, k, v in ``torch.float8_e4m3fn`` with the factors that turn them back into the values
they stand for (``q_real = q · q_descale``; flash-attn 3's names and meaning): one per
tensor (a 0-dim or one-element float32 tensor) or one per (batch, KV head), shape
(B, Hkv); q's factor is shared by the query heads of a KV group. The output is
``softmax(scale · q_real k_realᵀ) v_real`` in bfloat16 (or float16), as
``flash_attention`` gives it on the real values, within fp8's precision. Causal masks,
sliding windows and the soft cap work as in ``flash_attention``; there is no backward
(fp8 here is an inference format), so no input may require a gradient.

``quantize_fp8(x, per)`` makes such a pair from a higher-precision tensor: scaled so that
its largest magnitude (per tensor, or per (batch, head)) lands on e4m3's largest finite
value, 448.

Backends: ``triton`` runs the forward kernel on the fp8 tiles: Q·Kᵀ on fp8 tensor cores
(sm_90+, an error on older GPUs; the factors of q and k fold into the softmax scale),
P cast to fp8 for P·V (as flash-attn 3 does), v's factor applied to the output. ``torch`` (the CPU default)
dequantizes to float32 and runs the torch attention path: it holds float32 copies of
q, k, v, 4x the fp8 inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import backends
from fastattn import reference
from fastattn.ops import _attention_torch
from fastattn.ops import registry
from fastattn.ops._custom_op import kernel_op
from fastattn.ops.flash_attention import (BACKENDS, HEAD_DIMS, _check_variants, _window,
                                          head_dim_supported)

OP = "flash_attention_fp8"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                       # e4m3's largest finite value
OUT_DTYPES = (torch.bfloat16, torch.float16)


def _triton_kernels():
    from fastattn.kernels import flash_attention  # imports triton: only when used
    return flash_attention


def _torch_fwd(q: Tensor, k: Tensor, v: Tensor, descale: Tensor, causal: bool,
               window: tuple[int, int], softcap: float, scale: float,
               out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    o, lse = _attention_torch.attn_fwd(*_real(q, k, v, *descale), causal, scale,
                                       window=window, softcap=softcap)
    return o.to(out_dtype), lse


@kernel_op("fastattn::flash_attention_fp8_fwd")
def _fwd(q: Tensor, k: Tensor, v: Tensor, descale: Tensor, causal: bool, window_left: int,
         window_right: int, softcap: float, scale: float, out_dtype: torch.dtype,
         backend: str) -> tuple[Tensor, Tensor]:
    window = (window_left, window_right)
    if backend == "torch":
        return _torch_fwd(q, k, v, descale, causal, window, softcap, scale, out_dtype)
    return _triton_kernels().attn_fwd(q, k, v, causal, scale, window=window, softcap=softcap,
                                      descale=descale, out_dtype=out_dtype)


@_fwd.register_fake
def _(q, k, v, descale, causal, window_left, window_right, softcap, scale, out_dtype,
      backend):
    b, h, tq, _ = q.shape
    return q.new_empty(q.shape, dtype=out_dtype), q.new_empty(b, h, tq, dtype=torch.float32)


# ------------------------------------------------------------------- validation and API


def _check_descale(name: str, t: Tensor | None, batch: int, kv_heads: int,
                   device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} dtype must be float32, got {t.dtype}")
    if t.numel() != 1 and tuple(t.shape) != (batch, kv_heads):
        raise ValueError(f"{name} must hold one factor (per tensor) or be (batch, kv_heads) "
                         f"= ({batch}, {kv_heads}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def validate(q: Tensor, k: Tensor, v: Tensor, descales: tuple, scale, window, softcap,
             out_dtype) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and what is allowed."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != FP8:
            raise TypeError(f"{name} dtype must be torch.float8_e4m3fn, got {t.dtype} "
                            "(quantize_fp8 makes one)")
        if t.dim() != 4 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (batch, heads, seq_len, head_dim) "
                             f"tensor, got shape {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: flash_attention_fp8 has no backward "
                             "(fp8 is an inference format here)")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must match q's batch size and head dim ({q.shape[0]}, "
                         f"{q.shape[3]}), got k shape {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k/v heads must divide q heads {q.shape[1]}, got {k.shape[1]}")
    if not head_dim_supported(q.shape[3]):
        raise ValueError(f"head dim must be {HEAD_DIMS}, got {q.shape[3]}")
    for name, t in zip(("q_descale", "k_descale", "v_descale"), descales):
        _check_descale(name, t, q.shape[0], k.shape[1], q.device)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
    _check_variants(q, q.shape[1], q.shape[0], scale, window, softcap, None, 0.0, True)


def _descale(descales: tuple, batch: int, kv_heads: int, device: torch.device) -> Tensor:
    """The three factors as one contiguous float32 (3, B, Hkv) tensor (1 where None)."""
    out = torch.ones(3, batch, kv_heads, dtype=torch.float32, device=device)
    for i, t in enumerate(descales):
        if t is not None:
            out[i] = t.reshape(()) if t.numel() == 1 else t
    return out


def flash_attention_fp8(q: Tensor, k: Tensor, v: Tensor, q_descale: Tensor | None = None,
                        k_descale: Tensor | None = None, v_descale: Tensor | None = None,
                        causal: bool = False, scale: float | None = None,
                        return_lse: bool = False, *, window: tuple[int, int] = (-1, -1),
                        softcap: float = 0.0, out_dtype: torch.dtype = torch.bfloat16
                        ) -> Tensor | tuple[Tensor, Tensor]:
    """Attention on float8 e4m3 q (B, H, Tq, D), k, v (B, Hkv, Tk, D), for inference.

    ``*_descale``: float32 factors back to the real values (``q_real = q · q_descale``),
    one per tensor or (B, Hkv); None means 1. ``causal``, ``scale``, ``window``,
    ``softcap`` and ``return_lse`` as in ``flash_attention`` (scale defaults to
    ``1 / sqrt(D)``). Returns (B, H, Tq, D) in ``out_dtype`` (bfloat16 or float16),
    contiguous; no gradient flows (no input may require one).
    """
    descales = (q_descale, k_descale, v_descale)
    validate(q, k, v, descales, scale, window, softcap, out_dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backends.resolve(OP, q.device, BACKENDS)
    left, right = _window(causal, window)
    o, lse = _fwd(q, k, v, _descale(descales, q.shape[0], k.shape[1], q.device), bool(causal),
                  left, right, float(softcap), scale, out_dtype, backend)
    return (o, lse) if return_lse else o


def quantize_fp8(x: Tensor, per: str = "tensor", kv_heads: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """(x in float8_e4m3fn, float32 descale) with ``x ≈ x_fp8 · descale``, x scaled so that
    its largest magnitude lands on 448 (e4m3's largest finite value). ``per="tensor"``:
    one factor (a 0-dim tensor). ``per="head"``: one per (batch, head) of a
    (B, H, T, D) x, shape (B, H); with ``kv_heads`` (queries under grouped-query
    attention) one per (batch, KV group), shape (B, kv_heads): the forms
    ``flash_attention_fp8`` takes."""
    if per not in ("tensor", "head"):
        raise ValueError(f"per must be 'tensor' or 'head', got {per!r}")
    x32 = x.detach().float()
    if per == "tensor":
        amax = x32.abs().amax()
        expand = amax
    else:
        if x.dim() != 4:
            raise ValueError(f"per='head' needs a (batch, heads, seq_len, head_dim) x, "
                             f"got shape {tuple(x.shape)}")
        b, h = x.shape[:2]
        groups = h if kv_heads is None else kv_heads
        if groups < 1 or h % groups != 0:
            raise ValueError(f"kv_heads must divide x's heads {h}, got {kv_heads!r}")
        amax = x32.abs().reshape(b, groups, -1).amax(dim=2)                   # (B, groups)
        expand = amax.repeat_interleave(h // groups, dim=1)[:, :, None, None]
    descale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    expand = torch.where(expand > 0, expand / FP8_MAX, torch.ones_like(expand))
    return (x32 / expand).clamp(-FP8_MAX, FP8_MAX).to(FP8), descale


# ------------------------------------------------------------------ registry entry


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device).manual_seed(seed)
    b, h, t, d = shape["B"], shape["H"], shape["T"], shape["D"]
    hkv = shape.get("H_kv", h)
    q, k, v = (registry.randn((b, n, t, d), torch.float32, device, g) for n in (h, hkv, hkv))
    (q, dq), (k, dk), (v, dv) = (quantize_fp8(x, "head", hkv) for x in (q, k, v))
    return (q, k, v, dq, dk, dv), registry.randn((b, h, t, d), dtype, device, g)


def _real(q, k, v, dq, dk, dv):
    """The values the fp8 inputs stand for, in float32 (B, H, T, D) and (B, Hkv, T, D)."""
    group = q.shape[1] // k.shape[1]
    return (q.float() * dq.repeat_interleave(group, 1)[:, :, None, None],
            k.float() * dk[:, :, None, None], v.float() * dv[:, :, None, None])


def _sdpa(q, k, v, dq, dk, dv, causal):
    """SDPA on the real values: in bfloat16 on CUDA (what fp8 competes with), float32 on
    CPU (the benchmarks' CPU dtype)."""
    dtype = torch.bfloat16 if q.is_cuda else torch.float32
    q, k, v = (x.to(dtype) for x in _real(q, k, v, dq, dk, dv))
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def _launch_kernels(head_dim: int, dtype: torch.dtype, causal: bool) -> None:
    fa = _triton_kernels()
    if not fa._device_paths(torch.device("cuda")).fp8_dot:   # check-kernels' arch
        return                                                 # has no e4m3 tiles
    q = torch.empty(1, 2, 1024, head_dim, dtype=FP8)
    descale = torch.ones(3, 1, 2)
    fa.attn_fwd(q, q.clone(), q.clone(), causal, head_dim ** -0.5, descale=descale,
                out_dtype=torch.bfloat16)


registry.register(registry.OpSpec(
    name=OP, family="flash_attention",
    summary="attention on float8 e4m3 q, k, v (inference), bf16 out",
    backends=BACKENDS, dtypes=(torch.bfloat16,),
    custom_ops=("fastattn::flash_attention_fp8_fwd",),
    x="T", sizes={"cuda": (1024, 2048, 4096, 8192, 16384), "cpu": (256, 512, 1024)},
    shape=lambda size, device, batch=None, heads=None, head_dim=None: {
        "B": batch or (max(1, 16384 // size) if device.type == "cuda" else 1),
        "H": heads or (16 if device.type == "cuda" else 8), "T": size,
        "D": head_dim or (128 if device.type == "cuda" else 64)},
    model_shape=lambda batch, seq, d_model, n_head, n_kv_head, mlp: {
        "B": batch, "H": n_head, "H_kv": n_kv_head, "T": seq, "D": d_model // n_head},
    inputs=_inputs,
    fast=lambda q, k, v, dq, dk, dv, causal: flash_attention_fp8(q, k, v, dq, dk, dv, causal),
    naive=lambda q, k, v, dq, dk, dv, causal: reference.naive_attention(
        *_real(q, k, v, dq, dk, dv), causal).to(torch.bfloat16),
    builtin=("sdpa dequantized", _sdpa),
    reference=lambda q, k, v, dq, dk, dv, causal: reference.attention(
        *_real(q, k, v, dq, dk, dv), causal)[0],
    work=lambda shape, dtype, mode, causal: registry.attention_flops(
        shape["B"], shape["H"], shape["T"], shape["T"], shape["D"], causal, mode),
    unit="flops", options={"causal": True}, modes=("fwd",), launch_kernels=_launch_kernels,
    launch_dim="D", launch_sizes=(64, 128, 256),
    # P in e4m3 moves O by up to 2**-3 of the values it weighs (a truncating cast; half
    # that rounding to nearest); measured 3-5.5% of max |O| at T = 64-256 under the
    # interpreter. tests/test_flash_attention_fp8.py holds the tight checks.
    tolerance=0.1))
