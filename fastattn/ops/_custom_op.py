"""How fastattn registers its custom ops.

Ops that launch Triton are registered with ``torch.library.triton_op`` so that
``torch.compile`` traces into the kernels. Under ``TRITON_INTERPRET=1`` a kernel is an
interpreted Python function that cannot run on fake tensors, so the same function is
registered as an opaque ``custom_op`` instead; everything else (fake, autograd) is shared.
"""
import torch

from fastattn.kernels._env import INTERPRET


def kernel_op(name: str, *, mutates_args=()):
    """Decorator: register ``fn`` as custom op ``name`` (``"fastattn::..."``)."""
    def wrap(fn):
        if INTERPRET:
            return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
    return wrap
