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
from torch._subclasses.functional_tensor import FunctionalTensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it when a kernel is defined: read once too


def _squeeze_interpreter_scalars() -> None:
    """triton < 3.7's interpreter turns a scalar into a Python int with int() of a shape-(1,) NumPy array, which NumPy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars": every interpreted kernel with a
    tensor loop bound failed under torch 2.11's triton 3.6); triton 3.7 squeezes the array first, as done here."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "llmkernels_squeezed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.llmkernels_squeezed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _squeeze_interpreter_scalars()


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes (x takes up to 2^31 - 1)


def launch(kernel, grid, *args, **kwargs) -> None:
    if any(n > MAX_GRID_YZ for n in grid[1:]):  # a clear error, not "invalid argument" from the driver
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise ValueError(f"llmkernels: {name} grid {tuple(grid)} passes CUDA's limit of {MAX_GRID_YZ} on grid y and z")
    if INTERPRET:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(isinstance(a, FunctionalTensor) for a in tensors):
            # AOTDispatcher inlined the op's body (a mutating triton_op): the launch would be missing from the
            # graph and the compiled call would return what torch.empty left. Say so instead.
            name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
            raise RuntimeError(f"llmkernels: {name} cannot run under TRITON_INTERPRET=1 inside torch.compile's AOT "
                               "tracing (aot_eager / inductor): use backend='eager', or a GPU")  # fmt: skip
        if not any(is_fake(a) or a.is_meta for a in tensors):
            kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
