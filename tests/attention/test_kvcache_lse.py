"""flash_attn_with_kvcache(..., return_softmax_lse=True): each row's log-sum-exp beside the output, on every backend
that returns it (reference, C++ CPU, Triton; the CUDA C++ kernels refuse it and a GPU runs Triton), against the
fp64 reference's. lse is what merging attention over several caches needs, so it is checked to fp32 accuracy."""

from __future__ import annotations

import pytest
import torch
from attn_cases import BACKEND_DEVICES, NO_CPU_KERNEL
from utils import poison_

import llmkernels
from llmkernels.ops import attention as attention_ops
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

BACKENDS = BACKEND_DEVICES

# (nheads, nheads_k, headdim, causal, window_size, softcap, seqlen_q, s_new)
CASES = [
    (4, 1, 32, True, (-1, -1), 0.0, 1, 1),  # decode step, GQA 4
    (4, 2, 40, True, (5, 0), 0.0, 3, 3),  # sliding window, head dim not a power of two
    (2, 2, 16, False, (-1, -1), 8.0, 2, 0),  # softcap, no new tokens
    (2, 2, 64, True, (-1, -1), 0.0, 4, 2),  # causal with more queries than new tokens
    (4, 2, 64, True, (-1, -1), 0.0, 16, 16),  # a 16-row chunk: the CPU's bf16 rows take the AMX kernel here
]


def _run(backend, q, k_cache, v_cache, k_new, v_new, lens, case, paged=None):
    """(out, lse) through the dispatcher with lse poisoned (NaN) first, so an unwritten element fails."""
    h, hk, d, causal, window, softcap = case[:6]
    left, right = window[0], 0 if causal else window[1]
    lse = poison_(torch.empty(q.shape[0], h, q.shape[1], device=q.device))
    block_table = paged
    with llmkernels.use_backend(backend):
        out = attention_ops.flash_attn_kvcache(q, k_cache, v_cache, k_new, v_new, lens, d**-0.5, left, right,
                                               softcap, block_table, None, None, None, True, lse)  # fmt: skip
    return out, lse


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"h{c[0]}-{c[1]}-d{c[2]}-w{c[4][0]}-cap{c[5]}-q{c[6]}" for c in CASES])
def test_lse_matches_the_fp64_reference(backend, device, case):
    h, hk, d, causal, window, softcap, sq, s_new = case
    dtypes = [torch.float32] + ([torch.bfloat16] if backend == "cpu" or device == "cuda" else [])
    for dtype in dtypes:
        batch, capacity = 3, 70
        lens = torch.tensor([0, 17, 70 - s_new], dtype=torch.int32, device=device)  # row 0: only the new tokens
        k_cache = torch.randn(batch, capacity, hk, d, device=device).to(dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, sq, h, d, device=device).to(dtype)
        k_new = torch.randn(batch, s_new, hk, d, device=device).to(dtype) if s_new else None
        v_new = torch.randn_like(k_new) if s_new else None
        kc, vc = k_cache.double(), v_cache.double()
        up = lambda t: None if t is None else t.double()  # noqa: E731
        ref_out, ref_lse = flash_attn_with_kvcache_ref(
            q.double(), kc, vc, up(k_new), up(v_new), lens, d**-0.5, causal, window, softcap, return_softmax_lse=True
        )
        out, lse = _run(backend, q, k_cache, v_cache, k_new, v_new, lens, case)
        assert lse.shape == (batch, h, sq) and lse.dtype == torch.float32
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse), ~seen), "lse must be -inf exactly where a row sees no key"
        # lse depends on the scores only (not on P's rounding): fp32 sums of exact products, bf16 inputs included;
        # the AMX kernel's degree-3 exp2 (P is rounded to bf16 next) moves it by up to ~1e-4.
        lse_tol = 2e-5 if dtype == torch.float32 else 2e-4
        torch.testing.assert_close(lse[seen].double(), ref_lse[seen].double(), rtol=lse_tol, atol=lse_tol)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS[1:])
