"""Loads the compiled extension `llmkernels._C` without ever failing `import llmkernels`.

The library registers every op's schema (csrc/registration.cpp) and the C++ CPU / CUDA kernels that
were built. Without it the package still works through the reference backend; `load_error` says why.
`LLMKERNELS_EXT_PATH=/path/to/lib.so` loads another build instead (used for per-family dev builds).
"""

from __future__ import annotations

import importlib
import os

import torch

loaded: bool = False
load_error: str | None = None
cuda_version: str = ""  # CUDA version the extension's .cu sources were compiled with, "" if none
cpu_isa: str = ""  # instruction set the C++ CPU kernels use here
ops: dict[tuple[str, str], bool] = {}  # (op name, "CPU" | "CUDA") -> a kernel is registered


def _load() -> None:
    global loaded, load_error, cuda_version, cpu_isa
    path = os.environ.get("LLMKERNELS_EXT_PATH")
    try:
        if path:
            torch.ops.load_library(path)
        else:
            importlib.import_module("llmkernels._C")
    except Exception as exc:  # an absent or broken build must not break the reference backend
        load_error = f"{type(exc).__name__}: {exc}"
        return
    loaded = True
    cuda_version = torch.ops.llmkernels.cuda_build_version()
    cpu_isa = torch.ops.llmkernels.cpu_kernel_isa()
    # Computed once here, so the per-call backend choice is a dict lookup that torch.compile can trace.
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith("llmkernels::"):
            name = qualname.split("::", 1)[1]
            for key in ("CPU", "CUDA"):
                ops[(name, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def has_kernel(op: str, key: str) -> bool:
    """Whether the loaded build registered a C++ kernel of `llmkernels::op` for dispatch key `key`."""
    return ops.get((op, key), False)


_load()
