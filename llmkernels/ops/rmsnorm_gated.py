"""Gated RMSNorm: `rmsnorm_fn` with mamba_ssm's signature (mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn), the norm
of Mamba-2's layers. Semantics: llmkernels/reference/rmsnorm_gated.py. Backends: reference (PyTorch ops), triton
(forward and backward kernels, llmkernels/triton/rmsnorm_gated.py: what a GPU runs; never run on one yet) and cpu
(llmkernels::rmsnorm_gated_fwd / _bwd). Each is differentiable.
"""

from __future__ import annotations

import numbers

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import register_fake
from ..reference.rmsnorm_gated import rmsnorm_gated_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

norm_dispatcher = Dispatcher("rmsnorm_fn")


# (x, weight, bias, z, eps, group_size, norm_before_gate): x and z (rows, H), group_size an int dividing H.
@norm_dispatcher.register("reference")
def _norm_reference(x, weight, bias, z, eps, group_size, norm_before_gate):
    return rmsnorm_gated_ref(x, weight, bias, z, eps, group_size, norm_before_gate)


def _triton_reason(x, weight, bias, z, eps, group_size, norm_before_gate) -> str | None:
    try:
        from ..triton.rmsnorm_gated import MAX_GROUP
    except ImportError as exc:
        return f"llmkernels.triton.rmsnorm_gated cannot be imported ({exc})"
    if group_size > MAX_GROUP:
        return f"group_size {group_size} > {MAX_GROUP}, the channels a Triton program holds"
    return None


@norm_dispatcher.register("triton", supports=_triton_reason)
def _norm_triton(x, weight, bias, z, eps, group_size, norm_before_gate):
    from ..triton.rmsnorm_gated import rmsnorm_gated_fwd_triton

    return rmsnorm_gated_fwd_triton(x, weight, bias, z, eps, group_size, norm_before_gate)


@norm_dispatcher.register("cpu", kernel="rmsnorm_gated_fwd")
def _norm_cpu(x, weight, bias, z, eps, group_size, norm_before_gate):
    return torch.ops.llmkernels.rmsnorm_gated_fwd(x, weight, bias, z, eps, group_size, norm_before_gate)


def check_norm_operands(fn: str, x, weight, bias, **like_x) -> int:
    """The checks a norm's operands share: x (..., hidden), weight and bias (hidden,) (bias may be None), and each
    like_x tensor (or None) of x's shape; every one fp32 / fp16 / bf16 on x's device. Returns hidden."""
    _checks.check_tensor(fn, "x", x, dtypes=DTYPES)
    if x.dim() == 0:
        raise ValueError(f"llmkernels.{fn}: x must have at least 1 dimension (..., hidden), got a scalar")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None or name == "weight":
            _checks.check_tensor(fn, name, t, ndim=1, dtypes=DTYPES, device=x.device)
            _checks.check_shape(fn, name, t, (hidden,))
    for name, t in like_x.items():
        if t is not None:
            _checks.check_tensor(fn, name, t, dtypes=DTYPES, device=x.device)
            _checks.check_shape(fn, name, t, tuple(x.shape))
    return hidden


def check_eps(fn: str, eps) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and _checks.finite(eps) and eps >= 0):
        raise ValueError(f"llmkernels.{fn}: eps must be a finite number >= 0, got {eps!r}")


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dimension in groups of `group_size` channels (all of them when None), times weight (+
    bias), gated by silu(z): after the norm (norm_before_gate True) or on x before it (False, Mamba-2's layers).

    x: (..., H) fp32 / fp16 / bf16; weight, bias: (H,); z: x's shape. Returns x's shape and dtype, computed in fp32;
    differentiable in x, weight, bias and z."""
    fn = "rmsnorm_fn"
    hidden = check_norm_operands(fn, x, weight, bias, z=z)
    group_size = hidden if group_size is None else group_size
    if not _checks.integral(group_size) or group_size <= 0 or (
        hidden % group_size
    ):
        raise ValueError(f"llmkernels.{fn}: group_size must be a positive int dividing the last dimension ({hidden}), "
                         f"got {group_size!r}")  # fmt: skip
    check_eps(fn, eps)
    group_size = int(group_size)
    out = norm_dispatcher(x.reshape(-1, hidden), weight, bias, None if z is None else z.reshape(-1, hidden),
                          float(eps), group_size, bool(norm_before_gate))  # fmt: skip
    return out.reshape(x.shape)


def grads_like(x, weight, bias, z):
    """The backward ops' outputs' metadata: (dx, dweight, dbias, dz), dbias / dz empty without bias / z."""
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        x.new_empty(0, dtype=torch.float32) if bias is None else bias.new_empty(bias.shape),
        x.new_empty(0, dtype=torch.float32) if z is None else z.new_empty(z.shape),
    )


def setup_context(ctx, inputs, output):
    x, weight, bias, z, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, weight, bias, z)
    ctx.args = (eps, group_size, norm_before_gate)


def backward_through(bwd):
    """The autograd formula of a forward op whose backward op is `bwd` (same arguments after dout)."""

    def backward(ctx, dout):
        x, weight, bias, z = ctx.saved_tensors
        dx, dweight, dbias, dz = bwd(dout, x, weight, bias, z, *ctx.args)
        return dx, dweight, dbias if bias is not None else None, dz if z is not None else None, None, None, None

    return backward


if _ext.loaded:

    @register_fake("llmkernels::rmsnorm_gated_fwd")
    def _norm_fwd_fake(x, weight, bias, z, eps, group_size, norm_before_gate):
        return x.new_empty(x.shape)

    @register_fake("llmkernels::rmsnorm_gated_bwd")
    def _norm_bwd_fake(dout, x, weight, bias, z, eps, group_size, norm_before_gate):
        return grads_like(x, weight, bias, z)

    torch.library.register_autograd("llmkernels::rmsnorm_gated_fwd",
                                    backward_through(torch.ops.llmkernels.rmsnorm_gated_bwd),
                                    setup_context=setup_context)  # fmt: skip
    _checks.refuse_double_backward("llmkernels::rmsnorm_gated_bwd")
