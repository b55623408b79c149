"""The op registry: each op declares here, once, everything the rest of fastattn needs.

An op file (``fastattn/ops/<name>.py``) ends with ``register(OpSpec(...))``: its name,
backends, dtypes, custom ops, how to build inputs for a shape, the fastattn call, the
textbook baseline it beats, torch's best built-in, its float64 reference and its work
model (FLOPs or bytes). The tools read nothing else: ``fastattn bench`` and the
pytest-benchmark suite time every entry, ``fastattn profile`` profiles it, the CLI lists
it, and a test checks that each entry has a float64 test file and a benchmark case. A
new op therefore shows up everywhere without editing them.

Layers above the ops add what only they know, keyed by the op's name:
``fastattn.functional`` and ``fastattn.nn`` register the torch function a drop-in
replaces (for ``enable()``) and the torch module class a fastattn module replaces (for
``swap()``), so those two are driven by the registry too.

Entry names are benchmark cases of an op family: ``residual_layer_norm`` is the
``layer_norm`` op with its fused residual add (``family="layer_norm"``).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

MODES = ("fwd", "fwd+bwd")
# Backward of attention ≈ 2.5 forwards (5 matmuls of 2, plus recomputing S).
ATTENTION_BWD_FLOP_FACTOR = 2.5

Inputs = tuple[tuple[Tensor, ...], Tensor]   # (op inputs requiring grad, output grad)


@dataclass(frozen=True)
class OpSpec:
    """One registry entry. Every callable takes the op's inputs as built by ``inputs``
    plus the entry's ``options`` as keywords (e.g. ``causal`` for attention)."""
    name: str                        # one name: kernels/, ops/, tests/, benchmarks/, results
    summary: str
    family: str                      # the op file / custom-op family it belongs to
    backends: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    custom_ops: tuple[str, ...]      # "fastattn::<family>_fwd", ...
    x: str                           # the dimension that a benchmark size sets
    sizes: Mapping[str, tuple[int, ...]]      # device type -> default sizes
    shape: Callable[..., dict]       # (size, device, **overrides) -> shape dict
    model_shape: Callable[..., dict]  # (batch, seq, d_model, n_head, n_kv_head, mlp) -> shape
    inputs: Callable[..., Inputs]    # (shape, dtype, device, seed) -> inputs, grad
    fast: Callable[..., Tensor]      # fastattn's call
    naive: Callable[..., Tensor]     # the textbook baseline the benchmarks beat
    builtin: tuple[str, Callable[..., Tensor]]   # torch's best built-in: (label, call)
    reference: Callable[..., Tensor]  # ground truth; the tests run it in float64
    work: Callable[..., float]       # (shape, dtype, mode, **options) -> FLOPs or bytes
    unit: str = "flops"              # what ``work`` counts: "flops" or "bytes"
    options: Mapping[str, Any] = field(default_factory=dict)
    modes: tuple[str, ...] = MODES   # what the op has; an inference-only op: ("fwd",)
    # max |x - reference| / max |reference| that the benchmarks' check and the registry
    # test allow; None: the benchmark dtype's (an op with its own rounding, fp8, sets it)
    tolerance: float | None = None
    # For ``fastattn check-kernels``: (size, dtype, **options) runs the Triton launchers,
    # forward and backward, on empty CPU tensors of a typical shape whose size is
    # ``launch_dim`` ("D": head dim, "N": width), for each of ``launch_sizes``. One entry
    # per op family has it (the variants launch the same kernels).
    launch_kernels: Callable[..., None] | None = None
    launch_dim: str = "N"
    launch_sizes: tuple[int, ...] = ()


