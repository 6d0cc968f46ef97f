"""Gated RMSNorm (Mamba-2's norm), the semantics of `llmkernels.rmsnorm_fn` (mamba_ssm's rmsnorm_fn):

    h = x * silu(z)                      when z is given and norm_before_gate is False (Mamba-2's layers)
    y = h / sqrt(mean(h^2) + eps) * weight (+ bias), the mean over each group of group_size channels
    y = y * silu(z)                      when z is given and norm_before_gate is True

All in fp32 (fp64 for fp64 x), weight and bias applied before the result is rounded to x's dtype (as mamba_ssm's
kernel; transformers' MambaRMSNormGated rounds before multiplying by the weight: one 16-bit rounding apart)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan import compute_dtype


def rmsnorm_gated_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      z: torch.Tensor | None = None, eps: float = 1e-6, group_size: int | None = None,
                      norm_before_gate: bool = True) -> torch.Tensor:  # fmt: skip
    cd = compute_dtype(x)
    group_size = x.shape[-1] if group_size is None else group_size
    h = x.to(cd)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cd))
    grouped = h.unflatten(-1, (-1, group_size))
    h = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(cd)
    if bias is not None:
        h = h + bias.to(cd)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cd))
    return h.to(x.dtype)
