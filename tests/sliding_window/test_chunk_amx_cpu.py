"""bf16 chunks of rolling_window_attn (16 tokens or more, head_dim a multiple of 32) on CPUs with AMX tiles:
csrc/sliding_window/cpu/chunk_attn_amx.cpp, the flash-attention AMX forward over keys read from the ring and the
chunk, against the fp64 reference within 2x the bf16 reference's error. Cases cross its 128-row query blocks and
256-key blocks: a ring that wraps, one not yet full, a fresh row (seqlens 0), a chunk longer than the window, a
window of 1, GQA / MQA, soft-capping, strided q. On CPUs without AMX the same cases run the blocked kernel (still
checked); the last test says which path ran."""

import pytest
import torch
from test_chunk_blocked_cpu import check_chunk
from utils import cpu_has_flag, saved_with_amx_on_and_off

AMX = cpu_has_flag("amx_bf16")


@pytest.mark.parametrize(
    "batch,chunk,window,nheads,nheads_k,head_dim,seqlens,softcap",
    [
        (2, 40, 100, 8, 2, 64, [250, 3], 0.0),  # the ring wraps in row 0; row 1's ring is not full
        (1, 300, 256, 4, 1, 128, [1000], 0.0),  # chunk longer than the window, MQA, 3 query blocks
        (2, 130, 600, 4, 2, 96, [0, 700], 0.0),  # a fresh row; keys cross 256-key blocks and the ring's end
        (1, 16, 1, 2, 2, 32, [5], 0.0),  # window 1: each query sees itself only
        (1, 64, 300, 2, 1, 64, [511], 5.0),  # soft-capped
    ],
)
def test_amx_chunk_matches_reference(batch, chunk, window, nheads, nheads_k, head_dim, seqlens, softcap):
    check_chunk(batch, chunk, window, nheads, nheads_k, head_dim, seqlens, dtype=torch.bfloat16, softcap=softcap,
                strided_q=True)  # fmt: skip


@pytest.mark.skipif(not AMX, reason="the CPU has no AMX tiles: the tile kernel is never taken here")
def test_the_amx_chunk_path_runs_and_can_be_turned_off():
    """LLMKERNELS_CPU_AMX=0 gives the blocked fp32 kernel (P not rounded to bf16): outputs differ a little."""
    code = (
        "import torch, llmkernels; torch.manual_seed(0);"
        "q = torch.randn(1, 64, 4, 64).bfloat16(); k, v = (torch.randn(1, 64, 2, 64).bfloat16() for _ in range(2));"
        "ring_k, ring_v = (torch.randn(1, 100, 2, 64).bfloat16() for _ in range(2));"
        "lens = torch.tensor([150], dtype=torch.int32);"
        "out = torch.ops.llmkernels.rolling_window_attn(q, k, v, ring_k, ring_v, lens, 0.125, 0.0);"
        "torch.save([out], sys.argv[1])"
    )
    (on,), (off,) = saved_with_amx_on_and_off(code)
    assert not torch.equal(on, off)
    torch.testing.assert_close(on.float(), off.float(), rtol=2e-2, atol=2e-2)
