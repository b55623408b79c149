"""Small helpers shared by the kernel launchers."""
import triton
from torch.library import wrap_triton

from ._env import INTERPRET  # noqa: F401  (the launchers import it from here)


def launch(kernel):
    """Wrap a kernel so ``torch.compile`` can trace its launch (``wrap_triton``).

    Under the interpreter a ``@triton.jit`` function is an ``InterpretedFunction``,
    which ``wrap_triton`` does not accept; the ops layer registers opaque custom ops
    in that mode, so the plain kernel is launched instead.
    """
    return kernel if INTERPRET else wrap_triton(kernel)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)
