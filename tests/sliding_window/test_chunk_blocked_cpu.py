"""The blocked CPU kernel of rolling_window_attn (every call on CPUs with AVX2) against the fp64 reference:
several query blocks and key tiles, the ring's wrap-around inside a tile, GQA groups wider than a block, strided
queries, the decode path (tasks of at most 4 rows: per-key dot products, K / V in place), the AVX2 copy and
the portable per-row kernel (LLMKERNELS_CPU_ISA is read once per process, so those run in a child)."""

import pytest
import torch

from llmkernels import _ext
from llmkernels.reference.sliding_window import rolling_window_attn_ref
from tests.utils import assert_error_within_ratio, run_with_cpu_isa

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("rolling_window_attn", "CPU"), reason="the loaded build has no CPU rolling_window_attn kernel"
)


def check_chunk(
    batch, chunk, window, nheads, nheads_k, head_dim, seqlens, dtype=torch.float32, softcap=0.0, strided_q=False
):
    # q as a slice of a wider tensor when strided_q: last dim contiguous, other strides not the packed ones
    q_full = torch.randn(batch, chunk, nheads + (3 if strided_q else 0), head_dim, dtype=dtype)
    q = q_full[:, :, :nheads]
    k, v = (torch.randn(batch, chunk, nheads_k, head_dim, dtype=dtype) for _ in range(2))
    k_ring, v_ring = (torch.randn(batch, window, nheads_k, head_dim, dtype=dtype) for _ in range(2))
    lens = torch.tensor(seqlens, dtype=torch.int32)
    scale = head_dim**-0.5
    out = torch.ops.llmkernels.rolling_window_attn(q, k, v, k_ring, v_ring, lens, scale, softcap)
    args = (q, k, v, k_ring, v_ring, lens, scale, softcap)
    exact = rolling_window_attn_ref(*(t.double() if t.is_floating_point() else t for t in args[:6]), *args[6:])
    same = rolling_window_attn_ref(*args, upcast=dtype == torch.float32)
    assert_error_within_ratio(out, exact, same, floor=1e-5 if dtype == torch.float32 else None)


@pytest.mark.parametrize(
    "batch,chunk,window,nheads,nheads_k,head_dim,seqlens",
    [
        (2, 40, 100, 8, 2, 64, [250, 3]),  # 3 query blocks (last ragged), 3 key tiles, wrap-around, fresh row
        (1, 17, 130, 2, 2, 33, [517]),  # MHA, 17 positions per block, head_dim no vector multiple
        (1, 9, 7, 80, 1, 16, [11]),  # a GQA group wider than a 64-row block: one position per task
        (1, 113, 16, 4, 4, 8, [0]),  # chunk far longer than the window: keys come from the chunk only
    ],
)
def test_blocked_matches_reference(batch, chunk, window, nheads, nheads_k, head_dim, seqlens):
    check_chunk(batch, chunk, window, nheads, nheads_k, head_dim, seqlens, strided_q=True)


@pytest.mark.parametrize(
    "batch,chunk,window,nheads,nheads_k,head_dim,seqlens",
    [
        (2, 1, 100, 8, 2, 64, [250, 3]),  # decode, GQA 4: wrap-around inside a tile, K / V in place; a fresh row
        (1, 1, 130, 6, 2, 40, [517]),  # GQA 3, head_dim no vector multiple: K and V gathered and padded
        (1, 2, 70, 4, 2, 64, [69]),  # 2 positions x 2 heads: keys from the ring and from the chunk
        (1, 4, 16, 2, 2, 16, [100]),  # 4 positions, MHA, window under one tile
        (3, 1, 200, 2, 1, 128, [64, 199, 0]),  # 2 rows; windows that fill, wrap, and start empty
    ],
)
def test_few_rows_dot_products(batch, chunk, window, nheads, nheads_k, head_dim, seqlens):
    """Tasks of at most 4 (position, head) rows (decode) take the per-key dot products, K / V in place."""
    check_chunk(batch, chunk, window, nheads, nheads_k, head_dim, seqlens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_few_rows_low_precision_softcap(dtype):
    check_chunk(2, 1, 100, 8, 2, 64, [250, 3], dtype=dtype, softcap=3.0)
    check_chunk(1, 1, 130, 6, 2, 40, [517], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_low_precision_softcap(dtype):
    check_chunk(2, 24, 70, 4, 2, 40, [90, 1], dtype=dtype, softcap=3.0)


def check_in_child(isa: str, *calls: str) -> None:
    """check_chunk calls in a fresh process with LLMKERNELS_CPU_ISA=isa."""
    run_with_cpu_isa(
        isa, "import torch\nfrom test_chunk_blocked_cpu import check_chunk\n" + "\n".join(calls), "sliding_window"
    )


def test_blocked_avx2_copy():
    check_in_child(
        "avx2",
        "check_chunk(2, 40, 100, 8, 2, 64, [250, 3])",
        "check_chunk(1, 17, 130, 2, 2, 33, [517], dtype=torch.bfloat16, softcap=3.0)",
        "check_chunk(2, 1, 100, 8, 2, 64, [250, 3])",
        "check_chunk(1, 1, 130, 6, 2, 40, [517], dtype=torch.bfloat16)",
    )


def test_portable_per_row_kernel():
    """CPUs without AVX2 (LLMKERNELS_CPU_ISA=scalar) take the per-row kernel: decode with and without GQA, a
    chunk, bf16 with softcap, head_dim no vector multiple."""
    check_in_child(
        "scalar",
        "check_chunk(2, 1, 100, 8, 2, 64, [250, 3])",
        "check_chunk(1, 1, 130, 2, 2, 33, [517], dtype=torch.bfloat16, softcap=3.0)",
        "check_chunk(1, 9, 40, 4, 2, 16, [60])",
    )


def test_chunk_whose_window_is_too_long_for_the_flash_copy():
    """fp32 chunks of 32+ tokens go to the flash-attention kernels, which copy a KV head's window per thread; a window
    whose copy would pass attention_cpu::kMaxKVPackBytes (64 MB: 2 * 4 bytes * 65,536 keys * 128) stays on the
    blocked kernel. Both sides of the limit, a full ring that wraps."""
    check_chunk(1, 32, 65_000, 1, 1, 128, [65_000 + 777])
    check_chunk(1, 32, 66_000, 1, 1, 128, [66_000 + 777])
