"""The Triton decode path (flash_attn_with_kvcache_triton) with a paged KV cache (block_table) or cache_batch_idx.

Results equal the reference on a plain (batch, capacity) cache holding the same tokens; the new tokens land in
the right page slots / cache rows and nowhere else; bad indices (never read back on the host) are clamped, so
they give garbage but no read or write outside the caches. Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py, as for test_triton_attention.py): small shapes, fp32 against the fp64
reference. The `cuda` cases run fp16 / bf16 on a larger cache. The CPU-kernel version is test_kvcache_paged.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils import assert_error_within_ratio, poison_

import llmkernels
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

interp = [pytest.mark.triton_interp, pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")]
# Interpreter cases on CPU tensors; the same cases on a GPU run compiled (fp32: IEEE products, same bound).
DEVICES = [pytest.param("cpu", marks=interp), pytest.param("cuda", marks=pytest.mark.cuda)]
FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 kernel against the fp64 reference (test_triton_attention's bound)
PAGE = 64  # the public function's smallest page


def _op():
    from llmkernels.triton import flash_attn  # noqa: F401  (registers the op; imports triton)

    return torch.ops.llmkernels.flash_attn_with_kvcache_triton.default


def _page_table(batch: int, per_row: int, num_pages: int, g: torch.Generator, device) -> torch.Tensor:
    """(batch, per_row) distinct pages in shuffled order, some pages left unused."""
    return torch.randperm(num_pages, generator=g)[: batch * per_row].view(batch, per_row).to(torch.int32).to(device)


def _paged(plain: torch.Tensor, table: torch.Tensor, num_pages: int) -> torch.Tensor:
    """plain (batch, capacity, hk, d) spread over the pages of a (num_pages, page_size, hk, d) cache as table says;
    the unused pages hold NaN (a read of the wrong page shows)."""
    batch, per_row = table.shape
    page_size = plain.shape[1] // per_row
    paged = poison_(plain.new_empty(num_pages, page_size, *plain.shape[2:]))
    paged[table.flatten().long()] = plain.reshape(batch * per_row, page_size, *plain.shape[2:])
    return paged


def _expected_writes(cache, k_new, lens, block_table=None, cache_batch_idx=None):
    """cache (paged or indexed) after the new tokens are written at lens[i] + t, written one by one."""
    want = cache.clone()
    for i in range(k_new.shape[0]):
        for t in range(k_new.shape[1]):
            pos = int(lens[i]) + t
            if block_table is not None:
                want[int(block_table[i, pos // cache.shape[1]]), pos % cache.shape[1]] = k_new[i, t]
            else:
                want[int(cache_batch_idx[i]), pos] = k_new[i, t]
    return want


def _compare(out, q, k_plain, v_plain, k_new, v_new, lens, causal, window, softcap):
    """out against the fp64 reference (fp32) or within 2x the error of the same-precision reference (fp16 / bf16),
    both run on the plain cache."""
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    up = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
    if q.dtype == torch.float32:
        exact = flash_attn_with_kvcache_ref(up(q, torch.float64), up(k_plain, torch.float64),
                                            up(v_plain, torch.float64), up(k_new, torch.float64),
                                            up(v_new, torch.float64), lens, **kw)  # fmt: skip
        torch.testing.assert_close(out.double(), exact, **FP32_TOL)
        return
    exact = flash_attn_with_kvcache_ref(up(q, torch.float32), up(k_plain, torch.float32), up(v_plain, torch.float32),
                                        up(k_new, torch.float32), up(v_new, torch.float32), lens, **kw)  # fmt: skip
    same = flash_attn_with_kvcache_ref(q, k_plain.clone(), v_plain.clone(), k_new, v_new, lens, upcast=False, **kw)
    assert_error_within_ratio(out, exact, same, ratio=2.0)


def _run_paged(device, dtype, batch, pages_per_row, page_size, h, hk, d, seqlen_q, s_new, lens, causal, window,
               softcap=0.0):  # fmt: skip
    g = torch.Generator().manual_seed(1)
    capacity = pages_per_row * page_size
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    k_plain, v_plain = randn(batch, capacity, hk, d), randn(batch, capacity, hk, d)
    num_pages = batch * pages_per_row + 3  # spare pages, left NaN
    table = _page_table(batch, pages_per_row, num_pages, g, device)
    k_paged, v_paged = _paged(k_plain, table, num_pages), _paged(v_plain, table, num_pages)
    q = randn(batch, seqlen_q, h, d)
    k_new, v_new = (randn(batch, s_new, hk, d), randn(batch, s_new, hk, d)) if s_new else (None, None)
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_want = _expected_writes(k_paged, k_new, lens, block_table=table) if s_new else k_paged.clone()
    v_want = _expected_writes(v_paged, v_new, lens, block_table=table) if s_new else v_paged.clone()

    with llmkernels.use_backend("triton"):
        out = llmkernels.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new, cache_seqlens=lens,
                                                 block_table=table, causal=causal, window_size=window,
                                                 softcap=softcap)  # fmt: skip
    _compare(out, q, k_plain, v_plain, k_new, v_new, lens, causal, window, softcap)
    # In place, exactly at lens[i] + t through the table; every other slot (NaN pages included) untouched.
    torch.testing.assert_close(k_paged, k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_paged, v_want, rtol=0, atol=0, equal_nan=True)


# (seqlen_q, s_new, h, hk, causal, window, softcap); lens 0 / 63 / 200 with 64-token pages cross page boundaries
# (the new tokens too), and row 0 starts empty. The interpreter's 16-key splits never straddle a 64-token page:
# test_pages_smaller_than_a_tile covers tiles that do (as a GPU's 64-key tiles from a window start do).
PAGED_CASES = [
    (1, 1, 4, 2, True, (-1, -1), 0.0),  # decode, GQA 2
    (1, 0, 4, 1, False, (-1, -1), 0.0),  # no new tokens (row 0 sees no key), MQA
    (5, 5, 4, 2, True, (-1, -1), 0.0),  # speculative: 5 queries, 5 new tokens
    (5, 0, 4, 2, True, (70, 0), 0.0),  # sliding window starting mid-page, no new tokens
    (5, 2, 4, 4, False, (3, 2), 5.0),  # two-sided window, softcap
]


@pytest.mark.parametrize("case", PAGED_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_paged_cache_matches_plain_cache(case, device):
    seqlen_q, s_new, h, hk, causal, window, softcap = case
    lens = [0, 63, 200] if s_new else [0, 63, 256]
    _run_paged(device, torch.float32, 3, 4, PAGE, h, hk, 32, seqlen_q, s_new, lens, causal, window, softcap)


@pytest.mark.parametrize("device", DEVICES)
def test_pages_smaller_than_a_tile(device):
    """24-token pages (the raw op takes any page size; the public one wants multiples of 64): the interpreter's
    16-key tiles straddle pages, so each key's page must be looked up, not the tile's first."""
    g = torch.Generator().manual_seed(2)
    batch, per_row, page, h, hk, d = 2, 4, 24, 4, 2, 16
    k_plain, v_plain = (torch.randn(batch, per_row * page, hk, d, generator=g).to(device) for _ in range(2))
    table = _page_table(batch, per_row, 11, g, device)
    k_paged, v_paged = _paged(k_plain, table, 11), _paged(v_plain, table, 11)
    q, k_new, v_new = (torch.randn(batch, 3, n, d, generator=g).to(device) for n in (h, hk, hk))
    lens = torch.tensor([20, 70], dtype=torch.int32, device=device)
    out = _op()(q, k_paged, v_paged, k_new, v_new, lens, d**-0.5, 30, 0, 0.0, table, None)
    _compare(out, q, k_plain, v_plain, k_new, v_new, lens, True, (30, 0), 0.0)
    k_want = _expected_writes(_paged(k_plain, table, 11), k_new, lens, block_table=table)
    torch.testing.assert_close(k_paged, k_want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("seqlen_q,s_new", [(1, 1), (5, 0), (5, 5)])
@pytest.mark.parametrize("device", DEVICES)
def test_cache_batch_idx_reads_and_writes_the_named_rows(seqlen_q, s_new, device):
    batch, rows, capacity, h, hk, d = 3, 6, 40, 4, 2, 32
    k_cache, v_cache = (torch.randn(rows, capacity, hk, d, device=device) for _ in range(2))
    idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)  # a permuted subset of the rows
    q = torch.randn(batch, seqlen_q, h, d, device=device)
    k_new, v_new = (torch.randn(batch, s_new, hk, d, device=device) for _ in range(2)) if s_new else (None, None)
    lens = torch.tensor([3, 0, 35], dtype=torch.int32, device=device)
    k_plain, v_plain = k_cache[idx.long()].clone(), v_cache[idx.long()].clone()
    k_want = _expected_writes(k_cache, k_new, lens, cache_batch_idx=idx) if s_new else k_cache.clone()
    v_want = _expected_writes(v_cache, v_new, lens, cache_batch_idx=idx) if s_new else v_cache.clone()

    with llmkernels.use_backend("triton"):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                 cache_batch_idx=idx, causal=True)  # fmt: skip
    _compare(out, q, k_plain, v_plain, k_new, v_new, lens, True, (-1, -1), 0.0)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)  # the named rows only


def _guarded(t: torch.Tensor, guard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t copied into the middle of a NaN buffer with `guard` extra rows each side: (buffer, view of t)."""
    buf = poison_(t.new_empty(t.shape[0] + 2 * guard, *t.shape[1:]))
    buf[guard : guard + t.shape[0]] = t
    return buf, buf[guard : guard + t.shape[0]]


