"""flash_attn_varlen_func(..., block_table=...): packed queries against a paged K/V cache (flash_attn's paged
varlen form, as serving engines call it for chunked prefill). The pages are gathered into packed rows, then the
packed kernels run, so the answer must equal the same call on the dense packed K/V, gradients included (they
flow into the pages)."""

from __future__ import annotations

import pytest
import torch
from attn_cases import BACKEND_DEVICES, NO_CPU_KERNEL

import llmkernels

BACKENDS = BACKEND_DEVICES


def _paged(k, v, cu_k, page_size, max_pages, spare_pages=3, seed=0):
    """The packed k, v (total_k, hk, d) scattered into shuffled pages (plus spare pages full of NaN, which no
    sequence may read) and the table; table entries past a sequence's last page are -1 (padding)."""
    gen = torch.Generator().manual_seed(seed)
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    need = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(need) + spare_pages
    order = torch.randperm(num_pages, generator=gen).tolist()
    k_pages = torch.full((num_pages, page_size, *k.shape[1:]), float("nan"), dtype=k.dtype, device=k.device)
    v_pages = torch.full_like(k_pages, float("nan"))
    table = torch.full((len(lens), max_pages), -1, dtype=torch.int32, device=k.device)
    for b, n in enumerate(lens):
        for j in range(need[b]):
            page = order.pop()
            table[b, j] = page
            rows = slice(int(cu_k[b]) + j * page_size, int(cu_k[b]) + min(n, (j + 1) * page_size))
            count = rows.stop - rows.start
            k_pages[page, :count] = k[rows]
            v_pages[page, :count] = v[rows]
    return k_pages, v_pages, table


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (9, 0))])
def test_paged_equals_dense_packed(backend, device, causal, window):
    # Prefill chunks after cached prefixes; an empty query sequence; a sequence with no keys yet.
    lens_q, lens_k = [3, 1, 17, 0, 2], [40, 1, 33, 16, 0]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    h, hk, d, page_size = 4, 2, 16, 16
    q = torch.randn(int(cu_q[-1]), h, d, device=device)
    k = torch.randn(int(cu_k[-1]), hk, d, device=device)
    v = torch.randn_like(k)
    k_pages, v_pages, table = _paged(k, v, cu_k.cpu(), page_size, max_pages=4)
    k_pages, v_pages, table = k_pages.to(device), v_pages.to(device), table.to(device)
    dout = torch.randn_like(q)
    kw = dict(causal=causal, window_size=window)

    with llmkernels.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k_pages, v_pages)]
        out = llmkernels.flash_attn_varlen_func(leaves[0], leaves[1], leaves[2], cu_q, cu_k, max(lens_q),
                                                max(lens_k), block_table=table, **kw)  # fmt: skip
        out.backward(dout)
        dense_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        dense = llmkernels.flash_attn_varlen_func(*dense_leaves, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
        dense.backward(dout)
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaves[0].grad, dense_leaves[0].grad, rtol=1e-5, atol=1e-6)
    # The pages' gradients, read back through the table, are the dense keys' gradients; spare pages get none.
    for pages_grad, dense_grad in ((leaves[1].grad, dense_leaves[1].grad), (leaves[2].grad, dense_leaves[2].grad)):
        assert bool(pages_grad.isfinite().all())
        back, _, _ = _paged(dense_grad, dense_grad, cu_k.cpu(), page_size, max_pages=4)
        used = table[table >= 0].long()
        torch.testing.assert_close(pages_grad[used].nan_to_num(0.0), back.to(device)[used].nan_to_num(0.0),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        spare = torch.ones(pages_grad.shape[0], dtype=torch.bool, device=device)
        spare[used] = False
        assert bool((pages_grad[spare] == 0).all())


@pytest.mark.skipif(NO_CPU_KERNEL, reason="no C++ CPU attention kernel")
def test_paged_varlen_compiles_fullgraph():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k = torch.randn(12, 4, 16), torch.randn(12, 2, 16)
    k_pages, v_pages, table = _paged(k, torch.randn_like(k), cu, 16, max_pages=2)
    k_pages, v_pages = k_pages.nan_to_num(0.0), v_pages.nan_to_num(0.0)
    fn = torch.compile(llmkernels.flash_attn_varlen_func, fullgraph=True, backend="aot_eager")
    out = fn(q, k_pages, v_pages, cu, cu, 7, 7, causal=True, block_table=table)
    torch.testing.assert_close(out, llmkernels.flash_attn_varlen_func(q, k_pages, v_pages, cu, cu, 7, 7, causal=True,
                                                                       block_table=table))  # fmt: skip


def test_paged_varlen_bad_arguments_name_them():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, pages = torch.randn(12, 4, 16), torch.randn(3, 16, 2, 16)
    table = torch.zeros(2, 2, dtype=torch.int32)
    call = llmkernels.flash_attn_varlen_func
    with pytest.raises(ValueError, match="block_table must have shape"):
        call(q, pages, pages, cu, cu, 7, 7, block_table=torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table must have dtype"):
        call(q, pages, pages, cu, cu, 7, 7, block_table=table.long())
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        call(q, torch.randn(12, 2, 16), torch.randn(12, 2, 16), cu, cu, 7, 7, block_table=table)
    with pytest.raises(ValueError, match="v must have shape"):
        call(q, pages, torch.randn(3, 16, 2, 8), cu, cu, 7, 7, block_table=table)
    # More keys than a table row holds (2 pages of 16): said, not silently read from the wrong slots.
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(q, pages, pages, cu, cu, 7, 33, block_table=table)
    long_k = torch.tensor([0, 40, 41], dtype=torch.int32)
    with pytest.raises(ValueError, match="40 keys, more than a block_table row holds"):
        call(q, pages, pages, cu, long_k, 7, 7, block_table=table)
    with pytest.raises(ValueError, match="cu_seqlens_k must hold"):
        call(q, pages, pages, cu, torch.zeros(0, dtype=torch.int32), 7, 7, block_table=table)


def test_pages_a_sequence_uses_must_exist_on_cpu():
    """As flash_attn_with_kvcache's CPU op: entries the sequences use are checked (padding past them may hold -1)."""
    pages = torch.randn(4, 64, 2, 16)
    q = torch.randn(10, 4, 16)
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 140], dtype=torch.int32)  # two pages a sequence
    with pytest.raises(ValueError, match="block_table entries a sequence uses must be page indices in \\[0, 4\\)"):
        llmkernels.flash_attn_varlen_func(q, pages, pages.clone(), cu_q, cu_k, 5, 70,
                                          block_table=torch.tensor([[0, 9], [2, 1]], dtype=torch.int32))  # fmt: skip
    padded = torch.tensor([[0, 3, -1], [2, 1, -1]], dtype=torch.int32)  # unused -1 entries are fine
    out = llmkernels.flash_attn_varlen_func(q, pages, pages.clone(), cu_q, cu_k, 5, 70, block_table=padded)
    assert out.isfinite().all()
