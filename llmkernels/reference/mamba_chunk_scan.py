"""Reference Mamba-2 scan (SSD): the definition of llmkernels.mamba_chunk_scan_combined, mamba_ssm's
mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined semantics.

Shapes: x, z (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A (nheads,) (negative: the per-head decay
rate); B, C (batch, seqlen, ngroups, dstate), head h reading group h // (nheads / ngroups); D (nheads,) or (nheads,
headdim); dt_bias (nheads,); initial_states (batch, nheads, headdim, dstate).

    dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)          per (batch, t, head); mamba_ssm clamps even with the
                                                                default (0, inf): a negative dt without softplus is 0
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T                 h: (headdim, dstate) per (batch, head), h_{-1} = the
                                                                initial state (0 when none)
    y_t  = h_t C_t + D x_t,  y_t *= silu(z_t) when z is given

Packed sequences: seq_idx (batch, seqlen) ints; where seq_idx[:, t] != seq_idx[:, t - 1] a sequence starts at t
and h_{t-1} is replaced by 0 (initial_states belong to each row's first sequence). cu_seqlens (nseqs + 1,) with
return_varlen_states (batch 1, as mamba_ssm): also the state at the end of each sequence cu_seqlens[k] ..
cu_seqlens[k + 1], (nseqs, nheads, headdim, dstate) fp32 (an empty sequence's is 0: initial_states is the state
before token 0, so it belongs to the sequence that holds token 0).

Arithmetic in fp32 (fp64 inputs stay fp64); y in x's dtype; the final states (batch, nheads, headdim, dstate) fp32.
mamba_ssm computes this chunk by chunk (chunk_size) with matrix products inside a chunk and the recurrence
between chunks; the chunking changes only rounding, so chunk_size is not part of the definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .selective_scan import compute_dtype


def processed_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                 dt_limit: tuple[float, float], dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """dt as the recurrence uses it (batch, seqlen, nheads) in `dtype`: bias, softplus (F.softplus's threshold 20 is
    mamba_ssm's too), then the clamp to dt_limit."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return dt.clamp(min=lo if lo > -math.inf else None, max=hi if hi < math.inf else None)


def mamba_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_varlen_states: bool = False,
):
    """The recurrence above, one step at a time (tests: small shapes). Returns y, (y, final_states),
    (y, varlen_states) or (y, final_states, varlen_states), mamba_ssm's order."""
    cd = compute_dtype(x)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    dt = processed_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    Bh = B.to(cd).repeat_interleave(heads_per_group, dim=2)  # (batch, seqlen, nheads, dstate)
    Ch = C.to(cd).repeat_interleave(heads_per_group, dim=2)
    xf = x.to(cd)
    if initial_states is not None:
        state = initial_states.to(cd)
    else:
        state = torch.zeros(batch, nheads, headdim, dstate, dtype=cd, device=x.device)
    ends = {}  # token index -> the sequences that end there (varlen states)
    if return_varlen_states:
        if seq_idx is None:
            raise ValueError("return_varlen_states needs seq_idx (the packed sequences)")
        bounds = [int(v) for v in cu_seqlens]
        varlen = [None] * (len(bounds) - 1)
        for k in range(len(bounds) - 1):
            if bounds[k + 1] > bounds[k]:
                ends.setdefault(bounds[k + 1] - 1, []).append(k)
            else:  # no tokens: zero (initial_states is the state before token 0, so it belongs to the sequence there)
                varlen[k] = torch.zeros_like(state[0])
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            state = torch.where((seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None], state, 0.0)
        decay = torch.exp(dt[:, t] * A.to(cd))[:, :, None, None]  # (batch, nheads, 1, 1)
        inject = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay * state + inject
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
        for k in ends.get(t, []):
            varlen[k] = state[0]
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    if D is not None:
        y = y + xf * (D.to(cd) if D.dim() == 2 else D.to(cd)[:, None])
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    out = (y,)
    if return_final_states:
        out += (state.to(torch.float32) if cd == torch.float32 else state,)
    if return_varlen_states:
        out += (torch.stack(varlen).to(torch.float32 if cd == torch.float32 else cd),)
    return out if len(out) > 1 else y
