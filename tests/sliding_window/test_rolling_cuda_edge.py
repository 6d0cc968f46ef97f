"""Edge cases of the CUDA rolling-window kernels (csrc/sliding_window/*.cu) that test_rolling_cache.py misses:
softcap (the kernel's tanhf is tanh.approx.f32 under --use_fast_math), a misaligned q refused by name, more
(batch, head) programs than grid y holds (both GPU kernels), a negative length the append must not act on, and
the grouping of query heads: one block serves up to 4 query heads of a KV head (tiles of a larger group, the
last one partial), with and without the split over the window."""

import pytest
import torch
from test_rolling_cache import run_generation, skip_unless_built

from llmkernels.reference.sliding_window import rolling_cache_append_ref, rolling_window_attn_ref
from tests.utils import assert_error_within_ratio


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [16, 1000])  # 1000: split over the window plus the combine kernel
def test_generation_gpu_softcap(dtype, window):
    chunks = [1, 9, 20, 1, 1] if window == 16 else [1, 3, 1, 1]
    run_generation("cuda", window, chunks, dtype, "cuda", offsets=(0, 21, 2 * window + 5), softcap=5.0)


@pytest.mark.cuda
def test_cuda_misaligned_q_is_refused():
    skip_unless_built("cuda")
    k, v = (torch.randn(1, 2, 2, 24, dtype=torch.float16, device="cuda") for _ in range(2))
    k_ring, v_ring = (torch.randn(1, 8, 2, 24, dtype=torch.float16, device="cuda") for _ in range(2))
    q = torch.randn(1 * 2 * 4 * 24 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 2, 4, 24)  # 2-byte offset
    seqlens = torch.tensor([3], dtype=torch.int32, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="q"):
        torch.ops.llmkernels.rolling_window_attn(q, k, v, k_ring, v_ring, seqlens, 0.2, 0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batch_times_heads_past_grid_y(backend):
    """4100 x 16 = 65600 (batch, head) pairs: past grid y's 65535, where the Triton kernel used to put them."""
    if backend == "cuda":
        skip_unless_built("cuda")
        attn = torch.ops.llmkernels.rolling_window_attn
    else:
        from llmkernels.triton.sliding_window import rolling_window_attn_triton as attn
    batch, chunk, heads, heads_k, window, d = 4100, 2, 16, 4, 8, 32
    q = torch.randn(batch, chunk, heads, d, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(batch, chunk, heads_k, d, dtype=torch.float16, device="cuda") for _ in range(2))
    k_ring, v_ring = (torch.randn(batch, window, heads_k, d, dtype=torch.float16, device="cuda") for _ in range(2))
    seqlens = torch.randint(0, 3 * window, (batch,), dtype=torch.int32, device="cuda")
    out = attn(q, k, v, k_ring, v_ring, seqlens, d**-0.5, 0.0)
    for rows in (slice(0, 3), slice(batch - 3, batch)):  # the reference loops over rows: check both ends
        args = (q[rows], k[rows], v[rows], k_ring[rows], v_ring[rows], seqlens[rows], d**-0.5)
        exact, same = rolling_window_attn_ref(*args), rolling_window_attn_ref(*args, upcast=False)
        assert_error_within_ratio(out[rows], exact, same, ratio=2.0)


@pytest.mark.cuda
def test_cuda_append_ignores_a_negative_length():
    """A negative seqlens[b] made a negative ring slot: the append wrote before the row (here: into a guard row
    in front of the ring). The row is now left alone; the other rows are written as the reference does."""
    skip_unless_built("cuda")
    window, d = 4, 16
    guard_k = torch.randn(3, window, 2, d, dtype=torch.bfloat16, device="cuda")
    guard_v = guard_k.clone()
    k_ring, v_ring = guard_k[1:], guard_v[1:]  # row 0 of each buffer sits just before the ring
    k, v = (torch.randn(2, 3, 2, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    seqlens = torch.tensor([-3, 5], dtype=torch.int32, device="cuda")
    expect_k, expect_v = guard_k.clone(), guard_v.clone()
    rolling_cache_append_ref(expect_k[2:], expect_v[2:], k[1:], v[1:], seqlens[1:])
    torch.ops.llmkernels.rolling_cache_append(k_ring, v_ring, k, v, seqlens)
    torch.testing.assert_close(guard_k, expect_k, rtol=0, atol=0)
    torch.testing.assert_close(guard_v, expect_v, rtol=0, atol=0)


def _poison_unread_slots(ring: torch.Tensor, seqlens: list[int]) -> None:
    """NaN in every ring slot no query of the chunk may read: never written (n < W) or the oldest (slot n % W)."""
    window = ring.shape[1]
    for b, n in enumerate(seqlens):
        if n < window:
            ring[b, n:] = float("nan")
        else:
            ring[b, n % window] = float("nan")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "batch,chunk,heads,dtype,softcap",
    [
        (40, 1, (32, 8, 128), torch.bfloat16, 0.0),  # Mistral's heads, 320 blocks: no split
        (3, 1, (32, 8, 128), torch.float16, 5.0),  # split over the window, then the combine kernel
        (3, 3, (12, 2, 40), torch.bfloat16, 0.0),  # 6 heads a KV head: tiles of 4 and 2; d in the 64 bucket
        (2, 2, (9, 1, 256), torch.float16, 5.0),  # 9 heads: tiles of 4, 4 and 1
        (60, 1, (5, 5, 64), torch.bfloat16, 0.0),  # no GQA (one head a tile), no split
        (70, 2, (6, 2, 24), torch.float16, 5.0),  # 3 heads a KV head (one partial tile), 280 blocks: no split
    ],
)
def test_cuda_grouped_heads(batch, chunk, heads, dtype, softcap):
    skip_unless_built("cuda")
    nheads, nheads_k, d = heads
    window = 300
    gen = torch.Generator().manual_seed(batch * 1000 + nheads * 10 + chunk)
    lens = [0, 7, window - 1, window, window + 1, 2 * window + 13][:batch]
    lens += torch.randint(0, 4 * window, (batch - len(lens),), generator=gen).tolist()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, chunk, nheads, d, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(batch, chunk, nheads_k, d, generator=gen).to("cuda", dtype) for _ in range(2))
    k_ring, v_ring = (torch.randn(batch, window, nheads_k, d, generator=gen).to("cuda", dtype) for _ in range(2))
    _poison_unread_slots(k_ring, lens)
    _poison_unread_slots(v_ring, lens)
    out = torch.ops.llmkernels.rolling_window_attn(q, k, v, k_ring, v_ring, seqlens, d**-0.5, softcap)
    args = (q, k, v, k_ring, v_ring, seqlens)
    exact = rolling_window_attn_ref(*(t.double() for t in args[:5]), seqlens, d**-0.5, softcap)
    same = rolling_window_attn_ref(*args, d**-0.5, softcap, upcast=False)
    assert_error_within_ratio(out, exact, same, ratio=2.0)
