"""Say once when fastattn hands a call to PyTorch because of an argument it does not serve."""
import warnings

_SEEN: set[str] = set()


class FallbackWarning(UserWarning):
    """fastattn passed a call to eager PyTorch (named in the message)."""


def warn_fallback(where: str, reason: str) -> None:
    """Warn once per (where, reason) that ``where`` fell back to PyTorch because of ``reason``."""
    key = f"{where}: {reason}"
    if key in _SEEN:
        return
    _SEEN.add(key)
    warnings.warn(f"{where}: {reason}; handing this call to PyTorch's implementation "
                  "(not fastattn's kernels)", FallbackWarning, stacklevel=3)
