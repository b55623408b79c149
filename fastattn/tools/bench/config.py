"""One benchmark run's settings (``Config``) and what they mean for its op: sizes,
shapes, options, implementations and work, all from the op's registry entry."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fastattn import ext
from fastattn.ops import registry
from fastattn.ops.registry import MODES, OpSpec
from fastattn.tools.bench.ops import UNITS, Impl, Unit, implementations, shape_overrides
from fastattn.tools.common import dtype_name, dtype_of, resolve_device

SHAPE_OVERRIDES = ("batch", "heads", "head_dim")      # the Config fields a shape may take


@dataclass
class Config:
    """One benchmark run. ``sizes`` and ``dtype`` default per device (``resolve``);
    ``batch``, ``heads`` and ``head_dim`` override the shape where the op's shape takes
    them, ``causal`` the option of that name where the op has it."""
    op: str = "flash_attention"
    device: str | None = None          # default: cuda if available, else cpu
    dtype: str | None = None           # default: bfloat16 on CUDA, float32 on CPU
    sizes: list[int] | None = None     # default: the entry's sizes for the device
    batch: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    modes: list[str] | None = None     # default: every mode the op has (spec.modes)
    quick: bool = False                # fewer repeats: a smoke test, not a measurement
    memory: bool = True
    heap_retention: bool = True        # CPU timing with HEAP_RETENTION_ENV (else glibc's default)
    load_ext: bool = False             # JIT-load the C++ extension (fastattn.ext.load())

    def resolve(self) -> Config:
        """This config with its defaults filled in; ValueError for a bad setting."""
        spec = registry.get(self.op)
        device = resolve_device(self.device)
        dtype = dtype_name(dtype_of(self.dtype or ("bfloat16" if device == "cuda" else
                                                   "float32")))
        sizes = self.sizes or list(spec.sizes[device])
        modes = list(spec.modes) if self.modes is None else self.modes
        if not modes or any(m not in spec.modes for m in modes):
            raise ValueError(f"modes must be a non-empty subset of {spec.modes} for "
                             f"{spec.name}, got {modes}")
        for name in SHAPE_OVERRIDES:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"sizes must be positive integers, got {sizes}")
        self._check_applies(spec)
        return Config(**{**asdict(self), "device": device, "dtype": dtype,
                         "sizes": list(sizes), "modes": modes})

    def _check_applies(self, spec: OpSpec) -> None:
        """A setting the op does not take is an error, never silently dropped."""
        taken = shape_overrides(spec)
        extra = [n for n in SHAPE_OVERRIDES if getattr(self, n) is not None and n not in taken]
        if extra:
            raise ValueError(f"{', '.join(extra)} do(es) not apply to op {spec.name!r}; its "
                             f"shape takes {', '.join(taken) or 'no override'}")
        if not self.causal and "causal" not in spec.options:
            raise ValueError(f"causal does not apply to op {spec.name!r}; its options: "
                             f"{', '.join(spec.options) or 'none'}")

    # What a resolved config means for its op.

    @property
    def spec(self) -> OpSpec:
        return registry.get(self.op)

    @property
    def unit(self) -> Unit:
        return UNITS[self.spec.unit]

    def options(self) -> dict[str, Any]:
        """The keywords every call of the op gets: the entry's, with ``causal`` set."""
        options = dict(self.spec.options)
        if "causal" in options:
            options["causal"] = self.causal
        return options

    def shapes(self) -> list[dict]:
        """One shape per size."""
        overrides = {n: getattr(self, n) for n in SHAPE_OVERRIDES
                     if getattr(self, n) is not None}
        return [self.spec.shape(size, torch.device(self.device), **overrides)
                for size in self.sizes]

    def impls(self) -> tuple[list[Impl], dict[str, str]]:
        """The implementations that run on the device, and why the others cannot."""
        if self.load_ext and "ext" in self.spec.backends:
            ext.load()   # the (cached) JIT build; in every process of the run
        return implementations(self.spec, torch.device(self.device), self.options())

    def work(self, shape: dict, mode: str) -> float:
        """The work of one call at ``shape``, in ``unit.work_key`` units."""
        return self.spec.work(shape, dtype_of(self.dtype), mode, **self.options())
