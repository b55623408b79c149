"""Proof that fastattn ran: record the ``fastattn::`` custom ops a block of code calls.

A test that claims a call went through fastattn asserts it with ``fastattn_ops()``
rather than trusting that the numbers match (torch's own function gives the same ones).
The custom ops pass through the dispatcher, where a ``TorchDispatchMode`` sees them.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self, seen: Counter) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()                       # "fastattn::layer_norm_fwd"
        if name.startswith("fastattn::"):
            self.seen[name.split("::", 1)[1]] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def fastattn_ops() -> Iterator[Counter]:
    """``with fastattn_ops() as ran: ...`` — afterwards ``ran["layer_norm_fwd"]`` is how
    many times ``fastattn::layer_norm_fwd`` ran inside the block (forward and backward
    ops both count, e.g. ``flash_attention_bwd`` during ``.backward()``)."""
    seen: Counter = Counter()
    with _Recorder(seen):
        yield seen


def count_module_calls(model, kind_of, kinds) -> dict:
    """Forward hooks on ``model``'s modules that count, per kind in ``kinds``, the calls
    of the modules ``kind_of(module)`` names (None: not counted); returns the live counts:
    the calls eager makes, against which ``fastattn_ops`` counts are held."""
    calls = dict.fromkeys(kinds, 0)
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None:
            module.register_forward_hook(
                lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
    return calls
