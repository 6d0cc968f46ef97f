"""flash_attn_with_kvcache(cache_leftpad=...): a left-padded batch, each row's tokens starting at its own slot.

What it must equal, independently of how the kernels do it: the same call on a cache whose rows were moved left by
their padding (slots pad .. cache_seqlens - 1 become 0 .. cache_seqlens - pad - 1), q and the new keys rotated at
the padded cache's slots as flash_attn does (cache_seqlens + t), the new tokens landing at slot cache_seqlens (not
cache_seqlens - pad) of the padded one. The padding slots hold NaN, so a kernel that reads one (a score or a value
row) fails. Every backend that runs the op:
the reference, the C++ CPU kernels, Triton (interpreter here, compiled on a GPU machine) and what a GPU dispatches
to by default (the CUDA C++ kernels refuse the argument, so that is Triton).
"""

from __future__ import annotations

import pytest
import torch
from attn_cases import BACKEND_DEVICES, needs_cpu_kernel
from utils import assert_error_within_ratio

import llmkernels
from llmkernels.reference.attention import flash_attn_ref, flash_attn_with_kvcache_ref, rotary_embedding

LENS, PADS, CAPACITY = [9, 0, 30], [4, 0, 30], 48  # row 1 empty; row 2 all padding: only its new tokens are keys

# (nheads, nheads_k, headdim, seqlen_q, seqlen_new, causal, window, softcap, alibi, rotary, indexed)
CASES = {
    "decode": (8, 2, 64, 1, 1, True, (-1, -1), 0.0, False, None, False),
    "chunk-window-rotary": (4, 4, 32, 5, 5, True, (6, 0), 0.0, False, "interleaved", False),
    "no-new-softcap-alibi": (4, 1, 40, 3, 0, False, (-1, -1), 10.0, True, None, False),
    "indexed-rotary-halves": (4, 2, 32, 2, 2, True, (-1, -1), 0.0, False, "halves", True),
    "chunk-17": (4, 2, 64, 17, 17, True, (-1, -1), 0.0, False, None, False),  # bf16: where the CPU's AMX tiles run
}
DEVICE_DTYPES = {
    ("reference", "cpu"): [torch.float32],
    ("cpu", "cpu"): [torch.float32, torch.bfloat16],
    ("triton", "cpu"): [torch.float32],  # the interpreter: slow, fp32 only
    ("triton", "cuda"): [torch.float16, torch.bfloat16],
}
BACKEND_DEVICES_GPU_DEFAULT = [
    *BACKEND_DEVICES,
    pytest.param("auto", "cuda", id="cuda-dispatch", marks=pytest.mark.cuda),
]


