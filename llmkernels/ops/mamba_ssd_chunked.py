"""Mamba-2's scan (SSD) as chunked matrix products in PyTorch ops: mamba_chunk_scan_combined's route on a GPU.

The selective-scan kernels walk every state entry (head, headdim, dstate) along the sequence with an exp each: at
Mamba-2's dstate 64-256 that is 4-16x the state updates of Mamba-1's dstate 16 per channel, all on the SFU. Mamba-2's
decay is one scalar per (token, head), so the Mamba-2 paper's block decomposition applies: cut the sequence into
chunks of Q tokens; inside a chunk the output is a masked, decay-weighted "attention" (C B^T) x, a (Q x Q) matrix
product per head; the state a chunk hands on is one (headdim x dstate) product per chunk; and the states entering
the chunks follow from the chunk states by a short recurrence over chunks, here a (chunks x chunks) decay matrix
times the stacked chunk states. Everything is a batched matrix product or an elementwise op on (Q x Q) tiles, which
the tensor cores / cuBLAS and fused elementwise kernels serve, with one exp per (head, token pair) instead of one per
state entry. Gradients come from autograd over these ops; with gradients the forward is checkpointed (recomputed in
the backward) so that what autograd keeps is the inputs, not the (Q x Q) tiles.

Math per (batch, head), dt already processed (bias, softplus, clamp), a_t = dt_t A, cum_i = sum_{t <= i} a_t within a
chunk:
    y_i      = sum_{j <= i in chunk} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) C_i . H_in   (H_in: the state
                                                                                                    entering the chunk)
    S_chunk  = sum_j exp(cum_end - cum_j) dt_j x_j B_j^T                                     (what the chunk adds)
    H_in(k)  = sum_{m < k} exp(sum of a over chunks m+1 .. k-1) S_m + exp(sum of a over chunks 0 .. k-1) H_initial
Packed sequences (seq_idx, renumbered runs 0, 1, ...): a term between two tokens counts only when they are in the same
sequence; a chunk's state keeps the tokens of the sequence it ends in; the initial state belongs to the first run.

Non-finite values: an inf initial state stays in the first sequence (selects, as the scan's reset); an inf or NaN
inside a packed sequence can reach the other sequences of the chunks it shares (a product by a 0 weight there).

Arithmetic in fp32 (fp64 inputs in fp64); the exponents are differences inside one chunk and sums of whole chunks'
totals (never differences of a sequence-long cumulative sum, which would cancel). Speed on the GPU has not been
measured yet (docs/GPU_SESSION.md); on the CPU the selective-scan kernel is faster, so the CPU does not take this route.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 64  # tokens per chunk: the (Q x Q) tiles and the (chunks x headdim x dstate) states are then both ~x's size
GROUP = 64  # chunks whose entering states come from one (GROUP + 1)^2 decay matrix; groups chain sequentially


def ssd_chunked(x, dt, A, B, C, D=None, z=None, initial_states=None, seq_idx=None, chunk: int | None = None):
    """y (x's shape and dtype) and the final states (batch, nheads, headdim, dstate) fp32 (fp64 for fp64 x).

    x, z (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads) already processed; A (nheads,); B, C (batch,
    seqlen, ngroups, dstate); D (nheads,) or (nheads, headdim); initial_states (batch, nheads, headdim, dstate);
    seq_idx (batch, seqlen) int32 runs renumbered from 0 (ops.selective_scan.checked_seq_idx). Inputs are checked by
    the caller."""
    args = (x, dt, A, B, C, D, z, initial_states, seq_idx)
    chunk = CHUNK if chunk is None else chunk
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
    if needs_grad:
        return checkpoint(_ssd_chunked, *args, chunk, use_reentrant=False)
    return _ssd_chunked(*args, chunk)


def _ssd_chunked(x, dt, A, B, C, D, z, initial_states, seq_idx, Q: int):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    hg = nheads // ngroups  # heads per group
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    pad = (-seqlen) % Q
    xf, dtf, Bf, Cf = x.to(cd), dt.to(cd), B.to(cd), C.to(cd)
    if pad:  # dt = 0 past the end: the identity step, so the final state is the last token's
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = F.pad(dtf, (0, 0, 0, pad))
    nchunks = (seqlen + pad) // Q

    # Layouts: per head (batch, group, head in group, chunk, token, ...); B / C (batch, group, chunk, token, dstate).
    dt_h = dtf.view(batch, nchunks, Q, ngroups, hg).permute(0, 3, 4, 1, 2)
    cum = (dt_h * A.to(cd).view(ngroups, hg, 1, 1)).cumsum(-1)  # (b, g, hg, c, Q): log-decay from the chunk start
    x_h = xf.view(batch, nchunks, Q, ngroups, hg, headdim).permute(0, 3, 4, 1, 2, 5)
    B_g = Bf.view(batch, nchunks, Q, ngroups, dstate).permute(0, 3, 1, 2, 4)
    C_g = Cf.view(batch, nchunks, Q, ngroups, dstate).permute(0, 3, 1, 2, 4)

    same_seq = None  # (b, 1, 1, c, Q, Q): token pairs of one sequence
    seq_last = None  # (b, 1, 1, c, Q): tokens in the sequence their chunk ends in
    if seq_idx is not None:
        seq = seq_idx if not pad else torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
        seq = seq.view(batch, 1, 1, nchunks, Q)
        same_seq = seq[..., :, None] == seq[..., None, :]
        seq_last = seq == seq[..., -1:]

    # Inside each chunk: (C_i . B_j) exp(cum_i - cum_j) dt_j for j <= i, times x.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    visible = causal if same_seq is None else causal & same_seq
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~visible, float("-inf")))
    scores = (C_g @ B_g.transpose(-1, -2))[:, :, None]  # (b, g, 1, c, Q, Q), shared by the group's heads
    y = (decay * scores * dt_h[..., None, :]) @ x_h  # (b, g, hg, c, Q, p)

    # What each chunk hands on: sum_j exp(cum_end - cum_j) dt_j x_j B_j^T.
    to_end = torch.exp(cum[..., -1:] - cum) * dt_h
    if seq_last is not None:
        to_end = torch.where(seq_last, to_end, 0.0)
    chunk_states = (x_h * to_end[..., None]).transpose(-1, -2) @ B_g[:, :, None]  # (b, g, hg, c, p, n)

    init = None if initial_states is None else initial_states.to(cd).view(batch, ngroups, hg, headdim, dstate)
    seq_end = None
    if seq_idx is not None:  # the sequence each chunk ends in, with the first run's before chunk 0 (initial state)
        seq_end = torch.cat([seq[..., :1, 0], seq[..., -1]], dim=-1)[:, 0, 0]  # (b, c + 1)
    entering, final = _pass_states(chunk_states, cum[..., -1], init, seq_end)

    # From the state entering the chunk: exp(cum_i) C_i . H_in, for tokens of the sequence that state belongs to.
    from_state = C_g[:, :, None] @ entering.transpose(-1, -2)  # (b, g, hg, c, Q, p)
    from_state = from_state * torch.exp(cum)[..., None]
    if seq_idx is not None:
        from_state = torch.where((seq == seq_end[:, None, None, :-1, None])[..., None], from_state, 0.0)
    y = y + from_state

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + xf[:, :seqlen] * (D.to(cd) if D.dim() == 2 else D.to(cd)[:, None])
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype).contiguous(), final.reshape(batch, nheads, headdim, dstate)  # (contiguous: callers .view y)


def _pass_states(chunk_states, chunk_log_decay, init, seq_end):
    """The state entering every chunk (b, g, hg, c, p, n) and the final state (b, g, hg, p, n).

    Within a group of up to GROUP chunks, entry k of [carry, S_0, S_1, ...] reaches the state before chunk k' (k <= k')
    decayed by exp(sum of the chunk totals k .. k'-1): one (GROUP + 1)^2 matrix of segment sums per (batch, head) times
    the stacked states. The segment sums are running sums of the totals themselves (no differences of prefix sums)."""
    b, g, hg, c, p, n = chunk_states.shape
    carry = init if init is not None else chunk_states.new_zeros(b, g, hg, p, n)
    entering = []
    for g0 in range(0, c, GROUP):
        g1 = min(c, g0 + GROUP)
        m = g1 - g0
        # totals[r] for r = 1..m: chunk g0 + r - 1's total; seg[k', k] = sum_{k < r <= k'} totals[r]
        totals = F.pad(chunk_log_decay[..., g0:g1], (1, 0))  # (b, g, hg, m + 1)
        r = torch.arange(m + 1, device=totals.device)
        seg = (totals[..., :, None] * (r[:, None] > r[None, :])).cumsum(-2)
        reach = r[:, None] >= r[None, :]  # entry k reaches target k' >= k
        if seq_end is not None:
            ends = seq_end[:, g0:g1 + 1]  # (b, m + 1): the sequence of each entry and of each target
            reach = reach & (ends[:, :, None] == ends[:, None, :])[:, None, None]
        weights = torch.exp(seg.masked_fill(~reach, float("-inf")))  # (b, g, hg, m + 1, m + 1)
        out = (weights[..., 1:] @ chunk_states[:, :, :, g0:g1].flatten(-2)).view(b, g, hg, m + 1, p, n)
        # The carried state by a select, not inside the product: a non-finite state (an inf initial state) must not
        # turn the other sequences' states into NaN through a weight of 0.
        carried = weights[..., 0, None, None] * carry[:, :, :, None]
        out = out + (carried if seq_end is None else torch.where(reach[..., 0, None, None], carried, 0.0))
        entering.append(out[:, :, :, :m])
        carry = out[:, :, :, m]
    return torch.cat(entering, dim=3), carry
