"""Ternary (BitNet b1.58) linear: public functions, backend dispatch, fake kernels.

    ternary_linear(x, w_packed, w_scale, bias=None, act_bits=8)   x: (..., in_features) -> (..., out_features)
    quantize_(model, filter_fn=None, act_bits=8)                  nn.Linear -> nn.TernaryLinear, in place

Semantics and the packed weight layout: llmkernels/reference/ternary.py. Backends per op: reference (always),
cpu and cuda (C++ ops of csrc/ternary), triton (llmkernels/triton/ternary.py, imported on first use).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import _ext
from .._backend import Dispatcher
from .._checks import check_tensor, register_fake
from ..reference import ternary as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton():
    from ..triton import ternary as tri  # lazy: `import llmkernels` never imports triton

    return tri


# ------------------------------------------------------------------------------------------------------
# Dispatchers: one per C++ op. Arguments are already checked and 2-D (m, in_features) here.
# ------------------------------------------------------------------------------------------------------
quantize_activation_op = Dispatcher("ternary_quantize_activation")
matmul_int8_op = Dispatcher("ternary_matmul_int8")
linear_a8_op = Dispatcher("ternary_linear_a8")
linear_w2_op = Dispatcher("ternary_linear_w2")


@quantize_activation_op.register("reference")
def _(x):
    return ref.quantize_activation_ref(x)


@quantize_activation_op.register("cpu", kernel="ternary_quantize_activation")
@quantize_activation_op.register("cuda", kernel="ternary_quantize_activation")
def _(x):
    return torch.ops.llmkernels.ternary_quantize_activation(x)


@matmul_int8_op.register("reference")
def _(x_q, w_packed, in_features):
    return ref.ternary_matmul_int8_ref(x_q, w_packed, in_features)


@matmul_int8_op.register("cpu", kernel="ternary_matmul_int8")
@matmul_int8_op.register("cuda", kernel="ternary_matmul_int8")
def _(x_q, w_packed, in_features):
    return torch.ops.llmkernels.ternary_matmul_int8(x_q, w_packed, in_features)


def _triton_supports(x, w_packed, *args) -> str | None:
    if w_packed.numel() >= 2**31:  # (e.g. 262144 x 32768 weights)
        return "the Triton GEMM addresses weight rows with int32 offsets: fewer than 2^31 packed bytes"
    return None


@matmul_int8_op.register("triton", supports=_triton_supports)
def _(x_q, w_packed, in_features):
    return _triton().ternary_matmul_int8_triton(x_q, w_packed, in_features)


@linear_a8_op.register("reference")
def _(x, w_packed, w_scale, bias, in_features):
    return ref.ternary_linear_a8_ref(x, w_packed, w_scale, bias, in_features)


@linear_a8_op.register("cpu", kernel="ternary_linear_a8")
@linear_a8_op.register("cuda", kernel="ternary_linear_a8")
def _(x, w_packed, w_scale, bias, in_features):
    return torch.ops.llmkernels.ternary_linear_a8(x, w_packed, w_scale, bias, in_features)


@linear_a8_op.register("triton", supports=_triton_supports)
def _(x, w_packed, w_scale, bias, in_features):
    return _triton().ternary_linear_a8_triton(x, w_packed, w_scale, bias, in_features)


@linear_w2_op.register("reference")
def _(x, w_packed, w_scale, bias, in_features):
    return ref.ternary_linear_w2_ref(x, w_packed, w_scale, bias, in_features)


@linear_w2_op.register("cpu", kernel="ternary_linear_w2")
@linear_w2_op.register("cuda", kernel="ternary_linear_w2")
def _(x, w_packed, w_scale, bias, in_features):
    return torch.ops.llmkernels.ternary_linear_w2(x, w_packed, w_scale, bias, in_features)


@linear_w2_op.register("triton", supports=_triton_supports)
def _(x, w_packed, w_scale, bias, in_features):
    return _triton().ternary_linear_w2_triton(x, w_packed, w_scale, bias, in_features)


# ------------------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++ ops, for torch.compile and opcheck.
# ------------------------------------------------------------------------------------------------------
if _ext.loaded:

    @register_fake("llmkernels::ternary_quantize_activation")
    def _(x):
        # (contiguous whatever x's layout, as the kernels return it: empty_like would keep a transposed x's strides)
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @register_fake("llmkernels::ternary_matmul_int8")
    def _(x_q, w_packed, in_features):
        return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=torch.int32)

    @register_fake("llmkernels::ternary_linear_a8")
    def _(x, w_packed, w_scale, bias, in_features):
        return x.new_empty((x.shape[0], w_packed.shape[0]))

    @register_fake("llmkernels::ternary_linear_w2")
    def _(x, w_packed, w_scale, bias, in_features):
        return x.new_empty((x.shape[0], w_packed.shape[0]))


# ------------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------------
def check_packed(fn: str, w_packed: torch.Tensor, in_features: int, device: torch.device) -> None:
    check_tensor(fn, "w_packed", w_packed, ndim=2, dtypes=(torch.uint8,), device=device, contiguous=True)
    cols = ref.padded_in_features(in_features) // 4
    if w_packed.shape[1] != cols:
        raise ValueError(
            f"llmkernels.{fn}: w_packed must have {cols} columns for in_features={in_features} "
            f"(padded to {ref.padded_in_features(in_features)}, 4 weights a byte), got shape {tuple(w_packed.shape)}"
        )


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., in_features) fp16/bf16/fp32 -> (x_q int8 (..., in_features), s fp32 (...)), per-token absmax."""
    check_tensor("quantize_activation", "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"llmkernels.quantize_activation: x must have a non-empty last dimension, got {tuple(x.shape)}"
        )
    return quantize_activation_op(x.contiguous())


