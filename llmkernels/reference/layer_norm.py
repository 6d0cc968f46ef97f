"""Residual add + LayerNorm / RMSNorm, the semantics of `llmkernels.layer_norm_fn` / `rms_norm_fn` (mamba_ssm's and
flash_attn's fused add-norm, what a pre-norm block runs between its mixers):

    s = x + residual                        (residual optional), in fp32 (fp64 for fp64 x)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias)       LayerNorm, var the biased variance
    y = s / sqrt(mean(s^2) + eps) * weight (+ bias)                RMSNorm (is_rms_norm)
    y in x's dtype; the norm reads s unrounded, weight and bias applied before y is rounded.

With prenorm it also returns the new residual stream, s in the residual's dtype: residual's when one is given,
else fp32 with residual_in_fp32, else x's (then it is x itself)."""

from __future__ import annotations

import torch

from .selective_scan import compute_dtype


def residual_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of the residual stream a prenorm call returns."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else x.dtype


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, eps: float = 1e-6, prenorm: bool = False,
                   residual_in_fp32: bool = False, is_rms_norm: bool = False):  # fmt: skip
    cd = compute_dtype(x)
    s = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
    if is_rms_norm:
        h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        centred = s - s.mean(-1, keepdim=True)
        h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    h = h * weight.to(cd)
    if bias is not None:
        h = h + bias.to(cd)
    y = h.to(x.dtype)
    if not prenorm:
        return y
    return y, s.to(residual_dtype(x, residual, residual_in_fp32))
