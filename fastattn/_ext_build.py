"""How the C++/CUDA extension is compiled: one recipe for ``fastattn.ext.load()`` (the
JIT build) and setup.py (``FASTATTN_BUILD_EXT=1``). It imports torch and the standard
library only, so setup.py loads this file on its own, without the fastattn package."""
from __future__ import annotations

import glob
import os
import sys

import torch


def build_options(csrc: str) -> dict:
    """How to compile ``csrc/``, for the JIT build here and for setup.py alike: the
    sources (CUDA ones when torch has CUDA, nvcc is found and ``FASTATTN_EXT_CUDA`` is
    not 0), whether CUDA is in, and the C++/nvcc/link flags."""
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FASTATTN_EXT_CUDA", "1") == "1")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
    openmp = openmp_flags()
    defines = ["-DFASTATTN_WITH_CUDA"] if with_cuda else []
    return {"sources": sources, "with_cuda": with_cuda,
            # The C++ standard is torch's choice.
            "cflags": ["-O3", "-Wno-psabi", *openmp, *defines],
            "cuda_cflags": ["-O3", "--use_fast_math", *defines, *cuda_arch_flags()],
            "ldflags": openmp}


# Built for when no GPU is visible: A100 (sm_80) and H100/H200 (sm_90) machine code,
# and sm_90 PTX that the driver compiles for newer GPUs.
DEFAULT_ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                 "-gencode=arch=compute_90,code=compute_90")


def cuda_arch_flags() -> list[str]:
    """nvcc's target flags: none (torch's choice: the visible GPUs, or
    ``TORCH_CUDA_ARCH_LIST``) unless neither is there, as on a build machine with a
    CUDA torch and no GPU, where torch finds no architecture and fails (an IndexError
    in torch 2.14); then ``DEFAULT_ARCHS`` (torch leaves its own out when a flag names
    an arch)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return []
    return list(DEFAULT_ARCHS)


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's CPU threads are OpenMP's (Linux builds of torch), else [].

    ``at::parallel_for`` is a header template: with OpenMP it is a ``#pragma omp
    parallel`` compiled into the extension, which runs on one thread without this flag.
    The extension then links ``libgomp.so.1``, the same soname as the copy torch loads, so
    the loader reuses torch's runtime and its thread pool.
    """
    parallel = torch.__config__.parallel_info()
    return ["-fopenmp"] if sys.platform.startswith("linux") and "OpenMP" in parallel else []
