"""Mamba-2's mixer after in_proj (mamba_ssm's mamba_split_conv1d_scan_combined, the fused training entry of its
Mamba2 module): split, conv1d, SSD scan, gated RMSNorm, out_proj. The definition, written once over the ops it
composes (the reference ones here; llmkernels.mamba_split_conv1d_scan_combined passes the dispatched ones):

    zx0, z, xBC, dt = zxbcdt split along channels into 2 * d_mlp, dim, dim + 2 * ngroups * dstate, nheads
                      (d_mlp, the width of an optional gated MLP beside the SSM, is what the other parts leave)
    xBC = causal_conv1d(xBC, conv1d_weight, conv1d_bias, seq_idx, activation)     over the sequence
    x, B, C = xBC split into dim, ngroups * dstate, ngroups * dstate     x as (heads, headdim), B / C as (groups, n)
    y = mamba_chunk_scan(x, dt, A, B, C, D, z if no rmsnorm_weight, dt_bias, initial_states, seq_idx, dt_softplus=True,
                         dt_limit)
    y = gated_rmsnorm(y, z, rmsnorm_weight) when rmsnorm_weight is given      z's gate inside (norm_before_gate False)
                                                                              or after the norm (True)
    y = [silu(zx0[:d_mlp]) * zx0[d_mlp:], y] when d_mlp > 0
    out = y @ outproj_weight^T + outproj_bias when outproj_weight is given

Returns out, or (out, final_states (batch, nheads, headdim, dstate) fp32) with return_final_states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_ref
from .mamba_chunk_scan import mamba_chunk_scan_ref
from .rmsnorm_gated import rmsnorm_gated_ref


def _scan_ref(x, dt, A, B, C, chunk_size, **kw):
    return mamba_chunk_scan_ref(x, dt, A, B, C, **kw)  # the recurrence has no chunks


def mamba_split_conv1d_scan_ref(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    conv_fn=causal_conv1d_ref,
    scan_fn=_scan_ref,
    norm_fn=rmsnorm_gated_ref,
):
    """See the module doc. D (nheads, headdim) or (nheads,) with headdim given; conv1d_weight (conv_dim, width) or
    nn.Conv1d's (conv_dim, 1, width). Differentiable in every tensor through the ops it composes."""
    nheads = D.shape[0]
    headdim = D.shape[1] if D.dim() == 2 else headdim
    dim = nheads * headdim
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    dstate = (weight.shape[0] - dim) // ngroups // 2
    d_mlp = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    zx0, z, xBC, dt = zxbcdt.split([2 * d_mlp, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    conv_kw = {} if seq_idx is None else {"seq_idx": seq_idx}
    xBC = conv_fn(xBC.transpose(1, 2), weight, conv1d_bias, activation=activation, **conv_kw)
    x, B, C = xBC.transpose(1, 2).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    batch, seqlen = zxbcdt.shape[:2]
    gate = z.unflatten(-1, (nheads, headdim))
    scan_kw = {} if seq_idx is None else {"seq_idx": seq_idx}
    result = scan_fn(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D, z=gate if rmsnorm_weight is None else None,
        dt_bias=dt_bias, initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states, **scan_kw,
    )  # fmt: skip
    y, final = result if return_final_states else (result, None)
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = norm_fn(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_mlp > 0:
        mlp_in, mlp_gate = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(mlp_in) * mlp_gate, y.to(zx0.dtype)], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y
