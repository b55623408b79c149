"""Training on several processes under ``torchrun``: the process group, DDP or FSDP2.

Each rank draws its own batches; gradients are averaged by DDP's all-reduce or FSDP2's
reduce-scatter, skipped on all but the last micro-batch of a step. CPU runs use gloo.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False          # this process group was started here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def mean(self, value: Tensor) -> Tensor:
        if self.on:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def gather(self, obj: Any) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; pick this rank's device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, owned), device


@contextlib.contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
    if not dist.main:
        dist.barrier()
    yield
    if dist.main:
        dist.barrier()


def parallelize(raw: torch.nn.Module, fsdp: bool, dist: Dist,
                device: torch.device) -> torch.nn.Module:
    """Under torchrun: shard ``raw`` in place with FSDP2 (each block, then the root,
    which holds the embeddings and the tied head) and return it, or wrap it in DDP."""
    if not dist.on:
        return raw
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.blocks:
            fully_shard(block)
        return fully_shard(raw)
    return torch.nn.parallel.DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, raw: torch.nn.Module, fsdp: bool, dist: Dist
            ) -> Callable[[], contextlib.AbstractContextManager] | None:
    """The context that skips the gradient all-reduce of ``model`` (DDP, possibly
    compiled) or ``raw`` (FSDP2) for a micro-batch; None when not distributed."""
    if not dist.on:
        return None
    if fsdp:
        return lambda: _fsdp_no_sync(raw)
    ddp = model._orig_mod if hasattr(model, "_orig_mod") else model
    return ddp.no_sync


@contextlib.contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def unsharded(raw: torch.nn.Module, fsdp: bool) -> Iterator[None]:
    """Under FSDP, gather every shard so modules can be called outside their forward."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in raw.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()


__all__ = ["Dist", "main_first", "no_sync", "parallelize", "setup_distributed", "unsharded"]
