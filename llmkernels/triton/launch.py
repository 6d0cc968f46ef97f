"""One way to launch a Triton kernel from a `torch.library.triton_op`, for every kernel of the package.

    launch(kernel, grid, *args, **kwargs)      # kernel[grid](*args, **kwargs), grid a tuple

Compiled kernels go through `torch.library.wrap_triton`, so torch.compile traces them into its graph.
Interpreted kernels (TRITON_INTERPRET=1, how the tests run Triton on CPU tensors) cannot be traced: torch 2.14's
wrap_triton hands them back unwrapped, torch 2.11-2.13 reject them. So they are launched directly, and skipped
when opcheck / torch.compile run the op on FakeTensors or meta tensors (a fake run needs only the outputs'
metadata, which the op has already set by allocating them).
"""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it when a kernel is defined: read once too


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes (x takes up to 2^31 - 1)


def launch(kernel, grid, *args, **kwargs) -> None:
    if any(n > MAX_GRID_YZ for n in grid[1:]):  # a clear error, not "invalid argument" from the driver
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise ValueError(f"llmkernels: {name} grid {tuple(grid)} passes CUDA's limit of {MAX_GRID_YZ} on grid y and z")
    if INTERPRET:
        if not any(isinstance(a, torch.Tensor) and (is_fake(a) or a.is_meta) for a in args):
            kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