def _inputs(case, dtype, device):
    h, hk, d, sq, s_new, causal, window, softcap, alibi, rotary, indexed = CASES[case]
    b = len(LENS)
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    pads = torch.tensor(PADS, dtype=torch.int32, device=device)
    k_cache = torch.full((b, CAPACITY, hk, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    for i, (n, p) in enumerate(zip(LENS, PADS)):  # only each row's tokens are numbers
        k_cache[i, p:n].normal_()
        v_cache[i, p:n].normal_()
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k_new = torch.randn(b, s_new, hk, d, dtype=dtype, device=device) if s_new else None
    v_new = torch.randn_like(k_new) if s_new else None
    kw = {"causal": causal, "window_size": window, "softcap": softcap}
    if alibi:
        kw["alibi_slopes"] = torch.rand(b, h, device=device) * 0.5
    if rotary:
        angles = torch.rand(CAPACITY + sq, d // 4, device=device) * 6.3
        kw.update(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype),
                  rotary_interleaved=rotary == "interleaved")  # fmt: skip
    rows = None
    if indexed:  # q's rows read cache rows 2, 0, 1 of a larger cache
        rows = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
        k_big = torch.full((b + 1, *k_cache.shape[1:]), float("nan"), dtype=dtype, device=device)
        v_big = torch.full_like(k_big, float("nan"))
        k_big[rows.long()], v_big[rows.long()] = k_cache, v_cache
        k_cache, v_cache = k_big, v_big
        kw["cache_batch_idx"] = rows
    return q, k_cache, v_cache, k_new, v_new, lens, pads, kw


def _expected(q, k_cache, v_cache, k_new, v_new, lens, pads, kw, upcast):
    """The compact-cache formulation: rows moved left by their padding, rotary applied here at the padded slots
    (flash_attn's positions), then flash_attn_with_kvcache_ref without cache_leftpad. Returns (out, lse, the padded
    caches afterwards)."""
    kw = dict(kw)
    rows = kw.pop("cache_batch_idx", None)
    cos, sin = kw.pop("rotary_cos", None), kw.pop("rotary_sin", None)
    interleaved = kw.pop("rotary_interleaved", True)
    to = (lambda t: t.double()) if upcast else (lambda t: t)
    rows = list(range(q.shape[0])) if rows is None else rows.tolist()
    k_rows, v_rows = k_cache[rows], v_cache[rows]
    start = lens.long()  # the slots, padding included
    if cos is not None:
        positional_q = kw["window_size"] != (-1, -1) or kw["causal"]
        steps = torch.arange(q.shape[1], device=q.device) if positional_q else torch.zeros(q.shape[1], dtype=torch.long)
        q = rotary_embedding(q, cos, sin, start[:, None] + steps.to(q.device), interleaved)
        if k_new is not None:
            k_new = rotary_embedding(k_new, cos, sin, start[:, None] + torch.arange(k_new.shape[1], device=q.device),
                                     interleaved)  # fmt: skip
    compact_k, compact_v = torch.zeros_like(k_rows), torch.zeros_like(v_rows)
    for i, (n, p) in enumerate(zip(LENS, PADS)):
        compact_k[i, : n - p], compact_v[i, : n - p] = k_rows[i, p:n], v_rows[i, p:n]
    compact_k, compact_v = to(compact_k), to(compact_v)
    out, lse = flash_attn_with_kvcache_ref(
        to(q), compact_k, compact_v, None if k_new is None else to(k_new), None if v_new is None else to(v_new),
        (lens - pads), upcast=upcast, return_softmax_lse=True, **kw,
    )  # fmt: skip
    k_after, v_after = k_cache.clone(), v_cache.clone()
    s_new = 0 if k_new is None else k_new.shape[1]
    for i, (n, p) in enumerate(zip(LENS, PADS)):  # the new tokens at slot cache_seqlens of the padded cache
        k_after[rows[i], n : n + s_new] = compact_k[i, n - p : n - p + s_new].to(k_cache.dtype)
        v_after[rows[i], n : n + s_new] = compact_v[i, n - p : n - p + s_new].to(v_cache.dtype)
    return out, lse, k_after, v_after


def _run(backend, *args, **kw):
    if backend == "auto":
        return llmkernels.flash_attn_with_kvcache(*args, **kw)
    with llmkernels.use_backend(backend):
        return llmkernels.flash_attn_with_kvcache(*args, **kw)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES_GPU_DEFAULT)
def test_matches_the_compact_cache(backend, device, case):
    for dtype in DEVICE_DTYPES.get((backend, device), [torch.float16, torch.bfloat16]):
        q, k_cache, v_cache, k_new, v_new, lens, pads, kw = _inputs(case, dtype, device)
        exact, exact_lse, k_after, v_after = _expected(q, k_cache, v_cache, k_new, v_new, lens, pads, kw, True)
        out, lse = _run(backend, q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, cache_leftpad=pads,
                        return_softmax_lse=True, **kw)  # fmt: skip
        assert not out.isnan().any(), "a padding slot (NaN) was read"
        torch.testing.assert_close(k_cache, k_after, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v_cache, v_after, rtol=0, atol=0, equal_nan=True)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)
        else:
            same, _, _, _ = _expected(q, k_cache, v_cache, k_new, v_new, lens, pads, kw, False)
            assert_error_within_ratio(out, exact, same, ratio=2.0)
        torch.testing.assert_close(lse.double(), exact_lse.double(), rtol=1e-4, atol=1e-4)
        if CASES[case][4] == 0:  # row 2, all padding and no new token, sees no key
            assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES_GPU_DEFAULT)
