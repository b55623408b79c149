"""Triton kernels and their launchers (installed as ``fastattn.kernels``).

Each module holds one kernel family: ``@triton.jit`` kernels plus thin launchers
that take tensors and return tensors. No autograd and no module code live here.
"""
