"""Say once when fastattn hands a call to PyTorch because of an argument it does not serve."""
from __future__ import annotations

import sys
import warnings
import weakref

# id(key object) -> the (where, reason) pairs already reported for it; None for calls
# without a key. Entries go when their object dies, so a new object with a recycled id
# reports again. Tests clear it with ``_SEEN.clear()``.
_SEEN: dict[int | None, set[tuple[str, str]]] = {}


class FallbackWarning(UserWarning):
    """fastattn handed a call to another implementation (named in the message)."""


def warn_fallback(where: str, reason: str, key: object = None,
                  to: str = "PyTorch's implementation") -> None:
    """Warn that ``where`` handed a call to ``to`` because of ``reason``: once per
    process, or, with ``key`` (any object that takes a weak reference, e.g. a model's
    config), once per ``key`` — so each model reports its own fallbacks, each only once."""
    slot = None if key is None else id(key)
    if slot not in _SEEN:
        _SEEN[slot] = set()
        if key is not None:
            weakref.finalize(key, _SEEN.pop, slot, None)
    if (where, reason) in _SEEN[slot]:
        return
    _SEEN[slot].add((where, reason))
    # warn_explicit without a registry: Python's own once-per-location filter would hide
    # the same message from a second model. The location is our caller's caller.
    caller = sys._getframe(2)
    warnings.warn_explicit(f"{where}: {reason}; handing this call to {to} (not fastattn's "
                           "kernels)", FallbackWarning,
                           caller.f_code.co_filename, caller.f_lineno,
                           module=caller.f_globals.get("__name__"),
                           module_globals=caller.f_globals)
