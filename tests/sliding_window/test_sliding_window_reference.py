"""The sliding-window reference against explicit float64 loops and against flash_attn_ref with the window."""

import pytest
import torch

from llmkernels.reference.attention import flash_attn_fwd_ref
from llmkernels.reference.sliding_window import (
    rolling_cache_append_ref,
    rolling_window_attn_ref,
    sliding_window_naive,
)

# (seqlen, window, nheads, nheads_k, softcap)
CASES = [(7, 1, 2, 2, 0.0), (9, 3, 4, 2, 0.0), (6, 6, 2, 1, 0.0), (11, 4, 2, 2, 3.0), (5, 17, 3, 1, 0.0)]


@pytest.mark.parametrize("seqlen,window,h,hk,softcap", CASES)
def test_window_convention_matches_naive_loops(seqlen, window, h, hk, softcap):
    # Query p sees max(0, p - W + 1) .. p: flash_attn's causal window (W - 1, 0), checked by explicit loops.
    q = torch.randn(2, seqlen, h, 8, dtype=torch.float64)
    k, v = (torch.randn(2, seqlen, hk, 8, dtype=torch.float64) for _ in range(2))
    out, _ = flash_attn_fwd_ref(q, k, v, 0.4, window - 1, 0, softcap)
    torch.testing.assert_close(out, sliding_window_naive(q, k, v, window, 0.4, softcap), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seqlen,window,h,hk,softcap", CASES)
@pytest.mark.parametrize("split", [0, 1, 3])
def test_ring_reference_matches_whole_sequence(seqlen, window, h, hk, softcap, split):
    # Feed the first `split` tokens through the ring, then the rest as one chunk: same as the whole sequence.
    split = min(split, seqlen - 1)
    q = torch.randn(1, seqlen, h, 8, dtype=torch.float64)
    k, v = (torch.randn(1, seqlen, hk, 8, dtype=torch.float64) for _ in range(2))
    k_ring = torch.randn(1, window, hk, 8, dtype=torch.float64)  # garbage in unused slots must not matter
    v_ring = torch.randn_like(k_ring)
    seqlens = torch.zeros(1, dtype=torch.int32)
    if split:
        rolling_cache_append_ref(k_ring, v_ring, k[:, :split], v[:, :split], seqlens)
        seqlens += split
    out = rolling_window_attn_ref(q[:, split:], k[:, split:], v[:, split:], k_ring, v_ring, seqlens, 0.4, softcap)
    expected = sliding_window_naive(q, k, v, window, 0.4, softcap)[:, split:]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_append_reference_keeps_last_window_tokens_in_their_slots():
    window, chunk = 4, 6
    k_ring, v_ring = torch.full((2, window, 1, 2), -1.0), torch.full((2, window, 1, 2), -1.0)
    k = torch.arange(2 * chunk * 2, dtype=torch.float32).reshape(2, chunk, 1, 2)
    seqlens = torch.tensor([0, 3], dtype=torch.int32)
    rolling_cache_append_ref(k_ring, v_ring, k, -k, seqlens)
    for b, n in enumerate(seqlens.tolist()):
        for t in range(chunk - window, chunk):  # positions n + t, the last `window` tokens
            assert torch.equal(k_ring[b, (n + t) % window], k[b, t])
            assert torch.equal(v_ring[b, (n + t) % window], -k[b, t])
