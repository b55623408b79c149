"""How the GPT is optimized: AdamW with weight-decay groups, the learning-rate
schedule, mixed precision, and ``train_step`` — the one training step that
``fastattn train``, ``fastattn profile`` and ``fastattn bench --op gpt`` all run.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]                        # x, y: (B, T) int64 token ids
Phase = Callable[[str], contextlib.AbstractContextManager]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from lr/warmup to
    lr over ``warmup_steps``, then a half cosine down to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                        betas: tuple[float, float], fused: bool) -> torch.optim.AdamW:
    """AdamW with two groups: every tensor of 2+ dims (Linear weights, the token
    embedding — also the tied output head — and the position embedding) decays, as in
    GPT-2 / nanoGPT; biases and LayerNorm gains and shifts (1-D) do not, since shrinking
    them toward 0 only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


@dataclass
class Precision:
    """The autocast dtype on one device type; float16 also needs a loss scaler."""
    dtype: torch.dtype
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def choose_precision(device: torch.device, name: str) -> Precision:
    """``name``: a torch dtype name, or ``auto``: bf16 on GPUs that have it, fp16 on the
    others, fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            name = "float32"
        else:
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Precision(getattr(torch, name), device.type)


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: Precision,
               next_batch: Callable[[], Batch], *, grad_accum: int = 1,
               grad_clip: float = 0.0,
               no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
               phase: Phase = _no_phase) -> tuple[Tensor, Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches from ``next_batch``: forward
    and loss under ``precision``'s autocast, backward of the scaled loss, then (with
    ``grad_clip > 0``) unscale and clip the gradient norm, step, ``zero_grad``.

    ``no_sync``: under DDP/FSDP, a context that skips the gradient all-reduce; it wraps
    the forward and backward of every micro-batch but the last. ``phase(name)`` wraps
    ``forward``, ``backward`` and ``optimizer`` (``fastattn profile`` times them).
    Returns the mean loss and the gradient norm before clipping (None without
    clipping), as tensors: no device sync.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    total = None
    for micro in range(grad_accum):
        x, y = next_batch()
        skip_sync = no_sync is not None and micro < grad_accum - 1
        with no_sync() if skip_sync else contextlib.nullcontext():
            with phase("forward"), precision.autocast():
                _, loss = model(x, y)
                loss = loss / grad_accum
            with phase("backward"):
                scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    with phase("optimizer"):
        grad_norm = None
        if grad_clip > 0:
            scaler.unscale_(optimizer)           # clip the true gradients, not scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


__all__ = ["Precision", "choose_precision", "configure_optimizer", "lr_at", "train_step"]