@pytest.mark.parametrize("kind", ["paged", "indexed", "plain"])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_indices_stay_inside_the_caches(kind, device):
    """Out-of-range table entries, rows and lengths are clamped on the device: no read of the NaN guard rows
    around the caches (the output stays finite) and no write to them. (plain: only the lengths are bad; the new
    tokens' positions past the end once failed index_put's bounds check, a device assertion on a GPU.)"""
    batch, h, hk, d, guard = 2, 2, 1, 16, 3
    rows, cap = {"paged": (4, PAGE), "indexed": (3, 48), "plain": (2, 48)}[kind]
    k_buf, k_cache = _guarded(torch.randn(rows, cap, hk, d, device=device), guard)
    v_buf, v_cache = _guarded(torch.randn(rows, cap, hk, d, device=device), guard)
    q, k_new, v_new = (torch.randn(batch, 2, n, d, device=device) for n in (h, hk, hk))
    lens = torch.tensor([-7, 10**6], dtype=torch.int32, device=device)
    extra = {}
    if kind == "paged":
        # Unclamped, -1 and rows + 2 would land in the guard rows (NaN), not past the buffer.
        extra["block_table"] = torch.tensor([[-1, rows + 2], [rows, -3]], dtype=torch.int32, device=device)
    elif kind == "indexed":
        extra["cache_batch_idx"] = torch.tensor([-2, rows + 1], dtype=torch.int32, device=device)
    out = _op()(q, k_cache, v_cache, k_new, v_new, lens, d**-0.5, -1, -1, 0.0, extra.get("block_table"),
                extra.get("cache_batch_idx"))  # fmt: skip
    assert torch.isfinite(out).all()
    for buf in (k_buf, v_buf):
        assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + rows :]).all()


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp)])
def test_opcheck_and_compile(device):
    op = _op()
    q, k_new, v_new = (torch.randn(2, 1, n, 32, device=device) for n in (4, 2, 2))
    k_cache, v_cache = torch.randn(6, PAGE, 2, 32, device=device), torch.randn(6, PAGE, 2, 32, device=device)
    lens = torch.tensor([3, 70], dtype=torch.int32, device=device)
    table = torch.tensor([[5, 1], [2, 0]], dtype=torch.int32, device=device)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=device)
    torch.library.opcheck(op, (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, table, None))
    torch.library.opcheck(op, (q, k_cache, v_cache, None, None, lens.clamp(max=PAGE), 0.25, -1, 0, 0.0, None, idx))

    from llmkernels.triton import flash_attn as fa

    args = (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0)
    eager = fa.flash_attn_with_kvcache_triton(*args, block_table=table)
    compiled = torch.compile(fa.flash_attn_with_kvcache_triton, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args, block_table=table), eager)


BAD_ARGS = [
    (dict(block_table=True, cache_batch_idx=True), ValueError, "cannot be given together"),
    (dict(block_table=torch.int64), TypeError, "block_table must have dtype"),
    (dict(block_table=(3, 2)), ValueError, "block_table must have shape"),
    (dict(cache_batch_idx=(3,)), ValueError, "cache_batch_idx must have shape"),
    (dict(cache_batch_idx=torch.int64), TypeError, "cache_batch_idx must have dtype"),
]


@pytest.mark.parametrize("change,error,message", BAD_ARGS)
def test_bad_arguments_name_the_argument(change, error, message):
    """Host checks of the raw op (shapes and dtypes only: values are never read back)."""
    if not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k_new, v_new = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    k_cache, v_cache = torch.randn(6, PAGE, 2, 32), torch.randn(6, PAGE, 2, 32)
    lens = torch.tensor([3, 70], dtype=torch.int32)
    tables = {"block_table": torch.zeros(2, 2, dtype=torch.int32), "cache_batch_idx": torch.zeros(2, dtype=torch.int32)}
    for name, how in change.items():
        if isinstance(how, torch.dtype):
            tables[name] = tables[name].to(how)
        elif isinstance(how, tuple):
            tables[name] = torch.zeros(how, dtype=torch.int32)
    given = {name: tables[name] for name in change}
    with pytest.raises(error, match=message):
        _op()(q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, given.get("block_table"),
              given.get("cache_batch_idx"))  # fmt: skip


# GPU: (batch, pages_per_row, page_size, h, hk, d, seqlen_q, s_new, lens, causal, window)
GPU_PAGED_CASES = [
    (4, 16, 64, 32, 8, 128, 1, 1, [0, 63, 700, 1023], True, (-1, -1)),  # decode, GQA 4, many pages
    (2, 4, 256, 16, 2, 64, 4, 4, [17, 1000], True, (256, 0)),  # speculative, sliding window, big pages
    (3, 8, 128, 8, 8, 256, 1, 0, [1, 129, 1024], True, (-1, -1)),  # head dim 256 (32-key tiles), no new tokens
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_PAGED_CASES)
def test_gpu_paged(case, dtype):
    batch, per_row, page, h, hk, d, seqlen_q, s_new, lens, causal, window = case
    _run_paged("cuda", dtype, batch, per_row, page, h, hk, d, seqlen_q, s_new, lens, causal, window)
