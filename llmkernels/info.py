"""`llmkernels info`: what is built and usable on this machine, and why not (xformers.info-style)."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import _backend, _ext

# A representative input per device, to ask each backend whether it could run there.
_DEVICES = ("cpu", "cuda")


def _versions() -> list[tuple[str, str]]:
    triton = "not installed"
    tiles = "-"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton = triton.__version__
        try:  # measured (bench/tune_triton.py's JSON) or the static tables, and why
            from .triton.flash_attn import config_source

            tiles = config_source()
        except Exception as exc:  # info reports, it does not fail
            tiles = f"unknown ({exc.__class__.__name__}: {exc})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA device visible)"
    return [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", triton),
        ("triton attn tiles", tiles),
        ("GPU", gpu),
        ("CPU", f"{platform.machine()}, {torch.get_num_threads()} threads"),
        ("extension", "loaded" if _ext.loaded else f"NOT loaded: {_ext.load_error}"),
        ("CUDA sources", f"compiled with CUDA {_ext.cuda_version}" if _ext.cuda_version else "not compiled"),
        ("CPU kernels ISA", _ext.cpu_isa or "-"),
    ]


def backend_status(op: _backend.Dispatcher, backend: str) -> str:
    """'usable', or why not, for this op and backend on this machine (independent of input shapes)."""
    if backend not in op.impls:
        return "not implemented"
    if (op.name, backend) in _backend.DISABLED:
        return f"disabled: {_backend.DISABLED[(op.name, backend)]}"
    if backend == "reference":
        return "usable"
    if backend in ("cpu", "cuda"):
        if not _ext.loaded:
            return "extension not loaded"
        kernel = op.kernels.get(backend, op.name)
        if not _ext.has_kernel(kernel, backend.upper()):
            return "not compiled" if backend == "cuda" and not _ext.cuda_version else f"no {backend} kernel built"
        if backend == "cuda" and not torch.cuda.is_available():
            return "compiled; no GPU here"
        return "usable"
    # triton
    if torch.cuda.is_available():
        reason = _backend.triton_unavailable_reason("cuda")
        return "usable" if reason is None else reason
    reason = _backend.triton_unavailable_reason("cpu")
    return "interpreter only (TRITON_INTERPRET=1)" if reason is None else "no GPU (CPU tensors need TRITON_INTERPRET=1)"


def print_info() -> None:
    rows = _versions()
    width = max(len(k) for k, _ in rows)
    print("llmkernels", __import__("llmkernels").__version__)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()
    names = sorted(_backend.REGISTRY)
    col = max(len(n) for n in names) if names else 10
    header = f"  {'op':<{col}}  " + "  ".join(f"{b:<28}" for b in _backend.BACKENDS)
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in names:
        op = _backend.REGISTRY[name]
        cells = "  ".join(f"{backend_status(op, b):<28}" for b in _backend.BACKENDS)
        print(f"  {name:<{col}}  {cells}")
    print()
    auto = []
    for name in names:
        op = _backend.REGISTRY[name]
        usable = [b for b in op.order["cpu"] if backend_status(op, b) == "usable"]
        auto.append(f"{name}->{usable[0] if usable else 'reference'}")
    print("  automatic choice for CPU tensors: " + ", ".join(auto))
