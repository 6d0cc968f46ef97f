"""Reference depthwise causal conv1d (the `causal_conv1d` package's semantics), as Mamba uses it.

- x: (batch, dim, seqlen); weight: (dim, width), width 2..4; bias: (dim,).
- out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k], x = 0 before t = 0;
  then SiLU when activation is "silu" / "swish". Arithmetic in fp32 (fp64 for fp64 x); out in x's dtype.
- initial_states (batch, dim, width - 1): the inputs before t = 0, oldest first (instead of zeros), as a chunked
  prefill continues a sequence; the final states are the last width - 1 inputs (from initial_states / zeros when
  seqlen < width - 1).
- seq_idx (batch, seqlen) ints, packed sequences: tap x[s] counts for out[t] only when s and t are in one run of equal
  seq_idx values (each sequence is convolved as if it stood alone; a value that returns after another run is a new
  sequence, as in the ops). Not together with
  initial_states (as causal_conv1d). The final states then hold the last sequence's inputs only (zeros before it).
- Decode (`causal_conv1d_update_ref`): conv_state (batch, dim, state_len), state_len >= width - 1, holds the
  last state_len inputs, oldest first (width: Hugging Face MambaMixer's and mamba_ssm's cache; width - 1: vLLM's).
  A step appends x (batch, dim) to them, shifting the state left by one, and returns the convolution over the
  last `width` inputs, x included (with state_len = width: sum(conv_state * weight) + bias after the step).
  With cache_seqlens ((batch,) ints; causal_conv1d's circular state) nothing shifts: x is token number
  cache_seqlens[b] of its sequence, stored in slot cache_seqlens[b] mod state_len, and the window's earlier
  inputs are the slots of the width - 1 positions before it (mod state_len, Python's remainder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan import compute_dtype, sequence_runs


def _check_activation(activation: str | None) -> bool:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (batch, dim, seqlen) in x's dtype; differentiable through autograd. See the module doc."""
    silu = _check_activation(activation)
    cd = compute_dtype(x)
    dim, width = weight.shape
    seqlen = x.shape[-1]
    if seqlen == 0 or dim == 0:  # (F.conv1d refuses empty inputs; x * 0 keeps the result in x's graph)
        return x * 0
    if seq_idx is not None:  # one shifted, masked product per tap: the taps that cross a sequence start read 0
        seq_idx = sequence_runs(seq_idx)
        xc, w = x.to(cd), weight.to(cd)
        out = xc * w[:, -1:] + (0 if bias is None else bias.to(cd)[:, None])
        for shift in range(1, min(width, seqlen + 1)):
            same = (seq_idx[:, shift:] == seq_idx[:, :-shift])[:, None, :]  # (batch, 1, seqlen - shift)
            tap = torch.where(same, xc[..., :-shift], 0.0) * w[:, width - 1 - shift, None]
            out = out + F.pad(tap, (shift, 0))
        return (F.silu(out) if silu else out).to(x.dtype)
    xc = x.to(cd)
    if initial_states is not None:  # the inputs before t = 0 take the zero padding's place
        xc = torch.cat([initial_states.to(cd), xc], dim=-1)
    pad = width - 1 if initial_states is None else 0
    out = F.conv1d(xc, weight.to(cd).unsqueeze(1), None if bias is None else bias.to(cd), padding=pad, groups=dim)
    out = out[..., :seqlen] if initial_states is None else out
    return (F.silu(out) if silu else out).to(x.dtype)


