"""Backend selection: which implementation runs an op on a given device.

| tensor on | default | also selectable                                   |
|-----------|---------|---------------------------------------------------|
| CUDA      | triton  | ext (if built), torch                             |
| CPU       | torch   | ext (if built), triton only under TRITON_INTERPRET=1 |

A backend is forced with ``fastattn.use_backend(name)`` (a context manager) or the
``FASTATTN_BACKEND`` environment variable (read at import). Asking for a backend that
cannot run is an error that names what is missing; fastattn never switches silently.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from fastattn.kernels._env import INTERPRET

BACKENDS = ("triton", "ext", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on this device."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_ENV_BACKEND = os.environ.get("FASTATTN_BACKEND") or None
if _ENV_BACKEND is not None:
    _check_name(_ENV_BACKEND, "FASTATTN_BACKEND")

# A plain list, not a contextvar: torch.compile traces reads of it without a break.
_STACK: list[str] = []


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force ``name`` (``"triton"``, ``"ext"`` or ``"torch"``) for fastattn ops inside the block.

    >>> with fastattn.use_backend("torch"):
    ...     out = fastattn.flash_attention(q, k, v, causal=True)
    """
    _STACK.append(_check_name(name, "backend"))
    try:
        yield name
    finally:
        _STACK.pop()


def requested_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``FASTATTN_BACKEND``, or None for the default."""
    return _STACK[-1] if _STACK else _ENV_BACKEND


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


@functools.cache
def _triton_installed() -> bool:
    # Searching sys.path costs ~40 µs, and resolve() asks on every call on CUDA.
    return importlib.util.find_spec("triton") is not None


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and if not, why."""
    if not _triton_installed():
        return False, "the 'triton' package is not installed (pip install triton)"
    if device.type == "cuda":
        return True, "triton on CUDA"
    if device.type == "cpu":
        if INTERPRET:
            return True, "triton interpreter (TRITON_INTERPRET=1)"
        return False, ("triton runs on CPU tensors only through its interpreter: set "
                       "TRITON_INTERPRET=1 before importing triton/fastattn")
    return False, f"triton kernels do not support device type {device.type!r}"


def ext_status(device: torch.device) -> tuple[bool, str]:
    """Whether the C++/CUDA extension is loaded with kernels for ``device``, and if not, why."""
    from fastattn import ext
    return ext.status(device)


def available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, "eager PyTorch"
    if name == "triton":
        return triton_status(device)
    return ext_status(device)


def resolve(op: str, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend for ``op`` on ``device``: the forced one, else the device default.

    Raises ``BackendUnavailableError`` when the chosen backend does not implement ``op``
    or cannot run on ``device``; the message says what is missing.
    """
    forced = requested_backend()
    name = forced or default_backend(device)
    if name not in supported:
        raise BackendUnavailableError(
            f"backend {name!r} does not implement {op}; backends for {op}: {supported}")
    ok, why = available(name, device)
    if not ok:
        how = "forced by use_backend()/FASTATTN_BACKEND" if forced else "the default"
        raise BackendUnavailableError(
            f"backend {name!r} ({how}) cannot run {op} on {device.type}: {why}")
    return name
