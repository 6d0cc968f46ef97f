"""Backend choice: reference | cpu | cuda | triton.

Every public op is a `Dispatcher` holding one implementation per backend. A call either runs the
backend the user forced (`with use_backend("cpu"):` or `LLMKERNELS_BACKEND=cpu`, read at import), which
raises `BackendError` saying why if it cannot run these inputs, or picks automatically: the first
backend in the device's preference order that can run the inputs, falling back silently to the
reference. Every refusal has a reason in words, so `llmkernels info` and error messages can show it.

Decode steps call these ops thousands of times a second on tiny tensors, so the choice is cached: per
(forced backend, device) each Dispatcher keeps the backends that pass the checks which do not depend on
the arguments (implemented, extension loaded, kernel built, Triton usable). DISABLED and the `supports`
predicates are still consulted on every call, and `register` / `invalidate` drop the cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from typing import Any, Callable, Iterator, Optional

import torch

from . import _ext

_is_compiling = torch.compiler.is_compiling

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Auto-dispatch order per device type. An op may override the CUDA order (e.g. Triton first where the
# benchmarks say it wins). Triton on CPU tensors (the interpreter) is never chosen automatically.
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

# (op name, backend) -> reason. Kernels that failed on a GPU are listed here until fixed, so auto-dispatch
# skips them and `llmkernels info` shows why.
DISABLED: dict[tuple[str, str], str] = {}

# Measured CUDA preferences, {device-name substring: {op: [backend, ...]}}, written from benchmark results by
# bench/make_dispatch_table.py, so that auto-dispatch on a GPU picks whichever of CUDA and Triton measured faster.
CUDA_DISPATCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_dispatch_table.json")
_measured_orders: dict[str, tuple[str, ...]] | None = None


# A table entry's compute capability ([major, minor]), beside its per-op orders: a GPU whose name no key matches takes
# the orders measured on one of the same architecture (an H200 or GH200 those of an H100, rather than none).
CAPABILITY_KEY = "_capability"


def same_architecture(measured_capability, capability) -> bool:
    """Whether what was measured on a GPU of compute capability `measured_capability` (backend orders, tuned tiles)
    carries over to one of `capability`: the same SM on NVIDIA. Not on ROCm, which reports its own architectures as
    capabilities (gfx90a as (9, 0)): there only a GPU's name matches."""
    if measured_capability is None or capability is None or torch.version.hip is not None:
        return False
    return tuple(measured_capability) == tuple(capability)


def orders_for_device(table: dict, device_name: str, capability=None) -> dict[str, tuple[str, ...]]:
    """The per-op backend orders of the first table entry whose key occurs in device_name; else of the first entry
    measured on a GPU of the same architecture (same_architecture); else {}."""
    named = [orders for key, orders in table.items() if key in device_name]
    same_arch = [o for o in table.values() if same_architecture(o.get(CAPABILITY_KEY), capability)]
    for orders in named[:1] or same_arch[:1]:
        return {op: tuple(order) for op, order in orders.items() if op != CAPABILITY_KEY}
    return {}


def measured_cuda_orders() -> dict[str, tuple[str, ...]]:
    """Orders for this machine's GPU from CUDA_DISPATCH_TABLE, read once (on the first CUDA-tensor call)."""
    global _measured_orders
    if _measured_orders is None:
        try:
            with open(CUDA_DISPATCH_TABLE) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        _measured_orders = orders_for_device(table, name, capability) if table else {}
    return _measured_orders


def measured_cuda_order(op: str) -> tuple[str, ...]:
    """measured_cuda_orders()[op], or () when the table has none. A constant to torch.compile: it calls this while
    tracing instead of tracing it (a first call reads the table file, which Dynamo cannot trace: a fullgraph compile
    of the first CUDA call would fail)."""
    return tuple(measured_cuda_orders().get(op, ()))


# What torch.compiler.assume_constant_result does (torch 2.11-2.14), without importing torch._dynamo (and with it
# triton) when llmkernels is imported. tests/test_package.py checks that a fullgraph compile reads the table.
measured_cuda_order._dynamo_marked_constant = True  # type: ignore[attr-defined]


_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_forced_stack: list[str] = []


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown llmkernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_ENV_BACKEND = os.environ.get("LLMKERNELS_BACKEND") or None
if _ENV_BACKEND is not None and _ENV_BACKEND != "auto":
    _validate(_ENV_BACKEND)
elif _ENV_BACKEND == "auto":
    _ENV_BACKEND = None


