"""Residual add + LayerNorm / RMSNorm: `layer_norm_fn` and `rms_norm_fn` with mamba_ssm's signatures
(mamba_ssm.ops.triton.layer_norm, the same as flash_attn.ops.triton.layer_norm), the fused add-norm a pre-norm
block (MambaLMHeadModel's, with fused_add_norm) runs between its mixers. Semantics: llmkernels/reference/layer_norm.py.
Backends: reference (PyTorch ops), triton (llmkernels/triton/layer_norm.py: what a GPU runs; never run on one
yet) and cpu (llmkernels::add_norm_fwd / _bwd). Each is differentiable, prenorm's residual output too.

Not taken (NotImplementedError naming the argument): dropout_p > 0, rowscale, the second input of the parallel
form (x1, weight1, bias1) and return_dropout_mask.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import register_fake
from ..reference.layer_norm import layer_norm_ref, residual_dtype
from .rmsnorm_gated import DTYPES, check_eps, check_norm_operands

add_norm_dispatcher = Dispatcher("layer_norm_fn")


# (x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype): x, residual (rows, H). Returns (y, residual_out)
# with residual_out (x + residual in residual_out_dtype) None when residual_out_dtype is None.
@add_norm_dispatcher.register("reference")
def _add_norm_reference(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype):
    y, s = layer_norm_ref(x, weight, bias, residual, eps, prenorm=True, is_rms_norm=is_rms_norm)
    return y, None if residual_out_dtype is None else s.to(residual_out_dtype)


def _triton_reason(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype) -> str | None:
    try:
        from ..triton.layer_norm import MAX_HIDDEN
    except ImportError as exc:
        return f"llmkernels.triton.layer_norm cannot be imported ({exc})"
    if x.shape[1] > MAX_HIDDEN:
        return f"hidden size {x.shape[1]} > {MAX_HIDDEN}, the channels a Triton program holds"
    return None


@add_norm_dispatcher.register("triton", supports=_triton_reason)
def _add_norm_triton(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype):
    from ..triton.layer_norm import add_norm_fwd_triton

    y, res_out = add_norm_fwd_triton(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype)
    return y, None if residual_out_dtype is None else res_out


@add_norm_dispatcher.register("cpu", kernel="add_norm_fwd")
def _add_norm_cpu(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype):
    y, res_out = torch.ops.llmkernels.add_norm_fwd(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype)
    return y, None if residual_out_dtype is None else res_out


def _refuse(fn, x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask) -> None:
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale)):
        if value is not None:
            raise NotImplementedError(f"llmkernels.{fn}: {name} is not supported (only {name}=None)")
    if dropout_p != 0:
        raise NotImplementedError(f"llmkernels.{fn}: dropout_p={dropout_p!r} is not supported (only 0.0)")
    if return_dropout_mask:
        raise NotImplementedError(f"llmkernels.{fn}: return_dropout_mask=True is not supported")


def _check(fn, x, weight, bias, residual, eps) -> None:
    check_norm_operands(fn, x, weight, bias, residual=residual)
    check_eps(fn, eps)


def _args_ok(x, weight, bias, residual, eps) -> bool:
    """Whether _check would pass, tested the cheap way (no messages): _check runs only when this says no. A decode
    step runs two norms a layer, where the descriptive checks cost about as much as the kernel."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    dev, shape = x.device, x.shape
    return (
        len(shape) > 0
        and x.dtype in DTYPES
        and weight.dtype in DTYPES
        and weight.device == dev
        and weight.shape == shape[-1:]
        and (bias is None or (_checks.fits(bias, DTYPES, dev) and bias.shape == shape[-1:]))
        and (residual is None or (_checks.fits(residual, DTYPES, dev) and residual.shape == shape))
        and (type(eps) is float or (isinstance(eps, numbers.Real) and not isinstance(eps, bool)))
        and _checks.finite(eps)
        and eps >= 0
    )


