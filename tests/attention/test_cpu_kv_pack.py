"""The C++ CPU forward's per-thread copy of one (batch, KV head)'s K and V rows (KVPack in
csrc/attention/cpu/flash_attn_kernel.h): taken by fp32 inputs (and fp16, or bf16 without AVX512-BF16, converted
once) when a thread runs more than one query block of a KV head. Rows are copied on first use, so windows that
start inside a key block, GQA groups sharing a KV head, a second batch row, separate K and V strides and a second
call with other data (the copy lives on in the thread), and a KV cache's ragged lengths, pages and row map must all
read the right rows."""

import pytest
import torch
from attn_cases import check_flash_attn, needs_cpu_kernel, random_qkv
from utils import run_with_cpu_isa

import llmkernels
from llmkernels.reference.attention import flash_attn_with_kvcache_ref

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window)
CASES = [
    (2, 300, 350, 4, 2, 40, True, (100, 0)),  # windows start inside key blocks: rows copied a part at a time
    (1, 200, 200, 8, 8, 64, False, (-1, -1)),  # four query blocks per head
    (1, 130, 257, 8, 1, 96, False, (-1, -1)),  # MQA: every query head reads the one copy
    (1, 129, 129, 2, 2, 128, True, (-1, -1)),  # the last query block has one row (it reads K and V in place)
]


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_forward_from_the_copy(case, dtype, threads):
    b, sq, sk, h, hk, d, causal, window = case
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = random_qkv(b, sq, sk, h, hk, d, dtype, "cpu")
        check_flash_attn("cpu", inputs, causal=causal, window_size=window, backward=False)
    finally:
        torch.set_num_threads(saved)


@needs_cpu_kernel
def test_separate_k_and_v_strides():
    """k from a packed kv projection, v on its own: the copy reads each with its own row stride."""
    kv = torch.randn(1, 300, 2, 2, 64)
    q, v = torch.randn(1, 250, 4, 64), torch.randn(1, 300, 2, 64)
    check_flash_attn("cpu", (q, kv[:, :, 0], v), causal=True, backward=False)


@needs_cpu_kernel
def test_a_second_call_never_reads_the_first_calls_rows():
    """Same shapes, new data (the thread keeps its copy between calls); then a longer, narrower call in the same
    storage, then a shorter, wider one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shape in [(1, 200, 200, 2, 2, 64)] * 2 + [(1, 300, 520, 2, 1, 32), (2, 150, 140, 2, 2, 128)]:
            check_flash_attn("cpu", random_qkv(*shape, torch.float32, "cpu"), causal=False, backward=False)
    finally:
        torch.set_num_threads(saved)


@needs_cpu_kernel
def test_avx2_copy_converts_bf16():
    """Without AVX512-BF16 (the ISA capped at AVX2 in a fresh process) bf16 rows are converted into the copy."""
    code = (
        "import torch; from attn_cases import check_flash_attn, random_qkv; torch.manual_seed(0);"
        "check_flash_attn('cpu', random_qkv(2, 200, 230, 4, 2, 64, torch.bfloat16, 'cpu'), causal=True,"
        " window_size=(90, 0), backward=False);"
        "check_flash_attn('cpu', random_qkv(1, 150, 300, 4, 4, 40, torch.float32, 'cpu'), backward=False)"
    )
    run_with_cpu_isa("avx2", code, "attention")


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["plain", "paged", "batch_idx"])
def test_prefill_into_a_kv_cache(layout):
    """A 100-token chunk into a ragged KV cache (the copy is per batch row: rows stop at that row's length; paged
    caches are read page by page; cache_batch_idx picks the cache rows), fp32, MQA."""
    g = torch.Generator().manual_seed(1)
    batch, s_new, h, hk, d, capacity, page = 3, 100, 4, 1, 64, 512, 128  # MQA: batch rows switch, the head does not
    k_plain, v_plain = (torch.randn(batch, capacity, hk, d, generator=g) for _ in range(2))
    q = torch.randn(batch, s_new, h, d, generator=g)
    k_new, v_new = (torch.randn(batch, s_new, hk, d, generator=g) for _ in range(2))
    lens = torch.tensor([0, 130, 400], dtype=torch.int32)
    kw = dict(cache_seqlens=lens, causal=True)
    want = flash_attn_with_kvcache_ref(q, k_plain.clone(), v_plain.clone(), k_new, v_new, lens, causal=True)
    if layout == "paged":  # pages in reverse order, two spare ones of NaN
        pages = capacity // page
        table = torch.arange(batch * pages, dtype=torch.int32).flip(0).view(batch, pages) + 2
        k_cache, v_cache = (torch.full((batch * pages + 2, page, hk, d), float("nan")) for _ in range(2))
        for b in range(batch):
            for i in range(pages):
                k_cache[table[b, i]] = k_plain[b, i * page : (i + 1) * page]
                v_cache[table[b, i]] = v_plain[b, i * page : (i + 1) * page]
        extra = dict(block_table=table)
    elif layout == "batch_idx":  # cache rows 4, 0, 2 of five
        idx = torch.tensor([4, 0, 2], dtype=torch.int32)
        k_cache, v_cache = (torch.full((5, capacity, hk, d), float("nan")) for _ in range(2))
        k_cache[idx.long()], v_cache[idx.long()] = k_plain, v_plain
        extra = dict(cache_batch_idx=idx)
    else:
        k_cache, v_cache, extra = k_plain.clone(), v_plain.clone(), {}
    with llmkernels.use_backend("cpu"):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw, **extra)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_bf16_copy_for_the_vdpbf16ps_products():
    """With AMX off (LLMKERNELS_CPU_AMX=0, in a fresh process) bf16 on an AVX512-BF16 CPU takes the vdpbf16ps
    kernel, whose copy keeps the rows in bf16; elsewhere the same cases check the fp32 copy."""
    code = (
        "import os; os.environ['LLMKERNELS_CPU_AMX'] = '0';"
        "import torch; from attn_cases import check_flash_attn, random_qkv; torch.manual_seed(0);"
        "check_flash_attn('cpu', random_qkv(2, 200, 231, 4, 2, 64, torch.bfloat16, 'cpu'), causal=True,"
        " window_size=(91, 0), backward=False);"
        "check_flash_attn('cpu', random_qkv(1, 150, 300, 8, 1, 128, torch.bfloat16, 'cpu'), backward=False)"
    )
    run_with_cpu_isa("", code, "attention")
