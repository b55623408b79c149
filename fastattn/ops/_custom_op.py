"""How fastattn registers its custom ops, and the lean eager path beside them.

Ops that launch Triton are registered with ``torch.library.triton_op`` so that
``torch.compile`` traces into the kernels. Under ``TRITON_INTERPRET=1`` a kernel is an
interpreted Python function that cannot run on fake tensors, so the same function is
registered as an opaque ``custom_op`` instead; everything else (fake, autograd) is shared.

The custom-op machinery (torch.library's Python wrapper, default filling, its autograd
wrapper) costs tens of microseconds per call, several times the work of a small op on
the host. In plain eager mode nothing needs to see the op, so ``KernelOp`` calls the
registered function directly, through a ``torch.autograd.Function`` built from the same
``setup_context``/``backward`` when gradients may flow. Under ``torch.compile`` or any
``TorchDispatchMode`` (fake, functional and proxy tensors, opcheck, the tests' routing
recorder) and under the profiler the call goes through the custom op, so they see
``fastattn::...``.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastattn.kernels._env import INTERPRET


# Bound once: plain_eager runs on every call, and each attribute lookup costs.
_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_transforms = torch._C._are_functorch_transforms_active
_profiling = torch.autograd._profiler_enabled


def plain_eager() -> bool:
    """Whether a call may skip the custom op: not compiling, no dispatch mode active
    (every tracing and checking mode is one, and must see the op), no functorch
    transform (vmap, grad) active, which handles the custom op its own way, and no
    profiler running (a trace names the ``fastattn::`` ops)."""
    return (not _compiling() and _dispatch_modes() == 0 and not _functorch_transforms()
            and not _profiling())


class KernelOp:
    """Custom op ``name`` (``self.op``) over the plain function ``impl``; calling a
    KernelOp runs ``impl`` directly in plain eager mode and the custom op otherwise."""

    def __init__(self, name: str, impl: Callable, mutates_args=()) -> None:
        register = torch.library.custom_op if INTERPRET else torch.library.triton_op
        self.name, self.impl = name, impl
        self.op = register(name, mutates_args=mutates_args)(impl)
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Give the custom op and the lean path one gradient formula."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            # setup_context runs here rather than as Function.setup_context: that form
            # makes apply() bind the arguments with inspect.signature, ~25 µs a call.
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(self.name.split("::")[1], (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not plain_eager():
            return self.op(*args)
        # Without grad mode no graph is recorded, so the autograd.Function adds only cost.
        if self._function is None or not torch.is_grad_enabled():
            return self.impl(*args)
        return self._function.apply(*args)


def kernel_op(name: str, *, mutates_args=()) -> Callable[[Callable], KernelOp]:
    """Decorator: register ``fn`` as custom op ``name`` (``"fastattn::..."``)."""
    return lambda fn: KernelOp(name, fn, mutates_args)
