"""The GQA-sharing CUDA decode kernel of flash_attn_with_kvcache (LLMKERNELS_DECODE_KERNEL=gqa, read per call):
against the reference over head dims of every bucket (exact and padded), group sizes that fill, split and
underfill the kernel's 4-row tiles, 1-3 query rows, ragged and empty caches with NaN past each row's keys,
new-token appends, causal / windowed / soft-capped scores, batch 1 long contexts (split keys and the combine)
and a large batch (one split), strided views. All cuda-marked: they run on the GPU machine only."""

import pytest
import torch
from attn_cases import DTYPES, check_lengths_past_the_capacity, run_kvcache_cuda
from utils import assert_error_within_ratio, poison_

import llmkernels
from llmkernels.reference.attention import visible_mask

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def gqa_decode_kernel(monkeypatch):
    monkeypatch.setenv("LLMKERNELS_DECODE_KERNEL", "gqa")


def _caches(lens, capacity, nheads_k, headdim, dtype, extra_heads=0):
    """Caches holding random keys up to each row's length and NaN after; extra_heads > 0 makes them a head slice
    of a wider buffer (strides that are not the contiguous ones)."""
    shape = (len(lens), capacity, nheads_k + extra_heads, headdim)
    k_buf = poison_(torch.empty(shape, dtype=dtype, device="cuda"))
    v_buf = poison_(torch.empty(shape, dtype=dtype, device="cuda"))
    k_cache, v_cache = k_buf[:, :, extra_heads:], v_buf[:, :, extra_heads:]
    for i, n in enumerate(lens):
        k_cache[i, :n].normal_()
        v_cache[i, :n].normal_()
    return k_cache, v_cache


def _check(lens, capacity, s_new, seqlen_q, nheads, nheads_k, headdim, dtype, extra_heads=0, **kw):
    k_cache, v_cache = _caches(lens, capacity, nheads_k, headdim, dtype, extra_heads)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    batch = len(lens)
    # q as a (seqlen, head)-transposed view: its strides are not the contiguous ones either.
    q = torch.randn(batch, nheads, seqlen_q, headdim, dtype=dtype, device="cuda").transpose(1, 2)
    k_new = torch.randn(batch, s_new, nheads_k, headdim, dtype=dtype, device="cuda") if s_new else None
    v_new = torch.randn_like(k_new) if s_new else None
    out, exact, same = run_kvcache_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_error_within_ratio(out, exact, same, ratio=2.0)
    return out


