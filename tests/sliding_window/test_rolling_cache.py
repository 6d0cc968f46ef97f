"""Every backend of sliding_window_attn_with_cache against attention over the whole sequence with the window.

A generation is driven through the cache (a prefill chunk, then token by token, or a mix of chunk sizes),
rows starting at different positions (ragged batch); after every step the chunk's outputs must match
flash_attn_ref over each row's whole history with window (W - 1, 0), aligned bottom-right.
"""

import pytest
import torch

import llmkernels
from llmkernels import RollingKVCache, _ext, sliding_window_attn_with_cache, use_backend
from llmkernels.reference.attention import flash_attn_fwd_ref
from llmkernels.reference.sliding_window import rolling_cache_append_ref
from tests.utils import assert_error_within_ratio

NHEADS, NHEADS_K, HEAD_DIM = 4, 2, 24  # GQA, head_dim not a power of two


def skip_unless_built(backend: str) -> None:
    """The cpu/cuda backends need this family's kernels in the loaded build (the reference never does)."""
    if backend in ("cpu", "cuda") and not _ext.has_kernel("rolling_window_attn", backend.upper()):
        pytest.skip(f"the loaded build has no {backend} rolling_window_attn kernel ({llmkernels.extension_status()})")


def schedules(window: int) -> dict[str, list[int]]:
    """Chunk sizes adding up to 3W + 5 tokens: one prefill chunk then single tokens, or a mix."""
    total = 3 * window + 5
    out = {}
    for name, first in (("1", 1), ("7", 7), ("W-1", window - 1), ("W", window), ("W+3", window + 3)):
        if first >= 1:
            out[f"prefill{name}"] = [first] + [1] * (total - first)
    mixed = [c for c in (1, 7, window - 1, window + 3) if c >= 1]
    out["mixed"] = mixed + [1] * (total - sum(mixed))
    return out


def run_generation(
    backend, window, chunks, dtype, device, offsets=(0, 5), softcap=0.0, heads=(NHEADS, NHEADS_K, HEAD_DIM)
):
    """Drive `chunks` through a cache whose rows already hold `offsets` tokens; every step's outputs are
    kept and compared, position by position, with attention over each row's whole history."""
    skip_unless_built(backend)
    nheads, nheads_k, head_dim = heads
    batch, total = len(offsets), sum(chunks)
    # fp32: the same-precision reference is the fp32 reference itself (a blocked GEMM sum), while a kernel
    # sums up to W terms sequentially with a running rescale: allow ~100 fp32 roundings of an O(1) output.
    floor = 1e-5 if dtype == torch.float32 else None
    cache = RollingKVCache(batch, window, nheads_k, head_dim, dtype=dtype, device=device)
    cache.k.normal_(), cache.v.normal_()  # stale ring contents must never be read
    prefix = max(offsets)
    q = torch.randn(batch, total, nheads, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(batch, prefix + total, nheads_k, head_dim, dtype=dtype, device=device) for _ in range(2))
    # Row b's history is k[b, prefix - n_b:]: its first n_b tokens go into the ring before the chunks.
    for b, n in enumerate(offsets):
        rows = slice(prefix - n, prefix)
        rolling_cache_append_ref(cache.k[b : b + 1], cache.v[b : b + 1], k[b : b + 1, rows], v[b : b + 1, rows],
                                 torch.zeros(1, dtype=torch.int32, device=device))
    cache.seqlens.copy_(torch.tensor(offsets, dtype=torch.int32))
    outs, start = [], 0
    for chunk in chunks:
        new = slice(prefix + start, prefix + start + chunk)
        with use_backend(backend):
            outs.append(sliding_window_attn_with_cache(q[:, start : start + chunk], k[:, new], v[:, new], cache,
                                                       softcap=softcap))
        start += chunk
        assert cache.seqlens.tolist() == [n + start for n in offsets]
    out = torch.cat(outs, dim=1)
    rest = (head_dim**-0.5, window - 1, 0, softcap)
    for b, n in enumerate(offsets):
        tensors = (q[b : b + 1], k[b : b + 1, prefix - n :], v[b : b + 1, prefix - n :])
        exact, _ = flash_attn_fwd_ref(*(t.double() for t in tensors), *rest)
        same, _ = flash_attn_fwd_ref(*tensors, *rest, upcast=False)
        for step_start, chunk in zip(torch.tensor([0] + chunks).cumsum(0).tolist(), chunks):
            rows = slice(step_start, step_start + chunk)
            assert_error_within_ratio(out[b : b + 1, rows], exact[:, rows], same[:, rows], floor=floor,
                                      name=f"row {b}, chunk of {chunk} at position {n + step_start}")