def test_lse_with_a_paged_cache(backend, device):
    """block_table: rows read their keys through pages; the lse must be the same as a dense cache's."""
    name = backend
    case = (4, 2, 32, True, (-1, -1), 0.0, 2, 2)
    page, pages = 64, 6
    k_pages = torch.randn(pages, page, 2, 32, device=device)
    v_pages = torch.randn_like(k_pages)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([70, 130], dtype=torch.int32, device=device)
    q, k_new = torch.randn(2, 2, 4, 32, device=device), torch.randn(2, 2, 2, 32, device=device)
    v_new = torch.randn_like(k_new)
    dense_k = k_pages[table.long()].reshape(2, 3 * page, 2, 32).double()
    dense_v = v_pages[table.long()].reshape(2, 3 * page, 2, 32).double()
    _, ref_lse = flash_attn_with_kvcache_ref(q.double(), dense_k, dense_v, k_new.double(), v_new.double(), lens,
                                             32**-0.5, True, return_softmax_lse=True)  # fmt: skip
    _, lse = _run(name, q, k_pages, v_pages, k_new, v_new, lens, case, paged=table)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(NO_CPU_KERNEL, reason="no C++ CPU attention kernel")
def test_public_function_returns_out_and_lse_and_compiles():
    q, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    lens = torch.tensor([4, 9], dtype=torch.int32)
    kw = dict(cache_seqlens=lens, causal=True, return_softmax_lse=True)
    k2, v2 = k_cache.clone(), v_cache.clone()
    out, lse = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    plain = llmkernels.flash_attn_with_kvcache(q, k2.clone(), v2.clone(), k_new, v_new, cache_seqlens=lens, causal=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # asking for lse changes nothing else
    fn = torch.compile(llmkernels.flash_attn_with_kvcache, fullgraph=True, backend="aot_eager")
    c_out, c_lse = fn(q, k2, v2, k_new, v_new, **kw)
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_lse, lse)
    torch.testing.assert_close(k2, k_cache)


@pytest.mark.skipif(NO_CPU_KERNEL, reason="no C++ CPU attention kernel")
def test_opcheck_with_lse():
    q, k_cache, v_cache = torch.randn(2, 2, 4, 16), torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    lens = torch.tensor([3, 11], dtype=torch.int32)
    lse = torch.empty(2, 4, 2)
    args = (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, None, None, None, None, True, lse)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache.default, args)


def test_bad_lse_buffers_and_the_cuda_refusal():
    q, k_cache, v_cache = torch.randn(1, 1, 2, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    lens = torch.tensor([3], dtype=torch.int32)
    args = (q, k_cache, v_cache, None, None, lens, 0.25, -1, 0, 0.0, None, None, None, None, True)
    if not NO_CPU_KERNEL:
        for bad, what in ((torch.empty(1, 1, 2), "softmax_lse"), (torch.empty(1, 2, 1, dtype=torch.float64),
                                                                   "softmax_lse")):  # fmt: skip
            with pytest.raises((ValueError, RuntimeError), match=what):
                torch.ops.llmkernels.flash_attn_with_kvcache(*args, bad)
    # The CUDA C++ backend says why it cannot, so dispatch goes on to Triton on a GPU.
    reason = attention_ops._cuda_kvcache_supports(q.half(), k_cache, v_cache, *args[3:], torch.empty(1, 2, 1))
    assert reason is not None and "softmax_lse" in reason
    assert attention_ops._cuda_kvcache_supports(q.half(), k_cache, v_cache, *args[3:], None) is None


@pytest.mark.cuda
def test_gpu_auto_dispatch_returns_lse_through_triton():
    """On a GPU the CUDA C++ kernels are first for decode but do not return lse: such calls must go to Triton."""
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([17, 300], dtype=torch.int32, device="cuda")
    out, lse = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_softmax_lse=True)
    ref_out, ref_lse = flash_attn_with_kvcache_ref(q.double(), k_cache.double(), v_cache.double(), None, None, lens,
                                                   return_softmax_lse=True)  # fmt: skip
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.double(), ref_out, rtol=3e-2, atol=3e-2)


@pytest.mark.triton_interp
def test_triton_lse_op_opcheck():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter case (a GPU runs the compiled op in the cases above)")
    from llmkernels.triton import flash_attn  # noqa: F401  (registers the ops)

    q, k_new, v_new = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    lens = torch.tensor([3, 11], dtype=torch.int32)
    args = (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache_lse_triton.default, args)