def ternary_matmul_int8(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x_q: (m, in_features) int8, w_packed: packed (out_features, K_pad // 4) -> int32 (m, out_features), exact.

    in_features: the weights' width before packing padded it to K_pad (x_q's columns)."""
    check_tensor("ternary_matmul_int8", "x_q", x_q, ndim=2, dtypes=(torch.int8,))
    if x_q.shape[1] != in_features:
        raise ValueError(f"llmkernels.ternary_matmul_int8: x_q must have {in_features} columns, got {tuple(x_q.shape)}")
    check_packed("ternary_matmul_int8", w_packed, in_features, x_q.device)
    return matmul_int8_op(x_q.contiguous(), w_packed, in_features)


def ternary_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int | None = 8,
) -> torch.Tensor:
    """BitNet b1.58 linear layer with packed ternary weights.

    x: (..., in_features) fp16/bf16/fp32; w_packed: uint8 (out_features, K_pad // 4) from
    llmkernels.ternary.quantize_weight / pack_ternary; w_scale: fp32 with one element (gamma);
    bias: (out_features,) in x's dtype or None. act_bits=8 quantises x per token to int8 (BitNet exactly);
    act_bits=None keeps x in its precision (weight-only). Returns (..., out_features) in x's dtype.
    """
    fn = "ternary_linear"
    if not _linear_args_ok(x, w_packed, w_scale, bias, act_bits):
        _check_linear_args(fn, x, w_packed, w_scale, bias, act_bits)  # raises, naming the argument
    shape = x.shape
    in_features, out_features, flat = shape[-1], w_packed.shape[0], len(shape) == 2
    # The ops take (m, in_features) and a 0-d scale; reshape costs a microsecond even when it changes nothing.
    x2 = x if flat else x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    scale = w_scale if w_scale.dim() == 0 else w_scale.reshape(())
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _TernaryLinearFn.apply(x2, w_packed, scale, bias, in_features, act_bits)
    else:
        y = _forward(x2, w_packed, scale, bias, in_features, act_bits)
    return y if flat else y.reshape(*shape[:-1], out_features)


def _linear_args_ok(x, w_packed, w_scale, bias, act_bits) -> bool:
    """Whether _check_linear_args would pass, tested the cheap way (no messages): it runs only when this says no.
    Each tensor attribute read costs ~0.1 us, so shapes are read once and len() stands in for dim()."""
    if not (isinstance(x, torch.Tensor) and isinstance(w_packed, torch.Tensor) and isinstance(w_scale, torch.Tensor)):
        return False
    shape, w_shape, dev = x.shape, w_packed.shape, x.device
    return (
        len(shape) > 0
        and shape[-1] > 0
        and x.dtype in FLOAT_DTYPES
        and w_packed.dtype == torch.uint8
        and w_packed.device == dev
        and len(w_shape) == 2
        and w_packed.is_contiguous()
        and w_shape[1] == ref.padded_in_features(shape[-1]) // 4
        and w_scale.dtype == torch.float32
        and w_scale.device == dev
        and w_scale.numel() == 1
        and (
            bias is None
            or (
                isinstance(bias, torch.Tensor)
                and bias.dtype == x.dtype
                and bias.device == dev
                and bias.shape == w_shape[:1]
            )
        )
        and act_bits in (8, None)
    )


def _check_linear_args(fn: str, x, w_packed, w_scale, bias, act_bits) -> None:
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"llmkernels.{fn}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    in_features = x.shape[-1]
    check_packed(fn, w_packed, in_features, x.device)
    check_tensor(fn, "w_scale", w_scale, dtypes=(torch.float32,), device=x.device)
    if w_scale.numel() != 1:
        raise ValueError(f"llmkernels.{fn}: w_scale must have one element, got shape {tuple(w_scale.shape)}")
    out_features = w_packed.shape[0]
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != out_features:
            raise ValueError(f"llmkernels.{fn}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if act_bits not in (8, None):
        raise ValueError(f"llmkernels.{fn}: act_bits must be 8 or None (weight-only), got {act_bits!r}")


def _forward(x2, w_packed, w_scale, bias, in_features, act_bits):
    op = linear_a8_op if act_bits == 8 else linear_w2_op
    return op(x2, w_packed, w_scale, bias, in_features)


class _TernaryLinearFn(torch.autograd.Function):
    """Gradients for x and bias, so adapters (LoRA) and layers before a frozen ternary layer can train.

    The activation quantisation is passed through (straight-through estimator, as nn.BitLinear does), so
    dx = dy @ (W_t * gamma) in both modes; the packed weights and their scale are frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x2, w_packed, w_scale, bias, in_features, act_bits):
        ctx.save_for_backward(w_packed, w_scale)
        ctx.in_features, ctx.has_bias = in_features, bias is not None
        return _forward(x2, w_packed, w_scale, bias, in_features, act_bits)

    @staticmethod
    def backward(ctx, dy):
        w_packed, w_scale = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            w_t = ref.unpack_ternary_ref(w_packed, ctx.in_features)
            dx = ((dy.float() @ w_t.float()) * w_scale.float()).to(dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(0)
        return dx, None, None, dbias, None, None


def default_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Every nn.Linear except an LM head (a module whose own name is `lm_head` or `output`)."""
    name = fqn.rsplit(".", 1)[-1]
    return isinstance(module, torch.nn.Linear) and name not in ("lm_head", "output")


# Linear layers whose parents read their weight directly: swapping them breaks or bypasses the parent.
_KEEP = (torch.nn.modules.linear.NonDynamicallyQuantizableLinear,)
_READS_WEIGHTS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
# Mamba-1 mixers (llmkernels.nn.MambaMixer, transformers' Mamba, FalconMamba, Jamba mixers, mamba_ssm's Mamba) take
# dt_proj's weight into the scan's delta themselves (its bias goes in as the scan's delta_bias): that child stays.
_MAMBA1_MIXERS = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer", "ZambaMambaMixer", "Mamba")


def _is_transformers_bitnet(module: torch.nn.Module) -> bool:
    """transformers' AutoBitLinear (an nn.Linear subclass): already ternary with its own scale, or a training layer
    with its own RMSNorm; quantize_ must not requantise it (patch_model converts the offline ones exactly)."""
    return type(module).__module__ == "transformers.integrations.bitnet"


def _reads_weight_of(parent: torch.nn.Module, child_name: str) -> bool:
    if isinstance(parent, _READS_WEIGHTS):
        return True
    return child_name == "dt_proj" and any(cls.__name__ in _MAMBA1_MIXERS for cls in type(parent).__mro__)


def quantize_(
    model: torch.nn.Module,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    act_bits: int | None = 8,
) -> torch.nn.Module:
    """Replace, in place, every nn.Linear of `model` that filter_fn(module, fqn) accepts with an nn.TernaryLinear.

    filter_fn defaults to `default_filter`: all nn.Linear except ones named `lm_head` or `output` (embeddings
    are not nn.Linear, so they stay too). Only nn.Linear modules are ever replaced, whatever filter_fn says, and
    never one whose parent reads its weight itself instead of calling it (nn.MultiheadAttention's out_proj, a
    NonDynamicallyQuantizableLinear; nn.TransformerEncoderLayer / DecoderLayer's linear1 and linear2, which their
    fast paths hand to a fused kernel; a Mamba-1 mixer's dt_proj, whose weight the mixer folds into the scan's
    delta): swapped, those would fail or bypass the ternary layer. Nor transformers' AutoBitLinear (an nn.Linear
    already ternary with its own scale, or BitNet's training layer): llmkernels.integrations.transformers.patch_model
    converts the offline ones exactly. TernaryLinear is an inference layer: in training mode transformers' Mamba-1
    mixers also hand x_proj's and out_proj's weights to their fused kernel and fail (BitLinear is the training layer).
    A BitLinear keeps the act_bits it was trained with (as its to_ternary() does); act_bits applies to plain
    nn.Linear. A Linear that several parents share stays one module (one TernaryLinear for all of them), unless
    filter_fn rejects one of its names.
    Returns the model (as torchao's quantize_ does).
    """
    from ..nn.ternary import BitLinear, TernaryLinear

    accept = filter_fn if filter_fn is not None else default_filter
    if isinstance(model, torch.nn.Linear) and accept(model, ""):
        raise ValueError("llmkernels.quantize_: model is itself an nn.Linear; wrap it or use TernaryLinear.from_linear")
    swapped: dict[int, TernaryLinear] = {}  # id(nn.Linear) -> its replacement: tied modules stay tied
    for fqn, module in list(model.named_modules()):  # each parent once (a cyclic graph must not recurse)
        for child_name, child in list(module._modules.items()):  # (named_children skips a repeated module)
            child_fqn = f"{fqn}.{child_name}" if fqn else child_name
            if isinstance(child, _KEEP) or _is_transformers_bitnet(child) or _reads_weight_of(module, child_name):
                continue
            if isinstance(child, torch.nn.Linear) and accept(child, child_fqn):
                if id(child) not in swapped:
                    bits = child.act_bits if isinstance(child, BitLinear) else act_bits
                    swapped[id(child)] = TernaryLinear.from_linear(child, act_bits=bits)
                setattr(module, child_name, swapped[id(child)])
    return model
