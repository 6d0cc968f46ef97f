"""Argument checks for the public functions: every message names the function and the argument.

The public ops run once a token, so each first tests its common case as one cheap boolean expression
(its `..._args_ok`, some of it through `fits` below) and runs these descriptive checks, which raise,
only when that says no. The two must agree on every input: tests/test_fast_checks.py compares them.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

try:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:  # (a torch without it: the plain truth value)
    guard_or_false = bool


def check_tensor(
    fn: str,
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"llmkernels.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"llmkernels.{fn}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            got = str(t.dtype).replace("torch.", "")
            raise TypeError(f"llmkernels.{fn}: {name} must have dtype in ({names}), got {got}")
    if device is not None and t.device != device:
        raise ValueError(f"llmkernels.{fn}: {name} must be on {device} like the other inputs, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"llmkernels.{fn}: {name} must be contiguous (call .contiguous())")
    if last_dim_contiguous and t.dim() > 0 and t.stride(-1) != 1:
        raise ValueError(f"llmkernels.{fn}: {name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_shape(fn: str, name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"llmkernels.{fn}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_same_dtype(fn: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"llmkernels.{fn}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


# The attention kernels take softmax_scale and softcap as fp32, and the CPU ones run with subnormals flushed to 0:
# a value below fp32's smallest normal number would be 0 there (a softcap of 1e-40: no cap at all), one past FLT_MAX
# inf. A softcap also enters as its reciprocal (s / c as s * (1 / c)), which flushes scores to 0 for caps much past
# 1e30; by then tanh(s / c) c equals s in fp32 for any score, so larger caps are refused as meaningless.
FP32_MIN_NORMAL, FP32_MAX, SOFTCAP_MAX = 1.1754943508222875e-38, 3.4028234663852886e38, 1e30


def _real(x) -> bool:
    # (float and int first: an ABC isinstance costs a decode step's checks ~0.2 us each)
    return type(x) is float or type(x) is int or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def finite(x) -> bool:
    """x is neither NaN nor infinite, written with comparisons only: under torch.compile(dynamic=True) x can be a
    SymFloat, which math.isfinite cannot take."""
    return x == x and -math.inf < x < math.inf


def integral(x) -> bool:
    """An int (Python, NumPy, or a SymInt under torch.compile / torch.export), not a bool."""
    return not isinstance(x, bool) and isinstance(x, (numbers.Integral, torch.SymInt))


def known_true(condition) -> bool:
    """A condition's value, or False where a trace cannot know it (a SymBool of an unbacked size: from .item())."""
    return guard_or_false(condition)


def fp32_positive(x, upper: float = FP32_MAX) -> bool:
    """Whether x is a real number (Python or NumPy, not bool) in [fp32's smallest normal, upper]."""
    return _real(x) and FP32_MIN_NORMAL <= x <= upper


def softcap_ok(softcap) -> bool:
    """0 (no cap), or a cap fp32 holds as a normal number up to SOFTCAP_MAX."""
    return _real(softcap) and (softcap == 0 or FP32_MIN_NORMAL <= softcap <= SOFTCAP_MAX)


def fits(t: object, dtypes: tuple[torch.dtype, ...], device: torch.device) -> bool:
    """Whether t is a tensor with a dtype in dtypes on device: check_tensor's common case as a bool, no message."""
    return isinstance(t, torch.Tensor) and t.dtype in dtypes and t.device == device


def register_fake(qualname: str):
    """torch.library.register_fake for an llmkernels op, refusing tensor arguments on different devices: a call
    that mixes meta (or fake) tensors with real ones reaches the fake kernel, not the C++ checks, and would
    otherwise return an uninitialised tensor. 0-dim CPU tensors may go with any device, as in PyTorch."""

    def wrap(fake):
        def checked(*args, **kwargs):
            devices = {
                a.device
                for a in (*args, *kwargs.values())
                if isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu")
            }
            if len(devices) > 1:
                names = ", ".join(sorted(str(d) for d in devices))
                op = qualname.replace("::", ".")
                raise RuntimeError(f"{op}: tensor arguments must be on one device, got {names}")
            return fake(*args, **kwargs)

        checked.__name__ = getattr(fake, "__name__", "fake")
        return torch.library.register_fake(qualname)(checked)

    return wrap


