"""fastattn: readable Triton kernels for causal flash-attention, LayerNorm and GELU.

The top-level ``kernels/`` folder installs as ``fastattn.kernels``.

The optional C++/CUDA extension (``csrc/``) is built only when ``FASTATTN_BUILD_EXT=1``;
it needs torch at build time, so build it without build isolation:

    FASTATTN_BUILD_EXT=1 pip install --no-build-isolation -e .

The CPU part is always compiled; the CUDA part when torch has CUDA and nvcc is found.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("FASTATTN_BUILD_EXT", "0") != "1":
        return [], {}
    # Imported only here: a plain install must not need torch to build.
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = (cpp_extension.CUDA_HOME is not None
                 and __import__("torch").version.cuda is not None
                 and os.environ.get("FASTATTN_EXT_CUDA", "1") == "1")
    # at::parallel_for is an OpenMP pragma compiled into the extension: without
    # -fopenmp it runs on one thread (see fastattn.ext.openmp_flags).
    import torch
    openmp = (["-fopenmp"] if sys.platform.startswith("linux")
              and "OpenMP" in torch.__config__.parallel_info() else [])
    cxx = ["-O3", "-Wno-psabi", *openmp]  # the C++ standard is torch's choice
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastattn._C", sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("FASTATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastattn._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=openmp,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastattn",
    version="0.1.0",
    description="Readable Triton kernels for causal flash-attention, LayerNorm and GELU",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastattn", "fastattn.ops", "fastattn.models", "fastattn.integrations",
              "fastattn.kernels", "fastattn.csrc"],
    # csrc/ ships as fastattn/csrc too, so that fastattn.ext.load() can JIT-build the
    # extension from a non-editable install (it is data, not a Python package).
    package_dir={"fastattn.kernels": "kernels", "fastattn.csrc": "csrc"},
    package_data={"fastattn.csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.cuh",
                                    "cuda/*.cpp"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "ninja", "pybind11",
                 "transformers>=4.48", "tokenizers", "matplotlib"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "ext": ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["fastattn = fastattn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
