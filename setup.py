"""fastattn: readable Triton kernels for causal flash-attention, LayerNorm and GELU.

The top-level ``kernels/`` folder installs as ``fastattn.kernels``.

The optional C++/CUDA extension (``csrc/``) is built only when ``FASTATTN_BUILD_EXT=1``;
it needs torch at build time, so build it without build isolation:

    FASTATTN_BUILD_EXT=1 pip install --no-build-isolation -e .

The CPU part is always compiled; the CUDA part when torch has CUDA and nvcc is found.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_module():
    """fastattn/_ext_build.py loaded on its own (torch and the standard library only): the
    build uses the sources and flags of the JIT build without importing fastattn."""
    spec = importlib.util.spec_from_file_location("_fastattn_ext_build",
                                                  os.path.join(HERE, "fastattn", "_ext_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_modules():
    if os.environ.get("FASTATTN_BUILD_EXT", "0") != "1":
        return [], {}
    # Imported only here: a plain install must not need torch to build.
    from torch.utils import cpp_extension

    opts = _ext_module().build_options("csrc")
    kind = cpp_extension.CUDAExtension if opts["with_cuda"] else cpp_extension.CppExtension
    ext = kind("fastattn._C", opts["sources"], include_dirs=[os.path.join(HERE, "csrc")],
               extra_compile_args={"cxx": opts["cflags"], "nvcc": opts["cuda_cflags"]},
               extra_link_args=opts["ldflags"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastattn",
    version="0.1.0",
    description="Readable Triton kernels for causal flash-attention, LayerNorm and GELU",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["fastattn", "fastattn.*"]), "fastattn.kernels",
              "fastattn.csrc"],
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
                 "transformers>=4.48", "tokenizers", "matplotlib", "kernels>=0.17"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "ext": ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["fastattn = fastattn.tools.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