def test_strided_lengths_and_padding(backend, device):
    """cache_seqlens and cache_leftpad as columns of one (batch, 2) table: strided, read by row all the same."""
    dtype = DEVICE_DTYPES.get((backend, device), [torch.bfloat16])[0]
    q, k_cache, v_cache, k_new, v_new, lens, pads, kw = _inputs("decode", dtype, device)
    table = torch.stack([lens, pads], dim=1)
    want = _run(backend, q, k_cache.clone(), v_cache.clone(), k_new, v_new, cache_seqlens=lens, cache_leftpad=pads,
                **kw)  # fmt: skip
    got = _run(backend, q, k_cache, v_cache, k_new, v_new, cache_seqlens=table[:, 0], cache_leftpad=table[:, 1], **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES_GPU_DEFAULT)
def test_zero_padding_is_no_padding(backend, device):
    dtype = DEVICE_DTYPES.get((backend, device), [torch.bfloat16])[0]
    q, k_cache, v_cache, _, _, lens, _, kw = _inputs("no-new-softcap-alibi", dtype, device)
    k_cache, v_cache = k_cache.nan_to_num(0.5), v_cache.nan_to_num(-0.5)
    zeros = torch.zeros_like(lens)
    padded = _run(backend, q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=zeros, **kw)
    plain = _run(backend, q, k_cache, v_cache, cache_seqlens=lens, **kw)
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_left_padded_generation_equals_each_sequence_alone(backend, device):
    """The use case: prompts of different lengths left-padded to one length, prefilled together, then decoded one
    token per step, rotary applied by the op at the slots; each row's outputs equal causal attention over its own
    unpadded tokens rotated at those slots (RoPE is relative: any common offset gives the same scores)."""
    dtype, b, h, hk, d, padded_len, steps = torch.float32, 3, 4, 2, 32, 7, 3
    prompt_lens = [7, 3, 5]
    total = padded_len + steps
    angles = torch.rand(total, d // 2, device=device) * 6.3
    rope = {"rotary_cos": angles.cos(), "rotary_sin": angles.sin(), "rotary_interleaved": False}
    q, k, v = (torch.randn(b, total, n, d, dtype=dtype, device=device) for n in (h, hk, hk))
    pads = torch.tensor([padded_len - n for n in prompt_lens], dtype=torch.int32, device=device)
    k_cache = torch.full((b, total, hk, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    outs = [_run(backend, q[:, :padded_len], k_cache, v_cache, k[:, :padded_len], v[:, :padded_len],
                 cache_seqlens=torch.zeros(b, dtype=torch.int32, device=device), cache_leftpad=torch.zeros_like(pads),
                 causal=True, **rope)]  # fmt: skip
    # (the prefill above attends over the padding too, and its outputs are not compared; a real prefill would use
    # flash_attn_varlen_func. What matters is what the padding slots hold afterwards: numbers, never read.)
    for t in range(steps):
        lens = torch.full((b,), padded_len + t, dtype=torch.int32, device=device)
        step = slice(padded_len + t, padded_len + t + 1)
        outs.append(_run(backend, q[:, step], k_cache, v_cache, k[:, step], v[:, step], cache_seqlens=lens,
                         cache_leftpad=pads, causal=True, **rope))  # fmt: skip
    cos, sin = rope["rotary_cos"], rope["rotary_sin"]
    for i, n in enumerate(prompt_lens):
        slots = torch.arange(padded_len - n, total, device=device)[None]  # the row's tokens, where they are cached
        own_k = rotary_embedding(k[i : i + 1, padded_len - n :], cos, sin, slots, False)
        own_v = v[i : i + 1, padded_len - n :]
        own_q = rotary_embedding(q[i : i + 1, padded_len:], cos, sin, slots[:, n:], False)
        expect = flash_attn_ref(own_q.double(), own_k.double(), own_v.double(), causal=True)
        got = torch.cat([o[i : i + 1] for o in outs[1:]], dim=1)
        torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def _small(device="cpu"):
    q, k_cache, v_cache = torch.randn(2, 1, 4, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    return q, k_cache, v_cache, k_new, v_new, torch.tensor([3, 5], dtype=torch.int32)


@pytest.mark.parametrize("pad,error,match", [
    (torch.tensor([1, 2], dtype=torch.int64), TypeError, "cache_leftpad must have dtype in \\(int32\\)"),
    (torch.tensor([1, 2, 3], dtype=torch.int32), ValueError, "cache_leftpad must have shape"),
    (torch.tensor([[1, 2]], dtype=torch.int32), ValueError, "cache_leftpad must have 1 dimensions"),
    ([1, 2], TypeError, "cache_leftpad must be a torch.Tensor"),
])  # fmt: skip
def test_bad_argument_is_named(pad, error, match):
    q, k_cache, v_cache, k_new, v_new, lens = _small()
    with pytest.raises(error, match=match):
        llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, cache_leftpad=pad)


def test_not_with_a_block_table():
    q = torch.randn(2, 1, 4, 16)
    pages = torch.randn(4, 64, 2, 16)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    with pytest.raises(ValueError, match="cache_leftpad and block_table cannot be given together"):
        llmkernels.flash_attn_with_kvcache(q, pages, pages.clone(), cache_seqlens=3, block_table=table,
                                           cache_leftpad=torch.zeros(2, dtype=torch.int32))  # fmt: skip


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
@pytest.mark.parametrize("pad", [[4, 0], [-1, 0]], ids=["past-cache_seqlens", "negative"])
def test_out_of_range_values_are_refused_before_the_cache_is_written(backend, pad):
    q, k_cache, v_cache, k_new, v_new, lens = _small()
    before = k_cache.clone()
    with llmkernels.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="cache_leftpad must lie in"):
        llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                           cache_leftpad=torch.tensor(pad, dtype=torch.int32))  # fmt: skip
    assert torch.equal(k_cache, before)


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------
@needs_cpu_kernel
def test_opcheck_cpu():
    q, k_cache, v_cache, k_new, v_new, lens = _small()
    pads = torch.tensor([1, 5], dtype=torch.int32)
    args = (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, None, None, None, None, True, None, None, pads)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache.default, args)


