"""Checks shared by the ops' ``validate`` functions; messages name the argument, its
value and what is allowed."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


def check_param(name: str, t: object, input: Tensor, shape: tuple[int, ...],
                shape_is: str) -> None:
    """A parameter (weight, bias) for ``input``: a tensor of ``shape`` (``shape_is`` says
    what that shape is), in input's dtype or float32, on input's device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} shape must be {shape} ({shape_is}), got {tuple(t.shape)}")
    if t.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"{name} dtype must be input's dtype {input.dtype} or float32, "
                        f"got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on input's device {input.device}, got {t.device}")


def plain_param(t: Optional[Tensor], shape: Union[int, torch.Size], input: Tensor) -> bool:
    """Whether ``t`` is absent or a tensor of ``shape`` (an int: (shape,)) in input's
    dtype on input's device: the common case, which needs no ``check_param``. Cheap
    (a few attribute reads), for the entry points' fast path."""
    if t is None:
        return True
    if not isinstance(t, Tensor) or t.dtype is not input.dtype or t.device != input.device:
        return False
    return t.shape == shape if type(shape) is torch.Size else t.shape == (shape,)