@pytest.mark.parametrize("window", [1, 16, 64])
@pytest.mark.parametrize("schedule", ["prefill1", "prefill7", "prefillW-1", "prefillW", "prefillW+3", "mixed"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_generation_matches_whole_sequence_fp32(backend, window, schedule):
    chunks = schedules(window).get(schedule)
    if chunks is None:
        pytest.skip(f"chunk size {schedule} is empty for W={window}")
    if backend == "reference" and window == 64 and schedule != "mixed":
        pytest.skip("reference backend at W=64: the mixed schedule covers it (keeps the suite under budget)")
    run_generation(backend, window, chunks, torch.float32, "cpu", offsets=(0, window // 2 + 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_generation_low_precision_cpu(dtype, softcap):
    run_generation("cpu", 16, schedules(16)["mixed"], dtype, "cpu", offsets=(3, 0, 40), softcap=softcap)


@pytest.mark.parametrize("heads", [(3, 1, 17), (2, 2, 1), (8, 2, 113)])
def test_generation_odd_head_shapes_cpu(heads):
    # MQA with an odd head_dim, head_dim 1, and a head_dim that is no vector multiple.
    run_generation("cpu", 5, [1, 7, 1, 4, 1, 1], torch.bfloat16, "cpu", offsets=(2, 9), heads=heads)


@pytest.mark.triton_interp
@pytest.mark.parametrize("window,schedule,softcap", [(1, "mixed", 0.0), (4, "prefillW+3", 0.0), (4, "mixed", 5.0)])
def test_generation_triton_interpreter(window, schedule, softcap):
    pytest.importorskip("triton")
    run_generation("triton", window, schedules(window)[schedule], torch.float32, "cpu", offsets=(0, 3), softcap=softcap)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 16, 64, 256, 1000])
def test_generation_gpu(backend, dtype, window):
    chunks = [1, 7, window - 1, window, window + 3] if window > 1 else [1, 7, 4]
    chunks = [c for c in chunks if c >= 1]
    chunks += [1] * max(0, 3 * window + 5 - sum(chunks))
    if window > 64:  # token by token over 3W is slow in Python; a few decode steps after the chunks
        chunks = chunks[:5] + [1] * 20
    run_generation(backend, window, chunks, dtype, "cuda", offsets=(0, window // 2 + 3, 2 * window + 1))


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [8, 64, 72, 128, 256])
def test_cuda_head_dims_and_splits(head_dim):
    # Batch 1, long window: the split-over-the-window path with its combine.
    skip_unless_built("cuda")
    window, batch = 2048, 1
    cache = RollingKVCache(batch, window, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    prefix_k, prefix_v = (torch.randn(1, 3 * window + 11, 1, head_dim, dtype=torch.bfloat16, device="cuda")
                          for _ in range(2))
    q = torch.randn(1, 3 * window + 11, 8, head_dim, dtype=torch.bfloat16, device="cuda")
    with use_backend("cuda"):
        sliding_window_attn_with_cache(q[:, :-3], prefix_k[:, :-3], prefix_v[:, :-3], cache)
        out = sliding_window_attn_with_cache(q[:, -3:], prefix_k[:, -3:], prefix_v[:, -3:], cache)
    tensors, rest = (q[:, -3:], prefix_k, prefix_v), (head_dim**-0.5, window - 1, 0, 0.0)
    exact = flash_attn_fwd_ref(*(t.double() for t in tensors), *rest)[0]
    assert_error_within_ratio(out, exact, flash_attn_fwd_ref(*tensors, *rest, upcast=False)[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cache_memory_does_not_grow(backend):
    skip_unless_built(backend)
    window = 8
    cache = RollingKVCache(2, window, NHEADS_K, HEAD_DIM, dtype=torch.float32)
    pointers = lambda: (cache.k.data_ptr(), cache.v.data_ptr(), cache.seqlens.data_ptr())  # noqa: E731

    def feed(tokens):
        for _ in range(tokens):
            q = torch.randn(2, 1, NHEADS, HEAD_DIM)
            k, v = (torch.randn(2, 1, NHEADS_K, HEAD_DIM) for _ in range(2))
            with use_backend(backend):
                sliding_window_attn_with_cache(q, k, v, cache)

    feed(window)
    after_w = (pointers(), cache.nbytes, cache.k.untyped_storage().nbytes())
    feed(9 * window)
    assert cache.seqlens.tolist() == [10 * window] * 2
    assert (pointers(), cache.nbytes, cache.k.untyped_storage().nbytes()) == after_w


def test_reset_starts_over():
    cache = RollingKVCache(1, 4, 1, 8)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    first = sliding_window_attn_with_cache(q, k, v, cache)
    cache.reset()
    assert cache.seqlens.tolist() == [0]
    torch.testing.assert_close(sliding_window_attn_with_cache(q, k, v, cache), first)


def test_public_api_is_exported():
    assert llmkernels.RollingKVCache is RollingKVCache
    assert "rolling" in repr(RollingKVCache(1, 4, 1, 8)).lower()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_strided_views_as_inputs(backend):
    # Heads sliced out of a fused projection: contiguous only in the last dimension.
    skip_unless_built(backend)
    window, batch = 6, 2
    fused = torch.randn(batch, 9, NHEADS + 2 * NHEADS_K + 1, HEAD_DIM)
    q, k, v = fused[:, :, :NHEADS], fused[:, :, NHEADS : NHEADS + NHEADS_K], fused[:, :, NHEADS + NHEADS_K : -1]
    assert not q.is_contiguous()
    cache = RollingKVCache(batch, window, NHEADS_K, HEAD_DIM, dtype=torch.float32)
    expected_cache = RollingKVCache(batch, window, NHEADS_K, HEAD_DIM, dtype=torch.float32)
    with use_backend(backend):
        out = sliding_window_attn_with_cache(q, k, v, cache)
    with use_backend("reference"):
        expected = sliding_window_attn_with_cache(q.contiguous(), k.contiguous(), v.contiguous(), expected_cache)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, expected_cache.k)
    torch.testing.assert_close(cache.v, expected_cache.v)