@needs_cpu_kernel
def test_compile_fullgraph():
    q, k_cache, v_cache, k_new, v_new, lens = _small()
    pads = torch.tensor([1, 5], dtype=torch.int32)

    def f(q, k_cache, v_cache, k_new, v_new, lens, pads):
        return llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                  cache_leftpad=pads, causal=True)  # fmt: skip

    eager = f(q, k_cache.clone(), v_cache.clone(), k_new, v_new, lens, pads)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k_cache, v_cache, k_new, v_new, lens, pads)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.cuda
def test_cuda_cpp_op_refuses_it():
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16, device="cuda")
    k_cache = torch.randn(1, 16, 4, 64, dtype=torch.float16, device="cuda")
    lens = torch.tensor([4], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="cache_leftpad"):
        torch.ops.llmkernels.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), None, None, lens, 0.125, -1, 0, 0.0,
                                                     cache_leftpad=torch.zeros_like(lens))  # fmt: skip


@needs_cpu_kernel
def test_the_cpu_op_names_cache_leftpad():
    q, k_cache, v_cache, k_new, v_new, lens = _small()
    args = (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0, None, None, None, None, True, None, None)
    with pytest.raises(RuntimeError, match="cache_leftpad must have dtype int32"):
        torch.ops.llmkernels.flash_attn_with_kvcache(*args, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cache_leftpad must have shape"):
        torch.ops.llmkernels.flash_attn_with_kvcache(*args, torch.zeros(3, dtype=torch.int32))
