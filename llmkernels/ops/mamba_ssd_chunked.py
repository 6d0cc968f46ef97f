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

Arithmetic in fp32 (fp64 inputs in fp64), autocast or not; the exponents are differences of a cumulative sum inside
one chunk and sums of whole chunks' totals (never differences of a sequence-long cumulative sum, which would cancel).
Within a chunk an exponent's error is ~|cum| x 6e-8, so only extreme decays lose digits (dt |A| ~ 150 per token:
1e-4 of y's largest values; mamba_ssm's kernels share this). Speed on the GPU has not been measured yet
(docs/GPU_SESSION.md); on the CPU the selective-scan kernel is faster, so the CPU does not take this route.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..reference.selective_scan import compute_dtype

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


def without_autocast(device: torch.device):
    """fp32 products whatever autocast says (bf16 products of the decay weights and states lose the chain's
    precision). Meta tensors (scripts/triton_aot_check.py) have no autocast to turn off."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def _ssd_chunked(x, dt, A, B, C, D, z, initial_states, seq_idx, Q: int):
    with without_autocast(x.device):
        return _ssd_chunked_fp32(x, dt, A, B, C, D, z, initial_states, seq_idx, Q)


class Chunked:
    """The inputs cut into chunks, shared by both chunked routes: fp32 (fp64), padded with dt = 0 to whole chunks (the
    identity step, so the final state is the last token's)."""

    def __init__(self, x, dt, A, B, initial_states, seq_idx, Q: int):
        self.batch, self.seqlen, self.nheads, self.headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        self.hg = self.nheads // self.ngroups  # heads per group
        self.cd = compute_dtype(x)
        self.Q, pad = Q, (-self.seqlen) % Q
        self.nchunks = (self.seqlen + pad) // Q
        b, c = self.batch, self.nchunks
        self.x = F.pad(x.to(self.cd), (0, 0, 0, 0, 0, pad))  # (b, Lp, h, p)
        self.B = F.pad(B.to(self.cd), (0, 0, 0, 0, 0, pad))  # (b, Lp, g, n)
        # (b, h, c, Q) contiguous: the Triton kernel reads it and cum alike (F.pad by 0 keeps the permuted strides)
        self.dt = F.pad(dt.to(self.cd).permute(0, 2, 1), (0, pad)).contiguous().view(b, self.nheads, c, Q)
        self.cum = (self.dt * A.to(self.cd)[:, None, None]).cumsum(-1)  # log-decay from the chunk's start
        self.init = initial_states
        self.seq = self.seq_end = self.rows = self.last = None
        if seq_idx is not None:
            seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1) if pad else seq_idx
            self.seq = seq.contiguous()  # (b, Lp)
            seq = self.seq.view(b, c, Q)
            # the sequence each chunk ends in, after the first run's (that of the initial state, before chunk 0)
            self.seq_end = torch.cat([seq[:, 0, :1], seq[..., -1]], dim=1).contiguous()  # (b, c + 1)
            self.last = seq == seq[..., -1:]  # (b, c, Q): tokens of the sequence their chunk ends in
            self.rows = seq == self.seq_end[:, :-1, None]  # tokens of the sequence whose state enters their chunk

    def chunk_major(self, C: torch.Tensor) -> torch.Tensor:
        """C (or B) padded and as (b, c, g, Q, dstate) fp32 (fp64)."""
        b, c, Q, g, n = self.batch, self.nchunks, self.Q, self.ngroups, self.dstate
        return F.pad(C.to(self.cd), (0, 0, 0, 0, 0, c * Q - self.seqlen)).view(b, c, Q, g, n).transpose(2, 3)

    def scores(self, C_cm: torch.Tensor) -> torch.Tensor:
        """C_i . B_j of every token pair in a chunk, (b, c, g, Q, Q): per group, shared by its heads. C_cm: from
        chunk_major."""
        b, c, Q, g, n = self.batch, self.nchunks, self.Q, self.ngroups, self.dstate
        return C_cm @ self.B.view(b, c, Q, g, n).permute(0, 1, 3, 4, 2)

    def states(self):
        """The states entering every chunk, (b, g, hg, c, dstate, headdim), and the final state (b, g, hg, dstate,
        headdim). A chunk's own contribution, sum_j exp(cum_end - cum_j) dt_j B_j x_j^T, is B^T @ (weighted x) with
        the group's heads side by side in the product's columns (x read in its own layout, B not repeated per head);
        then _pass_states."""
        b, c, Q, g, hg, n, p = self.batch, self.nchunks, self.Q, self.ngroups, self.hg, self.dstate, self.headdim
        exponent = self.cum[..., -1:] - self.cum  # (b, h, c, Q)
        if self.last is not None:  # (masked in the exponent: a select after the exp would leak NaN into gradients)
            exponent = exponent.masked_fill(~self.last[:, None], float("-inf"))
        to_end = torch.exp(exponent) * self.dt
        xw = self.x.view(b, c, Q, g * hg, p) * to_end.permute(0, 2, 3, 1)[..., None]
        states_t = self.B.view(b, c, Q, g, n).permute(0, 1, 3, 4, 2) @ xw.view(b, c, Q, g, hg * p).transpose(2, 3)
        states = states_t.view(b, c, g, n, hg, p).permute(0, 2, 4, 1, 3, 5)
        init = None
        if self.init is not None:
            init = self.init.to(self.cd).view(b, g, hg, p, n).transpose(-1, -2)
        return _pass_states(states, self.cum[..., -1].view(b, g, hg, c), init, self.seq_end)