def _add_norm(fn, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
              residual_in_fp32, is_rms_norm, return_dropout_mask):  # fmt: skip
    _refuse(fn, x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask)
    if not _args_ok(x, weight, bias, residual, eps):
        _check(fn, x, weight, bias, residual, eps)
    hidden = x.shape[-1]
    if residual is not None:
        res_dtype = residual.dtype
    else:
        res_dtype = residual_dtype(x, None, bool(residual_in_fp32))
    # without a residual to add or a dtype to change, the residual stream a prenorm call returns is x itself
    store_residual = bool(prenorm) and (residual is not None or res_dtype != x.dtype)
    rows = math.prod(x.shape[:-1])  # (not reshape(-1, hidden): ambiguous for hidden 0)
    y, res_out = add_norm_dispatcher(
        x.reshape(rows, hidden), None if residual is None else residual.reshape(rows, hidden), weight, bias,
        float(eps), bool(is_rms_norm), res_dtype if store_residual else None,
    )
    y = y.reshape(x.shape)
    if not prenorm:
        return y
    return y, res_out.reshape(x.shape) if store_residual else x


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                  return_dropout_mask=False):  # fmt: skip
    """LayerNorm (RMSNorm with is_rms_norm) of x + residual over the last dimension, times weight (+ bias).

    x, residual: (..., hidden) fp32 / fp16 / bf16 (their dtypes may differ: an fp32 residual stream beside bf16
    activations); weight, bias: (hidden,) or bias None. Returns y in x's dtype, computed in fp32; with prenorm
    (y, residual_out), residual_out = x + residual in residual's dtype (fp32 with residual_in_fp32 and no residual,
    else x's), the next block's residual. Differentiable in x, residual, weight and bias."""
    return _add_norm("layer_norm_fn", x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
                     prenorm, residual_in_fp32, is_rms_norm, return_dropout_mask)  # fmt: skip


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):  # fmt: skip
    """RMSNorm of x + residual: layer_norm_fn with is_rms_norm=True."""
    return _add_norm("rms_norm_fn", x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale,
                     prenorm, residual_in_fp32, True, return_dropout_mask)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Autograd of the C++ and Triton forward ops (both have a backward op of the same signature)
# --------------------------------------------------------------------------------------------------
def fwd_like(x, residual_out_dtype):
    """The forward ops' outputs' metadata: (y, residual_out), residual_out empty without residual_out_dtype."""
    if residual_out_dtype is None:
        return x.new_empty(x.shape), x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=residual_out_dtype)


def grads_like(x, residual, weight, bias):
    """The backward ops' outputs' metadata: (dx, dresidual, dweight, dbias), empty without residual / bias."""
    return (
        x.new_empty(x.shape),
        x.new_empty(0, dtype=torch.float32) if residual is None else residual.new_empty(residual.shape),
        weight.new_empty(weight.shape),
        x.new_empty(0, dtype=torch.float32) if bias is None else bias.new_empty(bias.shape),
    )


def setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype = inputs
    ctx.save_for_backward(x, residual, weight, bias)
    ctx.args = (eps, is_rms_norm)


def backward_through(bwd):
    """The autograd formula of a forward op whose backward op is `bwd`."""

    def backward(ctx, dy, dres_out):
        x, residual, weight, bias = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        if dres_out is not None and dres_out.numel() == 0:  # no residual_out was stored
            dres_out = None
        dx, dres, dweight, dbias = bwd(dy, dres_out, x, residual, weight, bias, *ctx.args)
        return (dx, dres if residual is not None else None, dweight, dbias if bias is not None else None, None,
                None, None)  # fmt: skip

    return backward


if _ext.loaded:

    @register_fake("llmkernels::add_norm_fwd")
    def _add_norm_fwd_fake(x, residual, weight, bias, eps, is_rms_norm, residual_out_dtype):
        return fwd_like(x, residual_out_dtype)

    @register_fake("llmkernels::add_norm_bwd")
    def _add_norm_bwd_fake(dy, dresidual_out, x, residual, weight, bias, eps, is_rms_norm):
        return grads_like(x, residual, weight, bias)

    torch.library.register_autograd("llmkernels::add_norm_fwd", backward_through(torch.ops.llmkernels.add_norm_bwd),
                                    setup_context=setup_context)  # fmt: skip
    _checks.refuse_double_backward("llmkernels::add_norm_bwd")
