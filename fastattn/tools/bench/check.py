"""Correctness before timing: every implementation's output (and gradients) against the
naive baseline run in float32 on the same inputs. A wrong result gets no number."""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from fastattn.tools.bench.ops import Impl

# Relative tolerance, as max |x - ref| / max |ref|, per benchmark dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2,
             torch.bfloat16: 3e-2}


def run_once(impl: Impl, inputs: tuple[Tensor, ...], dout: Tensor, mode: str
             ) -> list[Tensor]:
    """The output (and, for fwd+bwd, the gradients of all inputs) of one call."""
    if mode == "fwd":
        with torch.no_grad():
            return [impl(*inputs)]
    out = impl(*inputs)
    return [out, *torch.autograd.grad(out, inputs, dout)]


def reference(impls: list[Impl], inputs: tuple[Tensor, ...], dout: Tensor, mode: str
              ) -> tuple[list[Tensor] | None, Impl | None]:
    """Output (and gradients) of the naive implementation in float32 (float64 stays
    float64) on the same inputs; if it cannot run (out of memory), torch's built-in.
    Returns (None, None) if neither can."""
    up = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    for impl in sorted(impls, key=lambda i: ("naive", "torch", "fastattn").index(i.kind))[:2]:
        inputs32 = tuple(x.detach().to(up).requires_grad_() for x in inputs)
        try:
            return [t.detach() for t in run_once(impl, inputs32, dout.to(up), mode)], impl
        except Exception as e:  # noqa: BLE001
            print(f"  reference {impl.name} failed ({type(e).__name__}), trying the next",
                  file=sys.stderr)
            del inputs32
            if inputs[0].is_cuda:
                torch.cuda.empty_cache()
    return None, None


def check(impl: Impl, inputs: tuple[tuple[Tensor, ...], Tensor], ref: list[Tensor],
          mode: str) -> float:
    """Run ``impl`` once on ``inputs`` (tensors, output gradient) and return its
    ``max_rel_error`` against ``ref``; compare with ``TOLERANCE[dtype]``."""
    return max_rel_error(run_once(impl, *inputs, mode), ref)


def max_rel_error(got: list[Tensor], ref: list[Tensor]) -> float:
    """max |got - ref| / max |ref| over the output and gradients (NaN if any is not finite)."""
    worst = 0.0
    for x, r in zip(got, ref):
        x = x.detach().to(r.dtype)
        if not torch.isfinite(x).all():
            return float("nan")
        worst = max(worst, ((x - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst
