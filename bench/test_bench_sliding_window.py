"""pytest-benchmark timings of rolling-cache decode (run explicitly: pytest bench/test_bench_sliding_window.py).

On a GPU: bf16, batch 4, 32 query / 8 KV heads of 128, W = 4096, context 8 W; on CPU: fp32, batch 1,
8 / 2 heads of 64, W = 256.
"""

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import _ext
from llmkernels.reference.attention import visible_mask

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
OURS = "cuda" if GPU else "cpu"
BATCH, H, HK, D, W = (4, 32, 8, 128, 4096) if GPU else (1, 8, 2, 64, 256)
DTYPE = torch.bfloat16 if GPU else torch.float32
CONTEXT = 8 * W


def _decode_inputs():
    q = torch.randn(BATCH, 1, H, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(BATCH, 1, HK, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return q, k, v


@pytest.mark.skipif(not _ext.has_kernel("rolling_window_attn", OURS.upper()), reason=f"no {OURS} kernel built")
def test_rolling_cache_decode(benchmark, synced):
    q, k, v = _decode_inputs()
    cache = llmkernels.RollingKVCache(BATCH, W, HK, D, dtype=DTYPE, device=DEVICE)

    def fn():
        cache.seqlens.fill_(CONTEXT)
        with llmkernels.use_backend(OURS):
            return llmkernels.sliding_window_attn_with_cache(q, k, v, cache)

    benchmark(synced(fn))


def test_sdpa_full_cache_window_mask_decode(benchmark, synced):
    q, _, _ = _decode_inputs()
    k_full, v_full = (torch.randn(BATCH, HK, CONTEXT + 1, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    mask = visible_mask(1, CONTEXT + 1, W - 1, 0, DEVICE)
    qt = q.transpose(1, 2)
    benchmark(synced(lambda: F.scaled_dot_product_attention(qt, k_full, v_full, attn_mask=mask, enable_gqa=True)))
