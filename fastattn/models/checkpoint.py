"""Training checkpoints: written atomically, read back with checks, and what they hold.

A checkpoint is one ``torch.save`` dict: ``format``/``version``, the ``step``, the model
``config`` and ``model`` weights, the ``optimizer`` and GradScaler (``scaler``) states,
every rank's RNG states (``rng``: python, numpy, torch, cuda) and batch-sampler states
(``sampler``), the ``tokenizer`` spec, the training ``args``, ``world_size``, ``fsdp``
and the last ``val_loss``. Only plain data and tensors, so it loads with
``weights_only=True``; with it a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastattn.models import data as D
from fastattn.models.gpt import GPT, GPTConfig

CKPT_FORMAT, CKPT_VERSION = "fastattn-gpt", 1
CKPT_KEYS = ("step", "config", "model", "optimizer", "rng", "sampler", "tokenizer")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or is not a fastattn GPT checkpoint."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    a crash leaves the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with contextlib.suppress(OSError):          # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or ``ckpt.pt`` in a run folder."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only``: no code runs).

    Raises FileNotFoundError if it is missing and ``CheckpointError`` if it is corrupt,
    truncated or not a fastattn GPT checkpoint."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated: torch.load "
                              f"failed ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastattn GPT checkpoint "
                              f"(no format={CKPT_FORMAT!r} entry)")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    return ckpt


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
               attention: str | None = None) -> tuple[GPT, Any, dict]:
    """The GPT of a checkpoint (eval mode), its tokenizer and the checkpoint dict."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"] | ({"attention": attention} if attention else {})
    model = GPT(GPTConfig(**config))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), D.tokenizer_from_spec(ckpt["tokenizer"]), ckpt


# ------------------------------------------------------------------ RNG state


def rng_state(device: torch.device) -> dict:
    """Every global generator a training step draws from, as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x: Any) -> Any:
    # random.setstate accepts only tuples (nested), whatever container a round trip gave.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------- sharded state dicts


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective under FSDP."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def load_optimizer(model, optimizer, state: dict, fsdp: bool, saved_fsdp: bool) -> None:
    """Load a full optimizer state dict, into shards under FSDP."""
    if fsdp != saved_fsdp:
        raise CheckpointError("the checkpoint's optimizer state was saved "
                              f"{'with' if saved_fsdp else 'without'} --fsdp; resume the "
                              "same way")
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


__all__ = ["CKPT_FORMAT", "CKPT_VERSION", "CheckpointError", "checkpoint_path",
           "full_state_dicts", "load_checkpoint", "load_model", "load_optimizer", "rng_state",
           "save_checkpoint", "set_rng_state"]
