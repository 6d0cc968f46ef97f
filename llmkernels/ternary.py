"""llmkernels.ternary: BitNet b1.58 weight packing and quantisation helpers.

    pack_ternary(t) / unpack_ternary(packed, in_features)   int8 {-1, 0, 1} <-> 2-bit packed uint8
    quantize_weight(w) -> (w_packed, w_scale)                per-tensor absmean, packed
    quantize_activation(x) -> (x_q, s)                       per-token absmax int8
    ternary_matmul_int8(x_q, w_packed, in_features)          exact int32 x_q @ W_t^T
    ternary_linear(x, w_packed, w_scale, bias, act_bits)     the linear layer (also llmkernels.ternary_linear)

Packed layout: 256-weight blocks of 64 bytes, in_features padded to a multiple of 256 with zeros; byte j of
block b holds weights 256 b + 64 s + j (s = 0..3) at bits 2s..2s+1 as the code w + 1. Details in
llmkernels/reference/ternary.py. A (out, in) layer takes out * ceil(in / 256) * 64 bytes: 8x less than bf16.
"""

from __future__ import annotations

import torch

from ._checks import check_tensor
from .ops.ternary import quantize_activation, ternary_linear, ternary_matmul_int8
from .reference import ternary as _ref
from .reference.ternary import PACK_BLOCK, packed_shape, padded_in_features

__all__ = [
    "PACK_BLOCK",
    "pack_ternary",
    "packed_shape",
    "padded_in_features",
    "quantize_activation",
    "quantize_weight",
    "ternary_linear",
    "ternary_matmul_int8",
    "unpack_ternary",
]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """t: integer (out_features, in_features) with values in {-1, 0, 1} -> uint8 (out_features, K_pad // 4)."""
    check_tensor("pack_ternary", "t", t, ndim=2, dtypes=_INT_DTYPES)
    if t.shape[1] == 0:
        raise ValueError("llmkernels.pack_ternary: t must have at least one column (in_features > 0)")
    bad = (t < -1) | (t > 1)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"llmkernels.pack_ternary: t must hold only -1, 0, 1; t{list(idx)} = {t[idx].item()}")
    return _ref.pack_ternary_ref(t)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """packed: uint8 (out_features, K_pad // 4) -> int8 (out_features, in_features) in {-1, 0, 1}, exactly.

    in_features: the layer's width before packing padded it to K_pad (a multiple of 256); the padding is dropped."""
    check_tensor("unpack_ternary", "packed", packed, ndim=2, dtypes=(torch.uint8,))
    if in_features <= 0 or packed.shape[1] != padded_in_features(in_features) // 4:
        raise ValueError(
            f"llmkernels.unpack_ternary: packed must have {padded_in_features(max(in_features, 1)) // 4} columns "
            f"for in_features={in_features}, got shape {tuple(packed.shape)}"
        )
    w_t = _ref.unpack_ternary_ref(packed.contiguous(), in_features)
    if (w_t > 1).any():
        raise ValueError("llmkernels.unpack_ternary: packed holds the code 3, which is not a ternary weight")
    return w_t


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out_features, in_features) float -> (w_packed uint8 (out_features, K_pad // 4), w_scale fp32 0-dim).

    gamma = max(mean|w|, 1e-5); W_t = clamp(round(w / gamma), -1, 1); w is approximated by W_t * gamma."""
    check_tensor("quantize_weight", "w", w, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if w.shape[1] == 0:
        raise ValueError("llmkernels.quantize_weight: w must have at least one column (in_features > 0)")
    w_t, gamma = _ref.quantize_weight_ref(w)
    return _ref.pack_ternary_ref(w_t), gamma
