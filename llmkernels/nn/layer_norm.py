"""mamba_ssm's norm modules with a fused residual add (mamba_ssm.ops.triton.layer_norm.RMSNorm / LayerNorm):
forward(x, residual=None, prenorm=False, residual_in_fp32=False) is `rms_norm_fn` / `layer_norm_fn` with the
module's weight, bias and eps."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.layer_norm import layer_norm_fn, rms_norm_fn


def _no_dropout(cls: str, dropout_p: float) -> None:
    if dropout_p != 0:
        raise NotImplementedError(f"llmkernels.nn.{cls}: dropout_p={dropout_p!r} is not supported (only 0.0)")


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with an optional residual added first (no bias, as mamba_ssm's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout_p: float = 0.0, device=None, dtype=None):
        super().__init__()
        _no_dropout("RMSNorm", dropout_p)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)  # fmt: skip


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension (with its weight and bias) and an optional residual added first."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout_p: float = 0.0, device=None, dtype=None):
        super().__init__(hidden_size, eps=eps, device=device, dtype=dtype)
        _no_dropout("LayerNorm", dropout_p)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return layer_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32)  # fmt: skip
