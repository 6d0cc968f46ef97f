"""flash_attn_with_kvcache on each C++ backend: in-place cache updates, ragged rows, and decoding token by token
equal to one flash_attn_func call over the whole sequence."""

import pytest
import torch
from attn_cases import BACKENDS, DTYPES
from utils import assert_error_within_ratio, poison_

import llmkernels
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

# (nheads, nheads_k, headdim, causal, window_size, softcap)
CONFIGS = [
    (4, 4, 64, True, (-1, -1), 0.0),
    (8, 2, 128, True, (7, 0), 0.0),
    (4, 1, 40, False, (-1, -1), 10.0),
    (8, 8, 32, True, (0, 0), 0.0),
]


def _empty_cache(batch, capacity, nheads_k, d, dtype, device):
    """Caches whose unused slots hold NaN, so a kernel that reads past cache_seqlens + new tokens fails."""
    k_cache = poison_(torch.empty(batch, capacity, nheads_k, d, dtype=dtype, device=device))
    return k_cache, poison_(torch.empty_like(k_cache))


def _assert_close(out, ref_exact, ref_same):
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_exact.double(), rtol=1e-4, atol=1e-5)
    else:
        assert_error_within_ratio(out, ref_exact, ref_same, ratio=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,hk,d,causal,window,softcap", CONFIGS)
def test_ragged_cache_update_and_attention(backend, h, hk, d, causal, window, softcap):
    batch, capacity, s_new = 3, 150, 5
    for dtype in DTYPES[backend]:
        lens = torch.tensor([0, 17, 140], dtype=torch.int32, device=backend)
        k_cache, v_cache = _empty_cache(batch, capacity, hk, d, dtype, backend)
        for i, n in enumerate(lens.tolist()):  # fill each row's valid prefix
            k_cache[i, :n].normal_()
            v_cache[i, :n].normal_()
        q = torch.randn(batch, 3, h, d, dtype=dtype, device=backend)
        k_new = torch.randn(batch, s_new, hk, d, dtype=dtype, device=backend)
        v_new = torch.randn_like(k_new)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        kw = {"causal": causal, "window_size": window, "softcap": softcap}

        with llmkernels.use_backend(backend):
            out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, **kw)

        k_expect, v_expect = k_before.clone(), v_before.clone()
        ref = flash_attn_with_kvcache_ref(q, k_expect, v_expect, k_new, v_new, lens, upcast=True, **kw)
        same = flash_attn_with_kvcache_ref(q, k_before.clone(), v_before.clone(), k_new, v_new, lens, upcast=False,
                                           **kw)
        # The caches: new tokens at cache_seqlens[i], every other slot (NaN padding included) untouched.
        torch.testing.assert_close(k_cache, k_expect, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v_cache, v_expect, rtol=0, atol=0, equal_nan=True)
        _assert_close(out, ref, same)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,hk,d,causal,window,softcap", CONFIGS[:2])
def test_decoding_token_by_token_equals_one_call(backend, h, hk, d, causal, window, softcap):
    """Prefill 13 tokens through the cache, then append 20 one at a time: the concatenated outputs equal
    flash_attn_func over all 33 tokens."""
    batch, total, prefill = 2, 33, 13
    dtype = DTYPES[backend][0]
    q = torch.randn(batch, total, h, d, dtype=dtype, device=backend)
    k = torch.randn(batch, total, hk, d, dtype=dtype, device=backend)
    v = torch.randn_like(k)
    kw = {"causal": causal, "window_size": window, "softcap": softcap}
    k_cache, v_cache = _empty_cache(batch, 40, hk, d, dtype, backend)
    with llmkernels.use_backend(backend):
        outs = [llmkernels.flash_attn_with_kvcache(q[:, :prefill], k_cache, v_cache, k[:, :prefill], v[:, :prefill],
                                                   cache_seqlens=0, **kw)]
        for t in range(prefill, total):
            lens = torch.full((batch,), t, dtype=torch.int32, device=backend)
            outs.append(llmkernels.flash_attn_with_kvcache(q[:, t : t + 1], k_cache, v_cache, k[:, t : t + 1],
                                                           v[:, t : t + 1], cache_seqlens=lens, **kw))
        whole = llmkernels.flash_attn_func(q, k, v, **kw)
    torch.testing.assert_close(k_cache[:, :total], k, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_new_tokens_and_default_lengths(backend):
    """k = v = None attends to cache_seqlens keys; cache_seqlens=None means the whole cache."""
    dtype = DTYPES[backend][0]
    q = torch.randn(2, 1, 4, 64, dtype=dtype, device=backend)
    k_cache = torch.randn(2, 50, 2, 64, dtype=dtype, device=backend)
    v_cache = torch.randn_like(k_cache)
    with llmkernels.use_backend(backend):
        part = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(
            [20, 50], dtype=torch.int32, device=backend))
        full = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache)
    for out, lens in ((part, [20, 50]), (full, [50, 50])):
        ref = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, torch.tensor(lens, dtype=torch.int32))
        same = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, torch.tensor(lens, dtype=torch.int32),
                                           upcast=False)
        _assert_close(out, ref, same)


def test_flash_attn_positional_order_gets_a_named_error():
    """flash_attn 2.x takes rotary_cos, rotary_sin before cache_seqlens positionally; this op (the issue's signature)
    takes cache_seqlens, softmax_scale, causal after v and the rest by keyword. Calls in flash_attn's order say so
    rather than failing on a misplaced value; the keyword form of the same call runs."""
    q, kc = torch.randn(2, 1, 4, 16), torch.randn(2, 32, 2, 16)
    vc, k = torch.randn_like(kc), torch.randn(2, 1, 2, 16)
    cos, sin, lens = torch.randn(32, 8), torch.randn(32, 8), torch.tensor([3, 5], dtype=torch.int32)
    for args in ((q, kc, vc, k, k, cos, sin, lens), (q, kc, vc, None, None, None, None, lens),
                 (q, kc, vc, k, k, None, None, 5)):  # (an int length in causal's place: silently wrong otherwise)
        with pytest.raises(TypeError, match="arguments after v go by keyword"):
            llmkernels.flash_attn_with_kvcache(*args)
    # not misplaced: a 0-d tensor causal, a float lengths tensor passed by keyword (its own dtype error)
    llmkernels.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), cache_seqlens=lens, causal=torch.tensor(True))
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens.float())
    out = llmkernels.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, k, rotary_cos=cos, rotary_sin=sin,
                                             cache_seqlens=lens)  # fmt: skip
    assert out.shape == q.shape and torch.isfinite(out).all()
