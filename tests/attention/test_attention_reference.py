"""The attention reference against explicit float64 loops."""

import pytest
import torch

from llmkernels.reference.attention import attention_naive, flash_attn_fwd_ref, flash_attn_with_kvcache_ref

CASES = [
    # (seqlen_q, seqlen_k, nheads, nheads_k, window_left, window_right, softcap)
    (5, 5, 2, 2, -1, -1, 0.0),
    (5, 5, 4, 2, -1, 0, 0.0),
    (3, 7, 4, 1, -1, 0, 0.0),
    (7, 3, 2, 1, -1, 0, 0.0),  # seqlen_q > seqlen_k: the first rows see no key
    (6, 9, 2, 2, 2, 0, 0.0),
    (6, 6, 2, 2, 1, 2, 5.0),
    (1, 6, 2, 2, 0, 0, 0.0),
]


@pytest.mark.parametrize("sq,sk,h,hk,left,right,softcap", CASES)
def test_reference_matches_naive_loops(sq, sk, h, hk, left, right, softcap):
    q = torch.randn(2, sq, h, 8, dtype=torch.float64)
    k = torch.randn(2, sk, hk, 8, dtype=torch.float64)
    v = torch.randn(2, sk, hk, 8, dtype=torch.float64)
    out, lse = flash_attn_fwd_ref(q, k, v, 0.3, left, right, softcap)
    naive = attention_naive(q, k, v, 0.3, left, right, softcap)
    torch.testing.assert_close(out, naive, rtol=1e-10, atol=1e-12)
    assert lse.shape == (2, h, sq)


def test_rows_that_see_no_key_are_zero_with_lse_minus_inf():
    q, k, v = (torch.randn(1, n, 1, 4) for n in (6, 3, 3))
    out, lse = flash_attn_fwd_ref(q, k, v, 0.5, -1, 0, 0.0)
    assert torch.equal(out[0, :3], torch.zeros(3, 1, 4))
    assert torch.isinf(lse[0, 0, :3]).all() and torch.isfinite(lse[0, 0, 3:]).all()


def test_kvcache_reference_appends_and_matches_full_attention():
    b, h, hk, d, cap = 2, 4, 2, 8, 12
    k_cache = torch.randn(b, cap, hk, d, dtype=torch.float64)
    v_cache = torch.randn(b, cap, hk, d, dtype=torch.float64)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    q = torch.randn(b, 2, h, d, dtype=torch.float64)
    k_new, v_new = torch.randn(b, 2, hk, d, dtype=torch.float64), torch.randn(b, 2, hk, d, dtype=torch.float64)
    out = flash_attn_with_kvcache_ref(q, k_cache, v_cache, k_new, v_new, lens, 0.4, causal=True)
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(k_cache[i, n : n + 2], k_new[i])
        expect = attention_naive(q[i : i + 1], k_cache[i : i + 1, : n + 2], v_cache[i : i + 1, : n + 2], 0.4, -1, 0)
        torch.testing.assert_close(out[i : i + 1], expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sq, sk", [(5, 9), (9, 5), (7, 7)])
def test_huge_window_bounds_mean_no_bound(sq, sk):
    """A window bound that excludes no key, up to 2^63 - 1, equals -1 (no bound): the band's i + shift +- bound must
    not wrap in int64 and hide every key (the kernels fold such bounds the same way)."""
    from llmkernels.reference.attention import visible_mask

    huge = 2**63 - 1
    for left, right in ((huge, -1), (-1, huge), (huge, huge), (huge, 0), (sk, sq), (3, huge)):
        want = visible_mask(sq, sk, -1 if left >= sk else left, -1 if right >= sq else right)
        torch.testing.assert_close(visible_mask(sq, sk, left, right), want)
    assert visible_mask(sq, sk, huge, huge).all()
