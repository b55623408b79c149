"""The optional C++/CUDA extension (``csrc/``), registered as ``torch.ops.fastattn_ext``.

fastattn works without it. ``status(device)`` says whether it is loaded and why not.
"""
from __future__ import annotations

import torch

_LOAD_ERROR: str | None = None
try:
    from fastattn import _C  # noqa: F401  (registers torch.ops.fastattn_ext.*)
except ImportError as e:  # not built: the common case
    _LOAD_ERROR = (f"the C++ extension is not built ({e}); build it with "
                   "FASTATTN_BUILD_EXT=1 pip install --no-build-isolation -e .")


def status(device: torch.device) -> tuple[bool, str]:
    """Whether the extension has kernels for ``device``, and if not, why."""
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastattn_ext::layer_norm_fwd", "CUDA"):
        return False, "the extension was built without CUDA kernels"
    return True, "C++/CUDA extension"