_REGISTRY: dict[str, OpSpec] = {}
# Added by the drop-in layers: torch function -> (op, drop-in), and swap kind ->
# (torch module class, fastattn class).
_FUNCTIONS: dict[Callable, tuple[str, Callable]] = {}
_MODULES: dict[str, tuple[type, type]] = {}
_UNROUTED: dict[str, str] = {}          # family -> why it has no torch function to replace


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    if spec.unit not in ("flops", "bytes"):
        raise ValueError(f"unit must be 'flops' or 'bytes', got {spec.unit!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"op must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load()
    return list(_REGISTRY)


def specs() -> list[OpSpec]:
    _load()
    return list(_REGISTRY.values())


def replaces_function(op: str, torch_fn: Callable, dropin: Callable) -> None:
    """``enable()`` routes calls of ``torch_fn`` to ``dropin``, which has its signature,
    when the call's first tensor has one of ``op``'s dtypes; other calls run ``torch_fn``."""
    _FUNCTIONS[torch_fn] = (op, dropin)


def no_torch_function(family: str, reason: str) -> None:
    """Declare that ``enable()`` cannot reach ``family``: torch has no function it would
    replace (``reason`` says so and how models reach the op instead)."""
    if not reason:
        raise ValueError(f"{family}: a family without a drop-in must say why")
    _UNROUTED[family] = reason


def unrouted() -> dict[str, str]:
    """family -> why ``enable()`` has no route to it."""
    _load()
    return dict(_UNROUTED)


def replaces_module(kind: str, torch_cls: type, fast_cls: type) -> None:
    """``swap()`` turns modules of exactly ``torch_cls`` into ``fast_cls`` (a subclass
    with the same parameters) unless called with ``kind=False``."""
    if not issubclass(fast_cls, torch_cls):
        raise TypeError(f"{fast_cls.__name__} must subclass {torch_cls.__name__}")
    _MODULES[kind] = (torch_cls, fast_cls)


def function_routes() -> dict[Callable, tuple[OpSpec, Callable]]:
    """torch function -> (op entry, drop-in), for every drop-in layer imported so far
    (``fastattn`` imports them all)."""
    _load()                         # loading adds routes: before iterating over them
    return {torch_fn: (get(op), dropin) for torch_fn, (op, dropin) in list(_FUNCTIONS.items())}


def module_swaps() -> dict[str, tuple[type, type]]:
    """swap kind -> (torch module class, fastattn class), as ``function_routes``."""
    return dict(_MODULES)


_LOADED: list[bool] = []


def _load() -> None:
    """Import every op file of ``fastattn.ops`` (each registers itself on import), once."""
    if _LOADED:
        return
    import fastattn.ops as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED.append(True)


# ------------------------------------------------ helpers the op files' entries share


def attention_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int,
                    causal: bool, mode: str = "fwd") -> float:
    """FLOPs of attention: the forward does two matmuls of 2·Tq·Tk·D per head
    (``4·B·H·Tq·Tk·D``), half of it when causal; the backward 2.5× the forward."""
    fwd = 4.0 * batch * heads * tq * tk * head_dim * (0.5 if causal else 1.0)
    bwd = ATTENTION_BWD_FLOP_FACTOR
    return fwd * {"fwd": 1.0, "bwd": bwd, "fwd+bwd": 1.0 + bwd}[mode]


def randn(size: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          generator: torch.Generator, scale: float = 1.0, grad: bool = False) -> Tensor:
    """Standard normal × scale, drawn in fp32 (the same numbers for every dtype)."""
    t = (torch.randn(size, generator=generator, device=device) * scale).to(dtype)
    return t.requires_grad_(grad)


def rowwise_shape(size: int, device: torch.device, batch: int | None = None) -> dict:
    """(M, N) rows for a benchmark size N: 16k rows on CUDA, 4k on CPU."""
    return {"M": batch or (16384 if device.type == "cuda" else 4096), "N": size}


def rowwise_bytes(fwd_tensors: int, bwd_tensors: int) -> Callable[..., float]:
    """Work of a row-wise op: M·N-element tensors read + written once each, forward
    (``fwd_tensors``) and backward (``bwd_tensors``); parameters and statistics ignored."""
    def work(shape: dict, dtype: torch.dtype, mode: str, **options: Any) -> float:
        tensors = fwd_tensors + (bwd_tensors if mode == "fwd+bwd" else 0)
        return tensors * shape["M"] * shape["N"] * torch.finfo(dtype).bits / 8
    return work


ROWWISE_SIZES = {"cuda": (768, 1024, 2048, 4096, 8192), "cpu": (768, 1024, 2048, 4096, 8192)}
# Widths check-kernels compiles: GPT-2 small's; a whole row in registers; a row looped
# over in chunks.
ROWWISE_LAUNCH_SIZES = (768, 4096, 12288)
