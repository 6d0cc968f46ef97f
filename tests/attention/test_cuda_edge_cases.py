"""CUDA flash attention edge cases the main grids miss: head dims that run on a larger compiled kernel (40, 80,
136) and the 192 kernel, split-KV with rows that see no key, long-context decode from a KV cache (batch 1, so
the host splits the keys), GQA decode with several new tokens, and a backward whose dout is not 16-byte aligned.
All cuda-marked: they run on the GPU machine only."""

import pytest
import torch
from attn_cases import DTYPES, check_flash_attn, check_lengths_past_the_capacity, random_qkv, run_kvcache_cuda
from utils import assert_error_within_ratio, poison_

import llmkernels
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

pytestmark = pytest.mark.cuda

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap)
PADDED_HEADDIM_CASES = [
    (2, 113, 200, 8, 2, 40, True, (-1, -1), 0.0),  # runs on the 64 kernel
    (1, 77, 77, 4, 4, 80, False, (17, 5), 0.0),  # runs on the 96 kernel, no GQA (dk, dv stored directly)
    (2, 64, 129, 4, 1, 136, False, (-1, -1), 15.0),  # runs on the 192 kernel, MQA, soft-capped
    (1, 50, 50, 4, 4, 136, True, (-1, -1), 0.0),
    (1, 130, 257, 4, 2, 192, True, (-1, -1), 0.0),
    (2, 33, 65, 2, 2, 192, False, (-1, -1), 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("case", PADDED_HEADDIM_CASES, ids=str)
def test_padded_and_192_head_dims(dtype, case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    check_flash_attn(
        "cuda", random_qkv(b, sq, sk, h, hk, d, dtype, "cuda"), causal=causal, window_size=window, softcap=softcap
    )


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
def test_split_kv_with_rows_that_see_no_key(dtype):
    """7 CTAs over 3 key tiles: the host splits the keys; causal with seqlen_q > seqlen_k leaves the first 50
    rows with no key in any split (out 0, lse -inf through the combine and the backward)."""
    check_flash_attn("cuda", random_qkv(1, 200, 150, 2, 1, 64, dtype, "cuda"), causal=True)


def _check_kvcache(lens, capacity, s_new, seqlen_q, nheads, nheads_k, headdim, dtype, **kw):
    """flash_attn_with_kvcache on CUDA against the reference; cache slots past each row's keys hold NaN."""
    batch = len(lens)
    k_cache = poison_(torch.empty(batch, capacity, nheads_k, headdim, dtype=dtype, device="cuda"))
    v_cache = poison_(torch.empty_like(k_cache))
    for i, n in enumerate(lens):
        k_cache[i, :n].normal_()
        v_cache[i, :n].normal_()
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, device="cuda")
    k_new = torch.randn(batch, s_new, nheads_k, headdim, dtype=dtype, device="cuda") if s_new else None
    v_new = torch.randn_like(k_new) if s_new else None
    out, exact, same = run_kvcache_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, **kw)
    assert_error_within_ratio(out, exact, same, ratio=2.0)


# (lens, capacity, s_new, headdim, window_size): batch 1, one query, 2 KV heads -> a 2-CTA grid, so the host
# picks num_splits > 1 on any GPU; a narrow window leaves most splits empty (lse -inf in the combine).
LONG_CONTEXT_CASES = [
    ([6000], 8192, 1, 128, (-1, -1)),
    ([6000], 8192, 1, 80, (-1, -1)),
    ([6000], 8192, 1, 256, (1000, 0)),
    ([5000], 5000, 0, 64, (100, 0)),  # no new token, the full cache
]


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("lens,capacity,s_new,d,window", LONG_CONTEXT_CASES, ids=str)
def test_long_context_decode_split_kv(dtype, lens, capacity, s_new, d, window):
    _check_kvcache(lens, capacity, s_new, 1, 8, 2, d, dtype, causal=True, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("d,window,softcap", [(64, (-1, -1), 0.0), (96, (20, 0), 0.0), (40, (-1, -1), 10.0)], ids=str)
def test_gqa_decode_several_new_tokens(dtype, d, window, softcap):
    """16 query heads on 2 KV heads (group 8: 4 queries x 8 heads = 32 packed rows), 4 new tokens per row,
    ragged cache lengths including an empty cache."""
    _check_kvcache([0, 37, 300], 320, 4, 4, 16, 2, d, dtype, causal=True, window_size=window, softcap=softcap)


def test_backward_with_unaligned_dout():
    """torch.cat's backward hands out a gradient view at storage offset 4 (8 bytes): the CUDA backward must
    copy it, not refuse it, and give the gradients of the same dout made contiguous."""
    inputs = random_qkv(1, 40, 40, 4, 2, 64, torch.float16, "cuda")

    def grads(unaligned):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with llmkernels.use_backend("cuda"):
            out = llmkernels.flash_attn_func(*leaves, causal=True)
        if unaligned:
            torch.cat([out.new_zeros(4), out.reshape(-1)]).float().mul(w).sum().backward()
        else:
            out.backward(w[4:].view(out.shape).to(out.dtype))
        return [t.grad for t in leaves]

    w = torch.randn(4 + inputs[0].numel(), device="cuda").half().float()  # fp16-exact, so both douts agree
    for name, a, b in zip(("dq", "dk", "dv"), grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batch_times_heads_past_grid_y(backend):
    """2080 x 32 = 66560 (batch, head) programs: more than grid y takes (65535), so no kernel may put
    batch * nheads on one of grid y / z (the Triton kernels did), forward and backward."""
    check_flash_attn(backend, random_qkv(2080, 3, 5, 32, 8, 32, torch.float16, "cuda"), causal=True)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kvcache_more_row_blocks_than_grid_z(backend):
    """Triton decode packs group * seqlen_q rows in blocks of 16 (head dim > 64): 16 x 65536 rows make 65536
    row blocks, past grid z's 65535. Non-causal against a 20-key cache keeps the work small."""
    q = torch.randn(1, 65536, 16, 80, dtype=torch.float16, device="cuda")
    k_cache = poison_(torch.empty(1, 32, 1, 80, dtype=torch.float16, device="cuda"))
    v_cache = poison_(torch.empty_like(k_cache))
    k_cache[:, :20].normal_()
    v_cache[:, :20].normal_()
    lens = torch.tensor([20], dtype=torch.int32, device="cuda")
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    exact = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, lens, upcast=True)
    same = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, lens, upcast=False)
    assert_error_within_ratio(out, exact, same, ratio=2.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kvcache_lengths_past_the_capacity_stay_in_the_row(backend):
    """The CUDA kernel clamps to the capacity; the Triton kernel used to read the next row's NaNs."""
    check_lengths_past_the_capacity(backend, nheads=4)
