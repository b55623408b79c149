"""Error bounds for the tests, derived from the rounding of the computation itself.

``attention_rounding_bound`` is for inputs where comparing with eager torch says
nothing: with scores of ±1e4, eager fp16 overflows, and eager fp32 normalises each
row by its own max, so its one-hot rows come out exact while a flash kernel, which
recomputes P = exp(s − L) in the backward from the stored log-sum-exp L, legitimately
moves them by the rounding of s (about 1e-3 at that magnitude). The bound is a
first-order error analysis of that computation, element by element, in float64:

- every score s_ij = scale·q_i·k_j is an fp32 dot product (fp16/bf16 products are
  exact in fp32). Its rounding error is at most λ·√D·u·scale·Σ_d |q_id·k_jd| with
  probability ≥ 1 − 2·exp(−λ²/2) per dot (Higham & Mary, "A new approach to
  probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019); λ = 6 makes
  that 3e-8. The same holds for the dP = dO·vᵀ dots.
- P is recomputed from s and L, each rounded: |δP_ij| ≤ P_ij·ε_ij with
  ε_ij = |δs_ij| + Σ_k P_ik·|δs_ik| + u·|L_i| + u_io (the last term: P is cast to the
  input dtype before the P·V and Pᵀ·dO dots), plus an absolute term for underflow.
- O, dV, dS = P∘(dP − Δ), dQ, dK follow by the chain rule, each taking the absolute
  values, plus the final rounding to the output dtype (u_io·|exact|).

Here u = 2⁻²⁴ (fp32 arithmetic) and u_io the eps of the input dtype (a cast may
truncate). A
wrong mask or log-sum-exp moves an output by O(|v|) where this bound is ~0, so it
still fails; and since every term is a bound, not a measurement, it holds on any
machine and any BLAS summation order.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LAMBDA = 6.0
U32 = 2.0 ** -24


def _cast_error(dtype: torch.dtype) -> float:
    """Relative error of a cast to ``dtype``: eps, not eps/2, because a cast may
    truncate (Triton's interpreter truncates fp32 -> bf16; GPUs round to nearest)."""
    return torch.finfo(dtype).eps


def _repeat_heads(x: Tensor, h: int) -> Tensor:
    return x.repeat_interleave(h // x.shape[1], dim=1)


def _sum_kv_heads(x: Tensor, hkv: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, T, D): a KV head's gradient sums its query heads."""
    b, h, t, d = x.shape
    return x.view(b, hkv, h // hkv, t, d).sum(2)


def attention_rounding_bound(q: Tensor, k: Tensor, v: Tensor, do: Tensor, causal: bool,
                             scale: float) -> dict[str, Tensor]:
    """Elementwise bounds on |kernel − exact| for out, dq, dk, dv (float64 tensors of
    their shapes), for a flash-attention kernel with fp32 scores and a stored fp32
    log-sum-exp. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); do: (B, H, Tq, D)."""
    q_dtype = q.dtype
    u_io = _cast_error(q_dtype)
    gamma = LAMBDA * math.sqrt(q.shape[-1]) * U32
    hkv, h = k.shape[1], q.shape[1]
    q, do = q.double(), do.double()
    k, v = _repeat_heads(k.double(), h), _repeat_heads(v.double(), h)
    tq, tk = q.shape[2], k.shape[2]
    s = scale * q @ k.transpose(-1, -2)                               # (B, H, Tq, Tk)
    ds_err = gamma * scale * (q.abs() @ k.abs().transpose(-1, -2))    # |δs|
    if causal:
        hidden = ~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    lse0 = torch.where(torch.isfinite(lse), lse, 0.0)
    p = torch.exp(s - lse0).nan_to_num(0.0)                           # 0 where hidden
    ds_err = ds_err * (p > 0)
    eps = ds_err + (p * ds_err).sum(-1, keepdim=True) + U32 * lse0.abs() + u_io
    # |δP|, plus an absolute term where P underflows: fp32 exp2 may flush below the
    # smallest normal (tiny), and the cast to fp16 loses what is below its subnormals.
    io, f32 = torch.finfo(q_dtype), torch.finfo(torch.float32)
    dp_err = p * eps + (p > 0) * (f32.tiny + io.tiny * io.eps)

    out = p @ v
    dp = do @ v.transpose(-1, -2)                                     # (B, H, Tq, Tk)
    delta = (do * out).sum(-1, keepdim=True)
    # Δ = dO·O uses the stored O: its rounding (u_io) and that of the dot.
    delta_err = (do.abs() * (p @ v.abs())).sum(-1, keepdim=True) * (u_io + gamma)
    dpdot_err = gamma * (do.abs() @ v.abs().transpose(-1, -2))
    dS = p * (dp - delta)
    dS_err = dp_err * (dp - delta).abs() + p * (dpdot_err + delta_err)
    bounds = {
        "out": dp_err @ v.abs() + u_io * out.abs(),
        "dv": dp_err.transpose(-1, -2) @ do.abs(),
        "dq": scale * dS_err @ k.abs(),
        "dk": scale * dS_err.transpose(-1, -2) @ q.abs(),
    }
    exact = {"dv": p.transpose(-1, -2) @ do, "dq": scale * dS @ k,
             "dk": scale * dS.transpose(-1, -2) @ q}
    for name in ("dv", "dq", "dk"):
        bounds[name] = bounds[name] + u_io * exact[name].abs()
    bounds["dv"] = _sum_kv_heads(bounds["dv"], hkv)
    bounds["dk"] = _sum_kv_heads(bounds["dk"], hkv)
    return bounds


def assert_within(got: Tensor, ref64: Tensor, bound: Tensor, what: str,
                  floor: float = 0.0) -> None:
    """|got − ref64| ≤ bound + floor elementwise; the message names the worst element."""
    err = (got.double() - ref64).abs()
    excess = err - bound - floor
    worst = int(excess.argmax())
    if excess.flatten()[worst] > 0:
        raise AssertionError(
            f"{what}: error {err.flatten()[worst].item():.3g} > bound "
            f"{bound.flatten()[worst].item() + floor:.3g} at flat index {worst} "
            f"(max error {err.max().item():.3g})")


# Floors, relative to the size of the result: a few eps of fp16/bf16 (for the cases
# where eager torch happens to round well), 1e-4 for fp32 ops that accumulate in fp32.
FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(got: Tensor, ref64: Tensor, what: str, eager: Tensor | None = None,
                 floor: float | None = None, min_size: float = 1.0) -> None:
    """flash-attention's rule: the max error against the float64 reference may be at
    most 2× that of ``eager`` (the same math by eager torch in ``got``'s dtype), plus
    ``floor`` (default ``FLOOR[got.dtype]``) × (min_size + max |ref64|). Without
    ``eager`` only the floor applies (fp32 results held to their own accumulation)."""
    def max_err(x: Tensor) -> float:
        return (x.double() - ref64).abs().max().item() if x.numel() else 0.0

    floor = FLOOR[got.dtype] if floor is None else floor
    size = min_size + (ref64.abs().max().item() if ref64.numel() else 0.0)
    bound = (2 * max_err(eager) if eager is not None else 0.0) + floor * size
    err = max_err(got)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"