def _ssd_chunked_fp32(x, dt, A, B, C, D, z, initial_states, seq_idx, Q: int):
    batch, seqlen, nheads, headdim = x.shape
    cd = compute_dtype(x)
    if seqlen == 0:  # no chunks: y is empty and the state is the initial one (the scan route's answer)
        final = x.new_zeros(batch, nheads, headdim, B.shape[3], dtype=cd)
        return x.new_empty(x.shape), final if initial_states is None else initial_states.to(cd) + final
    k = Chunked(x, dt, A, B, initial_states, seq_idx, Q)
    b, c, g, hg, n, p = batch, k.nchunks, k.ngroups, k.hg, k.dstate, headdim
    entering, final = k.states()
    C_cm = k.chunk_major(C)  # (b, c, g, Q, n)

    # Inside each chunk, per head: (C_i . B_j) exp(cum_i - cum_j) dt_j for j <= i (same sequence), times x.
    scores = k.scores(C_cm)
    cum = k.cum.view(b, g, hg, c, Q)
    visible = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if k.seq is not None:
        seq = k.seq.view(b, 1, 1, c, Q)
        visible = visible & (seq[..., :, None] == seq[..., None, :])
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~visible, float("-inf")))
    x_dt = k.x.view(b, c, Q, g, hg, p) * k.dt.view(b, g, hg, c, Q).permute(0, 3, 4, 1, 2)[..., None]
    y = (decay * scores.permute(0, 2, 1, 3, 4)[:, :, None]) @ x_dt.permute(0, 3, 4, 1, 2, 5)  # (b, g, hg, c, Q, p)

    # From the state entering the chunk: exp(cum_i) C_i . H_in for the tokens of that state's sequence. The heads side
    # by side again (C not repeated per head), and C's other rows zeroed as well as the product's: with an inf state,
    # a 0 row times it would still put NaN into C's gradient.
    if k.rows is not None:
        C_cm = torch.where(k.rows[:, :, None, :, None], C_cm, 0.0)
    entering_cm = entering.permute(0, 3, 1, 4, 2, 5).reshape(b, c, g, n, hg * p)
    from_state = (C_cm @ entering_cm).view(b, c, g, Q, hg, p)
    if k.rows is not None:
        from_state = torch.where(k.rows[:, :, None, :, None, None], from_state, 0.0)
    from_state = from_state * torch.exp(cum).permute(0, 3, 1, 4, 2)[..., None]
    # (token-major: x's layout; the add's output follows from_state's, which is that layout when there is one group)
    y = (from_state.transpose(2, 3) + y.permute(0, 3, 4, 1, 2, 5)).reshape(b, c * Q, nheads, p)[:, :seqlen]
    if D is not None:
        y = torch.addcmul(y, k.x[:, :seqlen], D.to(cd) if D.dim() == 2 else D.to(cd)[:, None])
    if z is not None:
        y = y * F.silu(z.to(cd))
    final = final.transpose(-1, -2).reshape(batch, nheads, headdim, n)
    # contiguous, as mamba_ssm's: callers .view y, and keep the state as a cache that decode steps update in place
    return y.to(x.dtype).contiguous(), final.contiguous()


def _pass_states(chunk_states, chunk_log_decay, init, seq_end):
    """The state entering every chunk (b, g, hg, c, d1, d2) and the final state (b, g, hg, d1, d2), for chunk states
    (b, g, hg, c, d1, d2): the two state dimensions in either order (Chunked.states passes (dstate, headdim)).

    Within a group of up to GROUP chunks, entry k of [carry, S_0, S_1, ...] reaches the state before chunk k' (k <= k')
    decayed by exp(sum of the chunk totals k .. k'-1): one (GROUP + 1)^2 matrix of segment sums per (batch, head) times
    the stacked states. The segment sums are running sums of the totals themselves (no differences of prefix sums)."""
    b, g, hg, c, d1, d2 = chunk_states.shape
    carry = init  # None: a zero state, left out of the sums
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
        out = (weights[..., 1:] @ chunk_states[:, :, :, g0:g1].flatten(-2)).view(b, g, hg, m + 1, d1, d2)
        if carry is not None:
            # By a select, not inside the product: a non-finite state (an inf initial state) must not turn the other
            # sequences' states into NaN through a weight of 0.
            carried = weights[..., 0, None, None] * carry[:, :, :, None]
            out = out + (carried if seq_end is None else torch.where(reach[..., 0, None, None], carried, 0.0))
        entering.append(out[:, :, :, :m])
        carry = out[:, :, :, m]
    if carry is None:  # (no chunks)
        carry = chunk_states.new_zeros(b, g, hg, d1, d2)
    return (entering[0] if len(entering) == 1 else torch.cat(entering, dim=3)), carry
