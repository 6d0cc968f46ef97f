"""Reference sliding-window attention over a rolling KV buffer (Mistral 7B): the definition every backend
of `rolling_window_attn` / `rolling_cache_append` is tested against.

Window convention: a window of W means each query sees W keys *including itself*: the query at absolute
position p attends to positions max(0, p - W + 1) .. p. In flash_attn terms that is causal=True,
window_size=(W - 1, 0). This is what Mistral's reference code and Hugging Face's `sliding_window` do;
the Mistral paper's wording ("attends to W tokens of the previous layer") would read as W + 1 keys.

The cache is a ring: k_ring, v_ring (batch, W, nheads_k, headdim) hold absolute position p in slot p % W;
seqlens (batch,) int32 counts the tokens each row has seen, so a row holds positions
max(0, n - W) .. n - 1. A chunk of S new tokens at positions n .. n + S - 1 needs, besides itself, at most
the W - 1 newest ring entries (the oldest slot, position n - W, is already out of every new query's window),
so attention never depends on ring contents it is about to overwrite. Writing the chunk happens after.

This reference gathers those ring entries in position order and concatenates them with the chunk, then
calls the flash attention reference with the window aligned bottom-right: it is the definition, not a
kernel (the kernels read the ring in place).
"""

from __future__ import annotations

import torch

from .attention import flash_attn_fwd_ref


def ring_positions(seqlen: int, window: int) -> torch.Tensor:
    """Absolute positions, oldest first, of the ring entries a chunk starting at `seqlen` can see."""
    return torch.arange(max(0, seqlen - window + 1), seqlen)


def rolling_window_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    seqlens: torch.Tensor,
    softmax_scale: float,
    softcap: float = 0.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Sliding-window attention of a chunk against the ring plus itself.

    q: (batch, S, nheads, headdim) queries at absolute positions seqlens[i] .. seqlens[i] + S - 1
    k, v: (batch, S, nheads_k, headdim) the chunk's keys and values
    k_ring, v_ring: (batch, W, nheads_k, headdim) ring buffers (position p in slot p % W)
    seqlens: (batch,) int32 tokens seen before the chunk
    Returns (batch, S, nheads, headdim) in q's dtype. upcast: fp32 math (False: the inputs' precision).
    """
    window = k_ring.shape[1]
    outs = []
    for i, n in enumerate(seqlens.tolist()):
        slots = (ring_positions(n, window) % window).to(k_ring.device)
        keys = torch.cat([k_ring[i, slots], k[i]], dim=0).unsqueeze(0)
        values = torch.cat([v_ring[i, slots], v[i]], dim=0).unsqueeze(0)
        out, _ = flash_attn_fwd_ref(q[i : i + 1], keys, values, softmax_scale, window - 1, 0, softcap, upcast)
        outs.append(out)
    return torch.cat(outs, dim=0)


def rolling_cache_append_ref(
    k_ring: torch.Tensor, v_ring: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor
) -> None:
    """Write the chunk's last min(S, W) tokens into the rings, token t of row i at slot (seqlens[i] + t) % W.

    k, v: (batch, S, nheads_k, headdim); k_ring, v_ring: (batch, W, nheads_k, headdim), written in place.
    Earlier tokens of a chunk longer than the window would be overwritten anyway, so they are skipped.
    """
    window, chunk = k_ring.shape[1], k.shape[1]
    first = max(0, chunk - window)
    for i, n in enumerate(seqlens.tolist()):
        slots = (torch.arange(n + first, n + chunk) % window).to(k_ring.device)
        k_ring[i, slots] = k[i, first:]
        v_ring[i, slots] = v[i, first:]


def sliding_window_naive(q, k, v, window: int, softmax_scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Explicit loops in float64 over a whole sequence (no ring): query p attends to keys
    max(0, p - window + 1) .. p. q: (batch, L, nheads, headdim); k, v: (batch, L, nheads_k, headdim).
    An independent formulation to test the reference (tiny shapes only)."""
    import math

    b, seqlen, h, d = q.shape
    hk = k.shape[2]
    out = torch.zeros(b, seqlen, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for p in range(seqlen):
                keys = range(max(0, p - window + 1), p + 1)
                scores = []
                for j in keys:
                    s = softmax_scale * float((q[bi, p, hi].double() * k[bi, j, kh].double()).sum())
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    scores.append(s)
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                out[bi, p, hi] = sum(wi / z * v[bi, j, kh].double() for wi, j in zip(w, keys))
    return out
