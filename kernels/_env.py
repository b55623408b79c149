"""The environment switches the kernels read, each read once, here.

This module imports neither triton nor torch, so the layers above (``fastattn.backends``,
the ops) read the same values without importing triton.

* ``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors through Triton's
  interpreter. Like Triton itself, it is read at import: set it before importing.
* ``FASTATTN_AUTOTUNE=0`` launches the first autotune config of each kernel without
  benchmarking the others (a test suite that compiles many shapes once each).
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"
