"""The blocked CPU kernel of rolling_window_attn (chunks of 8+ rows per KV head) against the fp64 reference:
several query blocks and key tiles, the ring's wrap-around inside a tile, GQA groups wider than a block, strided
queries, and the AVX2 copy (LLMKERNELS_CPU_ISA=avx2 is read once per process, so that case runs in a child)."""

import os
import subprocess
import sys

import pytest
import torch

from llmkernels import _ext
from llmkernels.reference.sliding_window import rolling_window_attn_ref
from tests.utils import assert_error_within_ratio

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_low_precision_softcap(dtype):
    check_chunk(2, 24, 70, 4, 2, 40, [90, 1], dtype=dtype, softcap=3.0)


def test_blocked_avx2_copy():
    code = (
        "import torch\n"
        "from tests.sliding_window.test_chunk_blocked_cpu import check_chunk\n"
        "check_chunk(2, 40, 100, 8, 2, 64, [250, 3])\n"
        "check_chunk(1, 17, 130, 2, 2, 33, [517], dtype=torch.bfloat16, softcap=3.0)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, LLMKERNELS_CPU_ISA="avx2")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
