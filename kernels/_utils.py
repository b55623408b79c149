"""Small helpers shared by the kernel launchers."""
import torch
import triton
from torch.library import wrap_triton

from ._env import INTERPRET  # noqa: F401  (the launchers import it from here)


def tracing() -> bool:
    """Whether a launch is being traced: by torch.compile, or under a dispatch mode
    (fake and functional tensors: opcheck, AOT tracing, inductor's lowering of the
    ``triton_op``s)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def launch(kernel):
    """The kernel, wrapped (``wrap_triton``) when its launch is being traced, so that
    ``torch.compile`` sees it. A plain eager launch takes the kernel itself: through
    ``wrap_triton`` it would cost about 1 ms of host time (torch's own figure for its
    higher-order op's eager dispatch), which ``triton_op`` itself avoids in eager mode.

    Under the interpreter a ``@triton.jit`` function is an ``InterpretedFunction``,
    which ``wrap_triton`` does not accept; the ops layer registers opaque custom ops
    in that mode, so the plain kernel is launched instead.
    """
    return kernel if INTERPRET or not tracing() else wrap_triton(kernel)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation. Each launcher file binds it as ``_empty`` and allocates through
    that name only, so tests can poison its outputs with NaN by patching it."""
    return torch.empty(shape, dtype=dtype, device=device)


# Elements per program of a row-wise kernel: several narrow rows per program amortise
# the launch (the interpreter's cost is per program, so it gets bigger tiles).
ROW_TILE = 16384 if INTERPRET else 4096


def row_config(M: int, N: int, max_block_n: int, max_warps: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a row-wise kernel on (M, N): BLOCK_N covers the
    row up to ``max_block_n`` columns, BLOCK_M rows fill ``ROW_TILE`` elements."""
    block_n = min(next_pow2(N), max_block_n)
    block_m = max(1, min(ROW_TILE // block_n, next_pow2(max(M, 1))))
    num_warps = min(max_warps, max(1, block_m * block_n // 512))
    return block_m, block_n, num_warps


_SM_COUNT: dict[int, int] = {}


def program_slots(device: torch.device) -> int:
    """How many persistent programs fill ``device`` about twice over: 2 per SM on CUDA;
    4 under the interpreter, which runs programs one after another."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]
