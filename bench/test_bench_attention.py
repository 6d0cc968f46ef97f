"""pytest-benchmark timings of flash attention against SDPA (run explicitly: pytest bench/test_bench_attention.py).

On a GPU: bf16 prefill (batch 4, seqlen 4096, 16 heads of 128) and decode; on CPU: fp32, 8 heads of 64, seqlen 1024.
"""

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import _ext

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
OURS = "cuda" if GPU else "cpu"
SHAPE = (4, 4096, 16, 128) if GPU else (1, 1024, 8, 64)
DTYPE = torch.bfloat16 if GPU else torch.float32


def _inputs():
    return [torch.randn(SHAPE, device=DEVICE, dtype=DTYPE) for _ in range(3)]


@pytest.mark.skipif(not _ext.has_kernel("flash_attn_fwd", OURS.upper()), reason=f"no {OURS} attention kernel built")
@pytest.mark.parametrize("causal", [False, True])
def test_llmkernels_flash_attn_fwd(benchmark, synced, causal):
    q, k, v = _inputs()

    def fn():
        with llmkernels.use_backend(OURS):
            return llmkernels.flash_attn_func(q, k, v, causal=causal)

    benchmark(synced(fn))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_fwd(benchmark, synced, causal):
    q, k, v = (t.transpose(1, 2) for t in _inputs())
    benchmark(synced(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))


@pytest.mark.skipif(not GPU and not _ext.has_kernel("flash_attn_fwd", "CPU"), reason="no CPU attention kernel built")
def test_llmkernels_flash_attn_dropout_fwd_bwd(benchmark, synced):
    """Causal forward + backward with dropout_p 0.1 (on a GPU the Triton kernels: the CUDA C++ ones refuse it)."""
    q, k, v = (t.requires_grad_() for t in _inputs())

    def fn():
        llmkernels.flash_attn_func(q, k, v, 0.1, causal=True).sum().backward()

    benchmark(synced(fn))


@pytest.mark.skipif(not _ext.has_kernel("flash_attn_with_kvcache", OURS.upper()), reason=f"no {OURS} kernel built")
def test_llmkernels_decode(benchmark, synced):
    batch, context = (16, 8192) if GPU else (4, 2048)
    q = torch.randn(batch, 1, 32, 128, device=DEVICE, dtype=DTYPE)
    k_cache = torch.randn(batch, context, 8, 128, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    benchmark(synced(lambda: llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)))


@pytest.mark.skipif(not _ext.has_kernel("flash_attn_with_kvcache", "CPU"), reason="no CPU kernel built")
def test_llmkernels_decode_leftpad(benchmark, synced):
    """A left-padded batch's decode step (cache_leftpad: on a GPU the Triton decode kernel)."""
    batch, context = (16, 8192) if GPU else (4, 2048)
    q = torch.randn(batch, 1, 32, 128, device=DEVICE, dtype=DTYPE)
    k_cache = torch.randn(batch, context, 8, 128, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    pads = torch.arange(batch, dtype=torch.int32, device=DEVICE) * (context // (2 * batch))
    benchmark(synced(lambda: llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                                 cache_leftpad=pads)))  # fmt: skip


@pytest.mark.skipif(not GPU and not _ext.has_kernel("flash_attn_varlen_fwd", "CPU"), reason="no CPU varlen kernel")
def test_llmkernels_varlen_fwd(benchmark, synced):
    lengths = (1024, 37, 512, 300, 1, 700, 129, 64, 913, 250)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), SHAPE[2], SHAPE[3], device=DEVICE, dtype=DTYPE) for _ in range(3))
    benchmark(synced(lambda: llmkernels.flash_attn_varlen_func(q, k, v, cu, cu, 1024, 1024, causal=True)))