def requested_backend() -> Optional[str]:
    """The backend forced by `use_backend` (innermost) or LLMKERNELS_BACKEND, or None for automatic."""
    return _forced_stack[-1] if _forced_stack else _ENV_BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every llmkernels op inside the block onto one backend ("auto" restores the automatic choice)."""
    if name != "auto":
        _validate(name)
    _forced_stack.append(name if name != "auto" else None)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _forced_stack.pop()


def triton_unavailable_reason(device_type: str) -> Optional[str]:
    if not _TRITON_FOUND:
        return "triton is not installed"
    if device_type == "cpu" and not _TRITON_INTERPRET:
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels take CUDA tensors, got {device_type}"
    return None


_CPU = torch.device("cpu")


def _first_device(args: tuple, kwargs: dict) -> torch.device:
    """The device of the first tensor argument (the op's inputs all share it; checked before dispatch)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return _CPU


def _first_device_type(args: tuple, kwargs: dict) -> str:
    return _first_device(args, kwargs).type


class Dispatcher:
    """One public op: an implementation per backend and the rule that chooses among them."""

    def __init__(self, name: str, cuda_order: tuple[str, ...] | None = None):
        self.name = name
        self.impls: dict[str, Callable] = {}
        self.kernels: dict[str, str] = {}  # backend -> name of the torch.ops.llmkernels op it needs
        self.supports: dict[str, Callable[..., Optional[str]]] = {}
        self.order = dict(DEFAULT_ORDER)
        if cuda_order is not None:
            self.order["cuda"] = cuda_order
        # (forced backend or None, device) -> ((backend, supports or None), ...): see _plan.
        self._plans: dict[tuple[Optional[str], torch.device], tuple[tuple[str, Optional[Callable]], ...]] = {}
        REGISTRY[name] = self

    def invalidate(self) -> None:
        """Forget the cached choices (after changing impls, kernels, supports or order by hand)."""
        self._plans.clear()

    def register(
        self,
        backend: str,
        *,
        kernel: str | None = None,
        supports: Callable[..., Optional[str]] | None = None,
    ) -> Callable[[Callable], Callable]:
        """Register `fn` as this op's `backend` implementation.

        kernel: for cpu/cuda, the `torch.ops.llmkernels` op whose C++ kernel must be in the build.
        supports: same arguments as fn; returns why this backend cannot run them, or None.
        """
        _validate(backend)

        def wrap(fn: Callable) -> Callable:
            self.impls[backend] = fn
            if kernel is not None:
                self.kernels[backend] = kernel
            if supports is not None:
                self.supports[backend] = supports
            self.invalidate()
            return fn

        return wrap

    def _static_reason(self, backend: str, device: str) -> Optional[str]:
        """Why `backend` cannot run tensors on `device` whatever their shapes and dtypes (DISABLED aside).

        Depends only on state fixed at import (the extension, its kernels, Triton), so its answers are cached.
        """
        if backend in ("cpu", "cuda"):
            if device != backend:
                return f"inputs are on {device}, the {backend} backend takes {backend} tensors"
            if not _ext.loaded:
                return f"the compiled extension is not loaded ({_ext.load_error})"
            kernel = self.kernels.get(backend, self.name)
            if not _ext.has_kernel(kernel, backend.upper()):
                what = "built without CUDA" if backend == "cuda" and not _ext.cuda_version else "has no such kernel"
                return f"the build {what}: no {backend.upper()} kernel for llmkernels::{kernel}"
        elif backend == "triton":
            return triton_unavailable_reason(device)
        return None

    def why_not(self, backend: str, *args: Any, **kwargs: Any) -> Optional[str]:
        """Why `backend` cannot run these inputs, or None if it can."""
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        if (self.name, backend) in DISABLED:
            return f"disabled: {DISABLED[(self.name, backend)]}"
        reason = self._static_reason(backend, _first_device_type(args, kwargs))
        if reason is not None:
            return reason
        check = self.supports.get(backend)
        return check(*args, **kwargs) if check is not None else None

    def _choose_uncached(self, args: tuple, kwargs: dict) -> str:
        """The choice made from scratch: what torch.compile traces (it guards on the state read here)."""
        forced = requested_backend()
        if forced is not None:
            reason = self.why_not(forced, *args, **kwargs)
            if reason is not None:
                raise BackendError(f"llmkernels.{self.name}: backend {forced!r} cannot run these inputs: {reason}")
            return forced
        device = _first_device_type(args, kwargs)
        order = self.order.get(device, ("reference",))
        if device == "cuda":
            order = measured_cuda_order(self.name) or order
        for backend in order:
            if self.why_not(backend, *args, **kwargs) is None:
                return backend
        return "reference"

    def _plan(self, forced: Optional[str], device: torch.device) -> tuple[tuple[str, Optional[Callable]], ...]:
        """The backends to try in turn for (forced, device), with their supports predicates: those of the
        forced one or the device's order that pass `_static_reason`. Cached in self._plans."""
        kind = device.type
        if forced is not None:
            order: tuple[str, ...] = (forced,)
        else:
            order = self.order.get(kind, ("reference",))
            if kind == "cuda":
                order = measured_cuda_order(self.name) or order
        plan = tuple(
            (b, self.supports.get(b)) for b in order if b in self.impls and self._static_reason(b, kind) is None
        )
        self._plans[(forced, device)] = plan
        return plan

    def choose(self, *args: Any, **kwargs: Any) -> str:
        return self._choose(args, kwargs)

    def _choose(self, args: tuple, kwargs: dict) -> str:
        if _is_compiling():  # trace the plain walk: a cache filled while tracing would be baked into the graph
            return self._choose_uncached(args, kwargs)
        forced = _forced_stack[-1] if _forced_stack else _ENV_BACKEND
        first = args[0] if args else None  # the first argument is nearly always the tensor to read it from
        device = first.device if isinstance(first, torch.Tensor) else _first_device(args, kwargs)
        plan = self._plans.get((forced, device))
        if plan is None:
            plan = self._plan(forced, device)
        for backend, supports in plan:
            if DISABLED and (self.name, backend) in DISABLED:
                continue
            if supports is None or supports(*args, **kwargs) is None:
                return backend
        if forced is None:
            return "reference"
        # Refused: the uncached walk finds the reason and raises it.
        return self._choose_uncached(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.impls[self._choose(args, kwargs)](*args, **kwargs)


REGISTRY: dict[str, Dispatcher] = {}
