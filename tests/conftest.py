"""Test set-up: on a machine without CUDA, run Triton kernels through the interpreter.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at
collection start, unless the caller set it already (``TRITON_INTERPRET=0`` opts out).
On a GPU the attention kernels are compiled with one config each instead of autotuned
(``FASTATTN_AUTOTUNE=0``, unless set): the suite compiles many shapes once each, and
autotuning would benchmark every config of every one. The benchmarks autotune.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(op_backends=("triton", "ext", "torch")) -> list:
    """pytest params for each backend in ``op_backends``, skipped with the reason when it
    cannot run on this machine's device."""
    from fastattn import backends

    params = []
    for name in op_backends:
        ok, why = backends.available(name, torch.device(DEVICE))
        marks = () if ok else pytest.mark.skip(reason=f"backend {name}: {why}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def pytest_report_header(config):
    """The versions that decide the numerics, on top of every run's output."""
    import importlib.metadata as md

    found = []
    for name in ("torch", "triton", "numpy", "transformers"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} not installed")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return [f"fastattn: {', '.join(found)}; device {DEVICE}; triton interpreter {interp}"]


def pytest_configure(config):
    """Build (or load the cached build of) the C++/CUDA extension before collection, so
    that every op test also runs on the ``ext`` backend. ``FASTATTN_TEST_EXT=0`` skips
    it; a failed build leaves those tests skipped with the reason, and test_ext.py fails."""
    if os.environ.get("FASTATTN_TEST_EXT", "1") != "1":
        return
    from fastattn import ext

    if not ext.is_available():
        try:
            ext.load()
        except Exception as e:  # reported by test_ext.py, which builds it again
            print(f"fastattn: the C++ extension did not build: {e}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE
