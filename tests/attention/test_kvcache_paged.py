"""flash_attn_with_kvcache with a paged KV cache (block_table) or cache_batch_idx, on the CPU kernel and the
reference: results equal the same call on a plain (batch, capacity) cache holding the same tokens, the new tokens
land in the right page slots, and bad tables are refused by name."""

import pytest
import torch
from attn_cases import needs_cpu_kernel
from utils import poison_

import llmkernels
from llmkernels._backend import triton_unavailable_reason
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

BACKENDS = [pytest.param("cpu", marks=needs_cpu_kernel), "reference"]


def _paged_copy(k_plain, page_size, num_pages, generator):
    """The plain (batch, capacity, hk, d) cache spread over shuffled pages of a (num_pages, page_size, hk, d) one
    (unused pages hold NaN, so a kernel that reads the wrong page fails); returns (paged, block_table)."""
    batch, capacity = k_plain.shape[:2]
    per_row = capacity // page_size
    order = torch.randperm(num_pages, generator=generator)[: batch * per_row].to(torch.int32)
    table = order.view(batch, per_row)
    paged = poison_(torch.empty(num_pages, page_size, *k_plain.shape[2:], dtype=k_plain.dtype))
    for b in range(batch):
        for i in range(per_row):
            paged[table[b, i]] = k_plain[b, i * page_size : (i + 1) * page_size]
    return paged, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seqlen_q,s_new,causal,window", [(1, 1, True, (-1, -1)), (7, 7, True, (70, 0)),
                                                          (3, 0, False, (-1, -1)), (5, 2, True, (0, 0))])
def test_paged_cache_equals_plain_cache(backend, dtype, seqlen_q, s_new, causal, window):
    g = torch.Generator().manual_seed(0)
    batch, page_size, pages_per_row, h, hk, d = 3, 64, 4, 8, 2, 64
    capacity = page_size * pages_per_row
    k_plain = torch.randn(batch, capacity, hk, d, generator=g).to(dtype)
    v_plain = torch.randn(batch, capacity, hk, d, generator=g).to(dtype)
    k_paged, table = _paged_copy(k_plain, page_size, 17, g)
    v_paged = poison_(torch.empty_like(k_paged))
    for b in range(batch):
        for i in range(pages_per_row):
            v_paged[table[b, i]] = v_plain[b, i * page_size : (i + 1) * page_size]
    q = torch.randn(batch, seqlen_q, h, d, generator=g).to(dtype)
    k_new = torch.randn(batch, s_new, hk, d, generator=g).to(dtype) if s_new else None
    v_new = torch.randn(batch, s_new, hk, d, generator=g).to(dtype) if s_new else None
    lens = torch.tensor([0, 63, 200], dtype=torch.int32)  # crosses pages; row 0 starts empty
    if s_new == 0:
        lens = torch.tensor([1, 64, 256], dtype=torch.int32)
    kw = dict(cache_seqlens=lens, causal=causal, window_size=window)
    with llmkernels.use_backend(backend):
        paged = llmkernels.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new, block_table=table, **kw)
    plain = flash_attn_with_kvcache_ref(q, k_plain, v_plain, k_new, v_new, lens, causal=causal, window_size=window)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(paged.float(), plain.float(), **tol)
    for b in range(batch):  # the new tokens were written into their pages, in place
        for t in range(s_new):
            pos = int(lens[b]) + t
            page, slot = table[b, pos // page_size], pos % page_size
            assert torch.equal(k_paged[page, slot], k_new[b, t]) and torch.equal(v_paged[page, slot], v_new[b, t])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_batch_idx_reads_and_writes_the_named_rows(backend):
    batch, rows, capacity, h, hk, d = 3, 5, 40, 4, 2, 32
    k_cache, v_cache = torch.randn(rows, capacity, hk, d), torch.randn(rows, capacity, hk, d)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    q, k_new, v_new = torch.randn(batch, 2, h, d), torch.randn(batch, 2, hk, d), torch.randn(batch, 2, hk, d)
    lens = torch.tensor([3, 0, 30], dtype=torch.int32)
    k_plain, v_plain = k_cache[idx.long()].clone(), v_cache[idx.long()].clone()
    untouched = [r for r in range(rows) if r not in idx.tolist()]
    k_before = k_cache[untouched].clone()
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                 cache_batch_idx=idx, causal=True)
    want = flash_attn_with_kvcache_ref(q, k_plain, v_plain, k_new, v_new, lens, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[idx.long()], k_plain)  # the reference wrote the same tokens to its copy
    assert torch.equal(k_cache[untouched], k_before)


@needs_cpu_kernel
def test_bad_tables_are_refused():
    q, k_new, v_new = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    k_cache, v_cache = torch.randn(6, 64, 2, 32), torch.randn(6, 64, 2, 32)
    lens = torch.tensor([3, 70], dtype=torch.int32)
    call = llmkernels.flash_attn_with_kvcache
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_table entries a row uses must be page indices"):
        call(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, block_table=table + 5)
    with pytest.raises(RuntimeError, match="cache_seqlens must leave room"):
        call(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor([3, 128], dtype=torch.int32),
             block_table=table)
    with pytest.raises(ValueError, match="page_size a multiple of 64"):
        call(q, k_cache[:, :48], v_cache[:, :48], cache_seqlens=lens, block_table=table)
    with pytest.raises(ValueError, match="cannot be given together"):
        call(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, cache_batch_idx=torch.tensor(
            [0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cache_batch_idx must name distinct cache rows"):
        call(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, cache_batch_idx=torch.tensor([1, 1],
                                                                                                 dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table must have dtype"):
        call(q, k_cache, v_cache, cache_seqlens=lens, block_table=table.long())


@needs_cpu_kernel
def test_opcheck_paged():
    q, k_new, v_new = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    k_cache, v_cache = torch.randn(6, 64, 2, 32), torch.randn(6, 64, 2, 32)
    lens = torch.tensor([3, 70], dtype=torch.int32)
    table = torch.tensor([[5, 1], [2, 0]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache.default,
                          (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, table, None))
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache.default,
                          (q, k_cache, v_cache, None, None, lens.clamp(max=64), 0.25, -1, 0, 0.0, None,
                           torch.tensor([3, 1], dtype=torch.int32)))


_NO_TRITON = triton_unavailable_reason("cpu")  # under TRITON_INTERPRET=1 the kernels run on CPU tensors


@pytest.mark.parametrize(
    "backend", [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(_NO_TRITON is not None, reason="no triton"))]
)
def test_tables_padded_with_minus_one_and_shared_prefix_pages(backend):
    """As flash_attn and vLLM: entries past the pages a row uses may hold anything (-1 here), and rows may share a
    page they only read (a common prefix) while writing their new tokens to pages of their own."""
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(5, 64, 2, 32, generator=g)
    v_cache = torch.randn(5, 64, 2, 32, generator=g)
    table = torch.tensor([[0, 1, -1, -1], [0, 2, -1, -1]], dtype=torch.int32)  # page 0: the shared prefix
    lens = torch.tensor([64, 70], dtype=torch.int32)  # row 0 writes page 1 slot 0, row 1 page 2 slot 6
    q, k_new, v_new = (torch.randn(2, 1, n, 32, generator=g) for n in (4, 2, 2))
    plain_k = torch.stack([torch.cat([k_cache[0], k_cache[1]]), torch.cat([k_cache[0], k_cache[2]])])
    plain_v = torch.stack([torch.cat([v_cache[0], v_cache[1]]), torch.cat([v_cache[0], v_cache[2]])])
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                 block_table=table, causal=True)
    want = flash_attn_with_kvcache_ref(q, plain_k, plain_v, k_new, v_new, lens, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache[1, 0], k_new[0, 0]) and torch.equal(k_cache[2, 6], k_new[1, 0])


@needs_cpu_kernel
def test_two_new_tokens_to_one_slot_are_refused():
    k_cache, v_cache = torch.randn(4, 64, 2, 32), torch.randn(4, 64, 2, 32)
    table = torch.tensor([[2, 3], [2, 1]], dtype=torch.int32)  # both rows would write slot 10 of page 2
    q, k_new, v_new = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    with pytest.raises(RuntimeError, match="two new tokens to the same page slot"):
        llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                           cache_seqlens=torch.tensor([10, 10], dtype=torch.int32), block_table=table)
