"""The optional C++/CUDA extension (``csrc/``), registered as ``torch.ops.fastattn_ext``.

fastattn works without it. It comes from one of two places:

- an installed build, ``fastattn._C`` (``FASTATTN_BUILD_EXT=1 pip install
  --no-build-isolation -e .``), imported here when present;
- a just-in-time build, ``load()``, which compiles ``csrc/`` with
  ``torch.utils.cpp_extension.load`` (CPU sources always, CUDA sources when torch has CUDA
  and nvcc is found) and caches the result, for users who installed without it.

``status(device)`` says whether the ops have kernels for a device and, if not, why;
``describe()`` is the same as one line for ``fastattn info``. Importing this module never
fails because of the extension.
"""
from __future__ import annotations

import os
import shutil

import torch

from fastattn._ext_build import build_options, openmp_flags  # noqa: F401  (public)

_NAMESPACE = "fastattn_ext"
_JIT_NAME = "fastattn_ext_jit"
_INSTALL_HINT = ("build it with FASTATTN_BUILD_EXT=1 pip install --no-build-isolation -e . "
                 "or at run time with fastattn.ext.load()")

_SOURCE: str | None = None     # "installed" or "jit" once the ops are registered
_LOAD_ERROR: str | None = None
try:
    from fastattn import _C  # noqa: F401  (registers torch.ops.fastattn_ext.*)
    _SOURCE = "installed"
except ImportError as e:  # not built: the common case
    _LOAD_ERROR = f"the C++ extension is not built ({e}); {_INSTALL_HINT}"
except Exception as e:  # noqa: BLE001  (another torch's build, a missing library, ...)
    _LOAD_ERROR = (f"the installed C++ extension fastattn._C failed to load "
                   f"({type(e).__name__}: {e}); {_INSTALL_HINT}")


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{_NAMESPACE}::layer_norm_fwd", dispatch_key)


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether the extension is loaded (and, given ``device``, has kernels for it)."""
    if device is None:
        return _SOURCE is not None
    return status(torch.device(device))[0]


def status(device: torch.device) -> tuple[bool, str]:
    """Whether the extension has kernels for ``device``, and if not, why."""
    if _SOURCE is None:
        return False, _LOAD_ERROR or "the C++ extension is not loaded"
    if device.type == "cuda" and not _has_kernel("CUDA"):
        return False, ("the extension was built without CUDA kernels (torch without CUDA or "
                       "nvcc not found at build time)")
    if device.type not in ("cpu", "cuda"):
        return False, f"the extension has no kernels for device type {device.type!r}"
    return True, "C++/CUDA extension"


def describe() -> str:
    """One line for ``fastattn info``: where the extension comes from and what it runs on,
    or why it is not available."""
    if _SOURCE is None:
        return f"not available: {_LOAD_ERROR}"
    devices = "CPU" + (" + CUDA" if _has_kernel("CUDA") else " only (no CUDA kernels)")
    how = "installed build fastattn._C" if _SOURCE == "installed" else "JIT build (ext.load())"
    ops = getattr(torch.ops, _NAMESPACE)
    return (f"available: {how}; kernels for {devices}; CPU kernels use {ops.cpu_isa()} on "
            f"{ops.cpu_threads()} thread(s)")


def source_dir() -> str | None:
    """The ``csrc/`` folder the JIT build compiles, or None when it is not shipped."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isfile(os.path.join(candidate, "fastattn_ext.cpp")):
            return candidate
    return None


def default_build_directory() -> str:
    """Where ``load()`` builds by default: ``$FASTATTN_EXT_BUILD_DIR``, else a folder per torch
    version under ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    if os.environ.get("FASTATTN_EXT_BUILD_DIR"):
        return os.environ["FASTATTN_EXT_BUILD_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    flavour = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    return os.path.join(cache, "fastattn", f"ext-torch{torch.__version__}-{flavour}")


def load(verbose: bool = False, build_directory: str | None = None) -> None:
    """Build ``csrc/`` just in time and register ``torch.ops.fastattn_ext.*``.

    Does nothing when the extension is already loaded (installed or loaded before). The
    build is cached in ``build_directory`` (default: ``default_build_directory()``) and
    redone only when a source changes. Compiles the CUDA sources too when torch has CUDA
    and nvcc is found (``FASTATTN_EXT_CUDA=0`` skips them).

    Raises ``RuntimeError`` when the sources are missing or no C++ compiler is found, and
    the compiler's error when the build fails; ``status``/``describe`` then report it.
    """
    global _SOURCE, _LOAD_ERROR
    if _SOURCE is not None:
        return
    csrc = source_dir()
    compiler = os.environ.get("CXX", "c++")
    problem = None
    if csrc is None:
        problem = ("the csrc/ sources are not shipped with this installation; install "
                   "fastattn from a source checkout")
    elif shutil.which(compiler) is None:
        problem = f"no C++ compiler found ({compiler!r} is not on PATH; set CXX)"
    if problem is not None:
        _LOAD_ERROR = f"the JIT build of the C++ extension cannot run: {problem}"
        raise RuntimeError(f"fastattn.ext.load: {problem}")
    from torch.utils import cpp_extension

    opts = build_options(csrc)
    build_directory = build_directory or default_build_directory()
    os.makedirs(build_directory, exist_ok=True)
    try:
        cpp_extension.load(
            name=_JIT_NAME, sources=opts["sources"], extra_include_paths=[csrc],
            extra_cflags=opts["cflags"], extra_ldflags=opts["ldflags"],
            extra_cuda_cflags=opts["cuda_cflags"],
            build_directory=build_directory, verbose=verbose, is_python_module=False)
    except Exception as e:
        _LOAD_ERROR = f"the JIT build of the C++ extension failed: {e}"
        raise
    _SOURCE, _LOAD_ERROR = "jit", None
