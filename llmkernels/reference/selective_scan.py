"""Reference selective scan (Mamba's S6): the definition every scan backend is tested against.

Semantics are mamba_ssm's `selective_scan_fn` / `selective_state_update`, plus an initial state:
- u, delta: (batch, dim, seqlen); A: (dim, dstate) real; D, delta_bias: (dim,); z: (batch, dim, seqlen).
- B, C: constant (dim, dstate), per token (batch, dstate, seqlen), or grouped (batch, ngroups, dstate, seqlen)
  where channel d reads group d // (dim // ngroups).
- delta <- softplus(delta + delta_bias) when delta_softplus (softplus(x) = x above 20, as torch's);
  x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t, x_{-1} = initial_state (zeros when None);
  y_t = C_t . x_t + D * u_t; out = y * silu(z) when z is given; out in u's dtype.
- All arithmetic in fp32 (fp64 when u is fp64, so tests can take fp64 gradients); the state is fp32.
- seq_idx (batch, seqlen) ints (packed sequences, beyond mamba_ssm's selective_scan_fn): where
  seq_idx[b, t] != seq_idx[b, t - 1] a new sequence starts at t and its state starts from zero, not from x_{t-1};
  initial_state is the state before t = 0, so it belongs to the first sequence of each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sequence_runs(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, seqlen) renumbered 0, 1, ... per row so that each run of equal values is its own sequence (a
    value that comes back after another run starts a new one): how every op and reference reads packed sequences."""
    starts = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(starts[:, :1]), starts.cumsum(1, dtype=torch.int32)], dim=1)


def expand_bc(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (batch, dim, dstate, seqlen) per channel, or (dim, dstate) when constant."""
    if M.dim() == 2:
        return M
    if M.dim() == 3:  # (batch, dstate, seqlen): one B_t shared by every channel
        return M.unsqueeze(1).expand(M.shape[0], dim, M.shape[1], M.shape[2])
    ngroups = M.shape[1]
    return M.repeat_interleave(dim // ngroups, dim=1)  # (batch, ngroups, n, L) -> (batch, dim, n, L)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """out (batch, dim, seqlen) in u's dtype, and with return_last_state also x_{L-1} (batch, dim, dstate) fp32.

    Differentiable through autograd in every tensor argument. Loops over time one step at a time (memory
    O(batch * dim * dstate), never the (batch, dim, seqlen, dstate) tensor of all states).
    """
    dtype_in = u.dtype
    cd = compute_dtype(u)
    u, delta, A = u.to(cd), delta.to(cd), A.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    Bx, Cx = expand_bc(B.to(cd), dim), expand_bc(C.to(cd), dim)
    x = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(cd)
    # Per-step slices via unbind: its backward is one stack (indexing [..., t] would build a full-size
    # gradient at every step, quadratic in seqlen).
    deltas, us = delta.unbind(-1), u.unbind(-1)
    Bs = [Bx] * seqlen if Bx.dim() == 2 else Bx.unbind(-1)  # each (dim, n) or (batch, dim, n)
    Cs = [Cx] * seqlen if Cx.dim() == 2 else Cx.unbind(-1)
    # (batch, 1, 1) bool per step t >= 1: whether step t continues the sequence of step t - 1 (a where, not a
    # product: a new sequence must not inherit an inf or NaN state)
    carries = [None] * seqlen
    if seq_idx is not None and seqlen > 1:
        carries[1:] = (seq_idx[:, 1:] == seq_idx[:, :-1])[:, None, None, :].unbind(-1)
    ys = []
    for t in range(seqlen):
        dt = deltas[t][..., None]  # (batch, dim, 1)
        if carries[t] is not None:
            x = torch.where(carries[t], x, 0.0)
        x = torch.exp(dt * A) * x + dt * Bs[t] * us[t][..., None]
        ys.append((x * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1) if seqlen else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    out = y.to(dtype_in)
    if return_last_state:
        return out, x if cd == torch.float64 else x.float()
    return out


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of the scan: updates `state` in place and returns y (batch, dim) in x's dtype.

    state: (batch, dim, dstate) any float dtype (arithmetic fp32); x, dt, z: (batch, dim); A: (dim, dstate), or
    (dim,): one value per channel for all its state entries (Mamba-2's per-head A); B, C: (batch, dstate) or grouped
    (batch, ngroups, dstate); D, dt_bias: (dim,).
    state_batch_indices ((batch,) ints, mamba_ssm's; continuous batching): row b of x steps state row
    state_batch_indices[b] of a state with any number of rows (distinct indices); the other rows are untouched. A
    negative index (a pad slot, as vLLM's -1) leaves row b out: no state changes and its output is 0.
    """
    if state_batch_indices is not None:
        rows = state_batch_indices.long()
        live = rows >= 0
        picked = state[rows[live]]  # (a copy: stepped, then written back)
        part = lambda t: None if t is None else t[live]  # noqa: E731
        y_live = selective_state_update_ref(picked, x[live], dt[live], A, B[live], C[live], D, part(z), dt_bias,
                                            dt_softplus)  # fmt: skip
        state[rows[live]] = picked
        y = x.new_zeros(x.shape)
        y[live] = y_live
        return y
    cd = compute_dtype(x)
    dim = x.shape[1]
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    if B.dim() == 3:  # (batch, ngroups, n) -> (batch, dim, n)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    else:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    xf = x.to(cd)
    A = A if A.dim() == 2 else A[:, None]
    new_state = torch.exp(dt[..., None] * A.to(cd)) * state.to(cd) + dt[..., None] * B.to(cd) * xf[..., None]
    state.copy_(new_state)
    y = (new_state * C.to(cd)).sum(-1)
    if D is not None:
        y = y + xf * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """Explicit scalar loops in float64: an independent formulation to test the reference (tiny shapes only).

    Returns (out, last_state), both float64.
    """
    import math

    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    last = torch.zeros(batch, dim, dstate, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            state = [0.0 if initial_state is None else float(initial_state[b, d, n]) for n in range(dstate)]
            for t in range(seqlen):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = dt if dt > 20 else math.log1p(math.exp(dt))
                y = 0.0
                for n in range(dstate):
                    if B.dim() == 2:
                        b_n, c_n = float(B[d, n]), float(C[d, n])
                    elif B.dim() == 3:
                        b_n, c_n = float(B[b, n, t]), float(C[b, n, t])
                    else:
                        g = d // (dim // B.shape[1])
                        b_n, c_n = float(B[b, g, n, t]), float(C[b, g, n, t])
                    state[n] = math.exp(dt * float(A[d, n])) * state[n] + dt * b_n * float(u[b, d, t])
                    y += c_n * state[n]
                if D is not None:
                    y += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    zz = float(z[b, d, t])
                    y *= zz / (1.0 + math.exp(-zz))
                out[b, d, t] = y
            last[b, d] = torch.tensor(state, dtype=torch.float64)
    return out, last