def conv1d_final_states_ref(
    x: torch.Tensor, width: int, initial_states: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The last width - 1 inputs (batch, dim, width - 1) in x's dtype, continuing initial_states (or zeros).

    With seq_idx, those of the last sequence only (inputs of earlier sequences read 0), so that the result is the
    initial_states that continues the last sequence (causal_conv1d refuses seq_idx with return_final_states)."""
    history = x if initial_states is None else torch.cat([initial_states.to(x.dtype), x], dim=-1)
    history = F.pad(history, (max(0, width - 1 - history.shape[-1]), 0))
    final = history[..., history.shape[-1] - (width - 1) :]
    seqlen = x.shape[-1]
    if seq_idx is None or seqlen == 0:
        return final
    pos = torch.arange(seqlen - (width - 1), seqlen, device=x.device)  # the final states' positions in x
    seq_idx = sequence_runs(seq_idx)
    same = (pos >= 0) & (seq_idx[:, pos.clamp(min=0)] == seq_idx[:, -1:])  # (batch, width - 1)
    return torch.where(same[:, None, :], final, 0)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state_indices: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step: conv_state (batch, dim, state_len >= width - 1) updated in place; returns (batch, dim) in
    x's dtype. cache_seqlens ((batch,) ints): the state is a circular buffer and x is token cache_seqlens[b].
    x (batch, dim, seqlen): seqlen steps, token t at cache_seqlens + t; returns (batch, dim, seqlen).
    conv_state_indices ((batch,) ints, causal_conv1d's; continuous batching): row b of x steps row
    conv_state_indices[b] of a state of any number of rows (distinct indices); the other rows are untouched. A
    negative index (a pad slot) leaves row b out: no state changes and its output is 0."""
    if x.dim() == 3:  # token by token: each step's state is the next one's input
        # (positions mod state_len first: lens + t would wrap past int64's range, where Python's integers do not)
        lens = None if cache_seqlens is None else cache_seqlens.long().remainder(conv_state.shape[-1])
        steps = [causal_conv1d_update_ref(x[:, :, t], conv_state, weight, bias, activation, conv_state_indices,
                                          None if lens is None else lens + t) for t in range(x.shape[2])]  # fmt: skip
        return torch.stack(steps, dim=-1) if steps else x.new_empty(x.shape)
    if conv_state_indices is not None:
        rows = conv_state_indices.long()
        live = rows >= 0
        picked = conv_state[rows[live]]  # (a copy: stepped, then written back)
        out = x.new_zeros(x.shape)
        lens = None if cache_seqlens is None else cache_seqlens[live]
        out[live] = causal_conv1d_update_ref(x[live], picked, weight, bias, activation, cache_seqlens=lens)
        conv_state[rows[live]] = picked
        return out
    silu = _check_activation(activation)
    cd = compute_dtype(x)
    state_len, taps = conv_state.shape[-1], weight.shape[1] - 1  # taps: the window's inputs before x
    if state_len < taps:
        raise ValueError(f"conv_state holds {state_len} inputs, fewer than width - 1 = {taps}")
    new = x.to(cd).unsqueeze(-1)  # (batch, dim, 1): enters the sum unrounded, as the kernels
    # (the window is a new tensor, made before the state changes: .to(cd) may return a view of it)
    if cache_seqlens is None:
        window = torch.cat([conv_state[:, :, state_len - taps :].to(cd), new], dim=-1)  # (batch, dim, width)
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], new.to(conv_state.dtype)], dim=-1))
    else:
        pos = cache_seqlens.long().remainder(state_len)  # (batch,): x's slot
        slots = (pos[:, None] + torch.arange(-taps, 0, device=x.device)).remainder(state_len)  # (batch, taps)
        window = torch.cat([conv_state.gather(2, slots[:, None, :].expand(-1, x.shape[1], -1)).to(cd), new], dim=-1)
        conv_state.scatter_(2, pos[:, None, None].expand(-1, x.shape[1], 1), new.to(conv_state.dtype))
    out = (window * weight.to(cd)).sum(-1)
    if bias is not None:
        out = out + bias.to(cd)
    return (F.silu(out) if silu else out).to(x.dtype)


def causal_conv1d_varlen_states_ref(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """The conv states after a packed prefill (causal_conv1d's causal_conv1d_varlen_states): x (total_tokens, dim)
    holds sequence b in rows cu_seqlens[b]:cu_seqlens[b + 1]; state b (dim, state_len) is its last state_len inputs,
    oldest first, zeros before a sequence shorter than that. Returned as (batch, dim, state_len), a view of
    (batch, state_len, dim) memory (causal_conv1d's layout)."""
    batch, dim = cu_seqlens.shape[0] - 1, x.shape[1]
    states = x.new_zeros(batch, state_len, dim)
    for b in range(batch):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        n = min(end - start, state_len)
        if n > 0:
            states[b, state_len - n :] = x[end - n : end]
    return states.transpose(1, 2)


def causal_conv1d_naive(x, weight, bias=None, silu=False) -> torch.Tensor:
    """Explicit loops in float64, an independent formulation to test the reference (tiny shapes only)."""
    import math

    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            for t in range(seqlen):
                acc = float(bias[d]) if bias is not None else 0.0
                for k in range(width):
                    s = t - (width - 1) + k
                    if s >= 0:
                        acc += float(weight[d, k]) * float(x[b, d, s])
                if silu:
                    acc = acc / (1.0 + math.exp(-acc))
                out[b, d, t] = acc
    return out
