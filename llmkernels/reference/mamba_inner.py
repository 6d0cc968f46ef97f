"""Mamba's inner block (mamba_ssm's mamba_inner_fn): conv1d, the x / dt projections, the selective scan and the
output projection, from the in_proj output xz. The definition, written once over the two ops it composes:

    x, z = xz split in halves along channels                    (batch, d_inner, L) each
    x = silu(causal_conv1d(x, conv1d_weight, conv1d_bias))
    x_dbl = x^T @ x_proj_weight^T                               (batch, L, dt_rank + 2 * dstate) when B, C are
    delta = x_dbl[..., :dt_rank] @ delta_proj_weight^T          taken from x (B, C None), else (batch, L, dt_rank)
    B = x_dbl[..., dt_rank : dt_rank + dstate] (+ B_proj_bias), C = the next dstate columns (+ C_proj_bias)
    y = selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = y^T @ out_proj_weight^T (+ out_proj_bias)             (batch, L, d_model)

mamba_inner_ref runs it on the reference ops; llmkernels.mamba_inner_fn on the dispatched (fast) ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_ref
from .selective_scan import selective_scan_ref


def mamba_inner_ref(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    B_proj_bias: torch.Tensor | None = None,
    C_proj_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    conv_fn=causal_conv1d_ref,
    scan_fn=selective_scan_ref,
) -> torch.Tensor:
    """(batch, L, d_model); differentiable in every tensor through the ops it composes. See the module doc."""
    dstate = A.shape[-1]
    delta_rank = delta_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight  # (d_inner, 1, w) as nn.Conv1d
    x = conv_fn(x, weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, L, dt_rank [+ 2 * dstate])
    delta = F.linear(x_dbl[..., :delta_rank], delta_proj_weight).transpose(1, 2)  # (batch, d_inner, L)

    def from_x(start: int, bias: torch.Tensor | None) -> torch.Tensor:
        M = x_dbl[..., start : start + dstate]
        if bias is not None:
            M = M + bias.to(M.dtype)
        return M.transpose(1, 2)  # (batch, dstate, L): one B_t / C_t shared by every channel

    if B is None:
        B = from_x(delta_rank, B_proj_bias)
    if C is None:
        C = from_x(x_dbl.shape[-1] - dstate, C_proj_bias)
    y = scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