# (nheads, nheads_k): group 4 (one full tile), 8 (two tiles), 3 (a partial tile), 1 (MHA: 1 row of 4), 12 (three).
HEADS = [(32, 8), (16, 2), (6, 2), (5, 5), (12, 1)]
# Head dims: each bucket (32, 64, 128, 256) exactly and padded (8 -> 32, 40 -> 64, 96 -> 128, 136 -> 256).
HEAD_DIMS = [8, 32, 40, 64, 96, 128, 136, 256]
# Ragged lengths: empty, one key, one short of / one past a tile of keys (32 at d 128), long enough for many tiles.
LENS = [0, 1, 31, 33, 517]


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("h,hk", HEADS, ids=str)
def test_decode_one_token(dtype, d, h, hk):
    """One query, one new token appended (so even the empty cache sees a key), full attention."""
    _check(LENS, 530, 1, 1, h, hk, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("d", [64, 128, 136])
@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, (-1, -1), 0.0), (True, (50, 0), 0.0), (False, (7, 3), 0.0), (True, (-1, -1), 15.0), (False, (-1, -1), 0.0)],
    ids=str,
)
@pytest.mark.parametrize("seqlen_q,s_new", [(1, 0), (2, 2), (3, 5)], ids=str)
def test_bands_softcap_and_several_queries(dtype, d, causal, window, softcap, seqlen_q, s_new):
    """Up to 3 query rows x group 4 (12 packed rows: 3 tiles with different bands), windows that hide most keys,
    and rows whose band is empty (length 0 without new tokens: out 0)."""
    out = _check(
        [0, 5, 40, 333], 340, s_new, seqlen_q, 8, 2, d, dtype, causal=causal, window_size=window, softcap=softcap
    )
    if s_new == 0:
        assert (out[0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("d,window", [(128, (-1, -1)), (64, (-1, -1)), (256, (1000, 0)), (96, (64, 0))], ids=str)
def test_long_context_batch_1_splits(dtype, d, window):
    """Batch 1, 8 KV heads: 8 blocks, so the host splits ~9000 keys 66 ways on an H100 (the combine kernel), a
    narrow window leaving most splits empty; strided caches and an odd length."""
    _check([9001], 9100, 1, 1, 32, 8, d, dtype, extra_heads=3, causal=True, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize(
    "h,d,seqlen_q,window,softcap",
    [(32, 128, 1, (-1, -1), 0.0), (64, 64, 2, (40, 0), 0.0), (32, 256, 3, (-1, -1), 20.0)],
    ids=str,
)
def test_large_batch_unsplit(dtype, h, d, seqlen_q, window, softcap):
    """Batch 70 x 8 KV heads >= 560 blocks: one split (outputs stored by the main kernel, no combine); ragged
    lengths around the tile size, several query rows with their own bands."""
    lens = [(37 * i) % 301 for i in range(70)]
    _check(lens, 310, 1, seqlen_q, h, 8, d, dtype, causal=True, window_size=window, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("d", [64, 32])
def test_the_most_splits(dtype, d):
    """One block (batch 1, one KV head of 4 query heads) over 20000 keys: 128 splits on a 132-SM GPU (the cap,
    kDecodeMaxSplits: each lane of the combine's weight warp holds 4 lse's), and with a narrow window most of
    them see no key."""
    _check([19999], 20000, 1, 1, 4, 1, d, dtype, causal=True)
    _check([19999], 20000, 1, 1, 4, 1, d, dtype, causal=True, window_size=(300, 0))


@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize(
    "d,causal,window", [(40, True, (-1, -1)), (96, False, (-1, 1)), (136, False, (2, -1))], ids=str
)
def test_rows_that_see_no_key_beside_rows_that_do(dtype, d, causal, window):
    """3 queries x group 3: a 4-row tile spans two queries, and with caches shorter than seqlen_q (negative shift)
    some of its rows see no key (out exactly 0) while the others do; windows bounded on one side only, and a
    softmax_scale that is not the default."""
    lens = [1, 2, 0, 7]
    out = _check(lens, 12, 0, 3, 6, 2, d, dtype, causal=causal, window_size=window, softmax_scale=0.3)
    left, right = window[0], 0 if causal else window[1]
    mixed = False
    for b, n in enumerate(lens):
        sees = visible_mask(3, n, left, right).any(1).cuda()
        mixed |= bool(sees.any()) and not bool(sees.all())
        assert (out[b, ~sees] == 0).all()
    assert mixed or right < 0  # only a right bound can leave a row of a non-empty cache without keys


def test_the_switch_runs_the_decode_kernels(monkeypatch):
    """Every test above passes just as well on the forward kernel: the profiler must see the decode kernel and,
    with split keys, its combine, and neither with the switch off."""
    from torch.profiler import ProfilerActivity, profile

    k_cache, v_cache = _caches([3000], 3000, 8, 128, torch.bfloat16)
    q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")

    def kernel_names():
        with profile(activities=[ProfilerActivity.CUDA]) as prof, llmkernels.use_backend("cuda"):
            llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3000)
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        if not names:
            pytest.skip("the profiler records no CUDA kernels here (no CUPTI)")
        return names

    names = kernel_names()
    assert "flash_decode_gqa_kernel" in names and "flash_decode_combine_kernel" in names, names
    monkeypatch.setenv("LLMKERNELS_DECODE_KERNEL", "fwd")
    assert "flash_decode" not in kernel_names()


def test_more_packed_rows_than_the_kernel_takes():
    """5 queries x group 4 = 20 packed rows (> 16): the switch leaves these to the forward kernel."""
    _check([3, 200], 210, 5, 5, 8, 2, 128, torch.float16, causal=True)


def test_lengths_past_the_capacity_stay_in_the_row():
    """8 query heads on 2 KV heads: a full 4-row tile per KV head."""
    check_lengths_past_the_capacity("cuda", nheads=8)


def test_matches_the_forward_kernel(monkeypatch):
    """The same decode step through both kernels (the switch read per call) agrees to rounding."""
    lens = [4000, 77, 1]
    k_cache, v_cache = _caches(lens, 4096, 8, 128, torch.bfloat16)
    q = torch.randn(3, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    with llmkernels.use_backend("cuda"):
        new = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)
        monkeypatch.setenv("LLMKERNELS_DECODE_KERNEL", "fwd")
        old = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)
    torch.testing.assert_close(new, old, rtol=2e-2, atol=2e-2)