def refuse_double_backward(qualname: str) -> None:
    """Autograd of a C++ backward op (llmkernels::*_bwd) that raises: a second derivative (create_graph=True, e.g. a
    gradient penalty) through it is not implemented. Without this, torch's fallback warns and hands back zeros: a
    silently wrong answer. The reference backend differentiates twice."""
    name = qualname.split("::")[-1]

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"llmkernels: the C++ {name} op has no derivative of its own, so a second derivative (create_graph=True) "
            f"through it is not supported; run the forward and both backwards under llmkernels.use_backend('reference')"
        )

    torch.library.register_autograd(qualname, backward)


# --------------------------------------------------------------------------------------------------
# Pools of decode states (selective_state_update's state_batch_indices, causal_conv1d_update's conv_state_indices)
# --------------------------------------------------------------------------------------------------
def check_updated_in_place(fn: str, name: str, t: torch.Tensor) -> None:
    """A state the op updates in place must be contiguous: a contiguous copy would take the update, not t."""
    if not t.is_contiguous():
        raise ValueError(f"llmkernels.{fn}: {name} must be contiguous (it is updated in place, so a .contiguous() "
                         f"copy would not see the update); got strides {t.stride()}")  # fmt: skip


def has_no_overlap(t: torch.Tensor) -> bool:
    """Whether no two indices of t address one element (csrc/common/checks.h's rule): each stepping dimension's
    stride, in increasing order, lies past everything the smaller ones reach. Permutations and slices pass; broadcast
    (stride 0) views fail."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def check_no_overlap(fn: str, name: str, t: torch.Tensor) -> None:
    """A state the op updates in place through its strides (any layout) must not alias itself. (Not traced by
    torch.compile, which cannot sort symbolic strides: the C++ ops check again where they run.)"""
    if not torch.compiler.is_compiling() and not has_no_overlap(t):
        raise ValueError(f"llmkernels.{fn}: {name} is written in place and must not have overlapping elements (e.g. "
                         f"a broadcast view), got shape {tuple(t.shape)} and strides {t.stride()}")  # fmt: skip


def check_batch_ints(fn: str, name: str, t, x) -> None:
    """t: (batch,) int32 or int64 on x's device, one per row of x (pool indices, cache lengths)."""
    check_tensor(fn, name, t, ndim=1, dtypes=(torch.int32, torch.int64))
    if isinstance(x, torch.Tensor) and x.dim() >= 2:  # (else the op's own checks name x)
        check_tensor(fn, name, t, device=x.device)
        check_shape(fn, name, t, x.shape[:1])


def pool_indices(fn: str, name: str, indices, x) -> torch.Tensor:
    """Pool indices as the ops take them: (batch,) int32 contiguous on x's device. int64 (as index tensors often are)
    is narrowed with values past int32 saturating rather than wrapping, so they stay out of range."""
    check_batch_ints(fn, name, indices, x)
    if indices.dtype == torch.int64:
        indices = indices.clamp(-1, 2**31 - 1)
    return indices.to(torch.int32).contiguous()


def check_pool_index_values(fn: str, name: str, indices: torch.Tensor, pool_rows: int) -> None:
    """What the CPU kernels check, read back (the reference backends): below pool_rows, distinct unless negative
    (a pad slot)."""
    rows = indices.long()
    if rows.numel() and int(rows.max()) >= pool_rows:
        raise ValueError(f"llmkernels.{fn}: {name} must be below {pool_rows} (the state's rows; negative: a pad "
                         f"slot), got {rows.tolist()}")  # fmt: skip
    live = rows[rows >= 0]
    if live.unique().numel() != live.numel():
        raise ValueError(f"llmkernels.{fn}: {name} must be distinct, got {rows.tolist()}")
