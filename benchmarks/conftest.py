"""pytest-benchmark suite set-up (applies to benchmarks/ only; tests/ is untouched).

    pytest benchmarks/ --benchmark-only                  # tiny sizes: seconds on a CPU
    pytest benchmarks/ --benchmark-only --bench-full     # the sizes of `fastattn bench`
    FASTATTN_BENCH_FULL=1 pytest benchmarks/ --benchmark-only

Files named ``bench_*.py`` are collected as test modules.
"""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="fastattn: benchmark the full sizes of `fastattn bench` "
                          "(also FASTATTN_BENCH_FULL=1)")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    # One switch for the bench modules to read, whichever way it was given.
    if config.getoption("--bench-full"):
        os.environ["FASTATTN_BENCH_FULL"] = "1"


def pytest_report_header(config):
    from fastattn.tools.bench.allocator import (HEAP_RETENTION_ENV, allocator_setting,
                                                heap_retention_active)
    setting = allocator_setting("cpu", heap_retention_active())["timing"]
    if not heap_retention_active():
        setting += (" (run with " + " ".join(f"{k}={v}" for k, v in HEAP_RETENTION_ENV.items())
                    + " to keep freed memory in the heap, as `fastattn bench` does)")
    sizes = "full" if os.environ.get("FASTATTN_BENCH_FULL") == "1" else "tiny"
    return [f"fastattn benchmarks: {sizes} sizes; CPU allocator: {setting}"]
