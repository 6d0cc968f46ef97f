"""ALiBi (alibi_slopes) through the public functions: the reference against independent formulations, then the
C++ CPU kernels (and, on a GPU, whatever the dispatch picks: Triton, since the CUDA C++ kernels refuse slopes)
against the reference for flash_attn_func (forward and gradients), flash_attn_varlen_func and
flash_attn_with_kvcache; opcheck, torch.compile and argument errors. The Triton kernels' own ALiBi cases run
under the interpreter in test_alibi_triton.py."""

import pytest
import torch
from attn_cases import FP32_TOL, check_flash_attn, needs_cpu_kernel, random_qkv
from utils import assert_error_within_ratio

import llmkernels
from llmkernels.reference.attention import (
    alibi_bias,
    attention_naive,
    flash_attn_fwd_ref,
    flash_attn_varlen_ref,
    flash_attn_with_kvcache_ref,
    visible_mask,
)


def _slopes(batch, nheads, per_batch, device="cpu"):
    """ALiBi's geometric slopes (2^(-8 h / nheads)), jittered per batch row when per_batch so rows differ."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / nheads) for h in range(nheads)])
    if per_batch:
        base = base * (0.5 + torch.rand(batch, 1))
    return base.to(device)


# ---------------------------------------------------------------------------------------------------
# The reference's definition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_batch", [False, True], ids=["1d", "2d"])
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((-1, 0), 0.0), ((3, 2), 4.0)])
def test_reference_matches_loops(per_batch, window, softcap):
    q, k, v = random_qkv(2, 5, 9, 4, 2, 8, torch.float64, "cpu")
    slopes = _slopes(2, 4, per_batch)
    out, _ = flash_attn_fwd_ref(q, k, v, 0.4, *window, softcap, alibi_slopes=slopes)
    naive = attention_naive(q, k, v, 0.4, *window, softcap, alibi_slopes=slopes)
    torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, flash_attn_fwd_ref(q, k, v, 0.4, *window, softcap)[0], atol=1e-3)


def test_reference_matches_sdpa_with_a_float_mask():
    """SDPA with an additive bias (the bias and the causal mask as one float mask) is a third formulation."""
    b, sq, sk, h = 2, 7, 12, 4
    q, k, v = random_qkv(b, sq, sk, h, h, 16, torch.float64, "cpu")
    slopes = _slopes(b, h, True)
    bias = alibi_bias(slopes, b, h, sq, sk, torch.float64).expand(b, h, sq, sk).clone()
    bias.masked_fill_(~visible_mask(sq, sk, -1, 0), float("-inf"))
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=0.25
    ).transpose(1, 2)
    out, _ = flash_attn_fwd_ref(q, k, v, 0.25, -1, 0, 0.0, alibi_slopes=slopes)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# flash_attn_func
# ---------------------------------------------------------------------------------------------------
# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap, per_batch)
CASES = [
    (2, 70, 133, 4, 2, 64, False, (-1, -1), 0.0, False),
    (2, 70, 133, 4, 2, 64, True, (-1, -1), 0.0, True),
    (1, 17, 17, 8, 1, 40, True, (-1, -1), 0.0, True),  # MQA, head dim not a SIMD multiple
    (3, 1, 113, 4, 4, 32, True, (-1, -1), 0.0, False),  # decode: the few-row forward path
    (1, 113, 64, 4, 2, 64, False, (7, 3), 5.0, True),  # seqlen_q > seqlen_k, window, soft-cap
    (2, 130, 130, 2, 2, 128, False, (-1, -1), 30.0, False),  # soft-cap: its derivative without the bias
]


def _id(case):
    b, sq, sk, h, hk, d, causal, window, softcap, per_batch = case
    return f"b{b}-q{sq}-k{sk}-h{h}/{hk}-d{d}" + ("-causal" if causal else "") + (
        f"-w{window[0]},{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "") + (
        "-2d" if per_batch else "-1d")  # fmt: skip


def _run_case(backend, device, dtype, case):
    b, sq, sk, h, hk, d, causal, window, softcap, per_batch = case
    inputs = random_qkv(b, sq, sk, h, hk, d, dtype, device)
    check_flash_attn(backend, inputs, causal=causal, window_size=window, softcap=softcap,
                     alibi_slopes=_slopes(b, h, per_batch, device))  # fmt: skip


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_flash_attn_cpu(dtype, case):
    _run_case("cpu", "cpu", dtype, case)  # (bf16 head dims of 32 multiples would run on AMX without slopes)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_flash_attn_cuda(dtype, case):
    _run_case("triton", "cuda", dtype, case)


@pytest.mark.cuda
def test_cuda_dispatch_sends_slopes_to_triton():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 64, torch.bfloat16, "cuda")
    slopes = _slopes(1, 2, False, "cuda")
    assert llmkernels.ops.attention.flash_attn.why_not("cuda", q, k, v, 0.125, -1, -1, 0.0, alibi_slopes=slopes)
    out = llmkernels.flash_attn_func(q, k, v, alibi_slopes=slopes)
    expect = flash_attn_fwd_ref(q, k, v, 0.125, alibi_slopes=slopes)[0]
    torch.testing.assert_close(out.float(), expect.float(), rtol=2e-2, atol=2e-2)


@needs_cpu_kernel
def test_softmax_lse_is_that_of_the_biased_scores():
    q, k, v = random_qkv(2, 9, 20, 4, 2, 32, torch.float32, "cpu")
    slopes = _slopes(2, 4, True)
    out, lse, _ = llmkernels.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True)
    ref_out, ref_lse = flash_attn_fwd_ref(q.double(), k.double(), v.double(), 32**-0.5, -1, 0, 0.0,
                                          alibi_slopes=slopes)  # fmt: skip
    torch.testing.assert_close(out.double(), ref_out, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ---------------------------------------------------------------------------------------------------
def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["1d", "2d"])
def test_varlen_cpu(dtype, per_batch):
    lens_q, lens_k, h, hk, d = [5, 0, 17, 70], [9, 4, 17, 40], 4, 2, 32
    q = torch.randn(sum(lens_q), h, d, dtype=dtype)
    k, v = torch.randn(sum(lens_k), hk, d, dtype=dtype), torch.randn(sum(lens_k), hk, d, dtype=dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    slopes = _slopes(len(lens_q), h, per_batch)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(causal=True, alibi_slopes=slopes)
    dout = torch.randn(q.shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = llmkernels.flash_attn_varlen_func(*leaves, *args, **kw)
    out.backward(dout.to(dtype))
    grads = [t.grad for t in leaves]
    if dtype == torch.float32:
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        ref = flash_attn_varlen_ref(*exact, cu_q, cu_k, **kw)
        ref.backward(dout.double())
        torch.testing.assert_close(out.double(), ref, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for g, e in zip(grads, exact):
            torch.testing.assert_close(g.double(), e.grad, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1])
    else:
        outs, all_grads = [], []
        for upcast in (True, False):
            leaves = [t.clone().float().requires_grad_() if upcast else t.clone().requires_grad_() for t in (q, k, v)]
            ref = flash_attn_varlen_ref(*leaves, cu_q, cu_k, upcast=upcast, **kw)
            ref.backward(dout.to(ref.dtype))
            outs.append(ref)
            all_grads.append([t.grad for t in leaves])
        assert_error_within_ratio(out, outs[0], outs[1], ratio=2.0)
        for name, g, e, s in zip(("dq", "dk", "dv"), grads, *all_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)


def test_varlen_slopes_shape_names_the_sequences():
    q, k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(2, 2\)"):
        llmkernels.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, alibi_slopes=torch.ones(3, 2))


# ---------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------------------------------
def _kvcache_case(device, dtype, seqlen_q, paged):
    b, h, hk, d, capacity = 3, 8, 2, 64, 192
    lens = torch.tensor([0, 70, 130], dtype=torch.int32, device=device)
    q = torch.randn(b, seqlen_q, h, d, dtype=dtype, device=device)
    k_new, v_new = (torch.randn(b, seqlen_q, hk, d, dtype=dtype, device=device) for _ in range(2))
    if paged:  # 64-token pages, rows' pages interleaved in reverse
        pages = capacity // 64
        table = torch.arange(b * pages, dtype=torch.int32, device=device).flip(0).view(b, pages)
        k_cache, v_cache = (torch.randn(b * pages, 64, hk, d, dtype=dtype, device=device) for _ in range(2))
        return q, k_cache, v_cache, k_new, v_new, lens, {"block_table": table}
    k_cache, v_cache = (torch.randn(b, capacity, hk, d, dtype=dtype, device=device) for _ in range(2))
    return q, k_cache, v_cache, k_new, v_new, lens, {}


def _check_kvcache(device, dtype, seqlen_q, paged, per_batch):
    q, k_cache, v_cache, k_new, v_new, lens, extra = _kvcache_case(device, dtype, seqlen_q, paged)
    slopes = _slopes(q.shape[0], q.shape[2], per_batch, device)
    kw = dict(causal=True, alibi_slopes=slopes, **extra)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out, lse = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                  return_softmax_lse=True, **kw)  # fmt: skip
    exact, exact_lse = flash_attn_with_kvcache_ref(q, k_ref, v_ref, k_new, v_new, lens, return_softmax_lse=True,
                                                   upcast=True, **kw)  # fmt: skip
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
    else:
        same = flash_attn_with_kvcache_ref(q, k_ref.clone(), v_ref.clone(), None, None, lens + seqlen_q,
                                           upcast=False, **kw)  # fmt: skip
        assert_error_within_ratio(out, exact, same, ratio=2.0)
    torch.testing.assert_close(lse, exact_lse, rtol=1e-4, atol=1e-4)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seqlen_q,paged,per_batch", [(1, False, False), (1, True, True), (17, False, True)],
                         ids=["decode", "decode-paged", "chunk"])  # fmt: skip
def test_kvcache_cpu(dtype, seqlen_q, paged, per_batch):
    _check_kvcache("cpu", dtype, seqlen_q, paged, per_batch)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seqlen_q,paged,per_batch", [(1, False, False), (1, True, True), (17, False, True)],
                         ids=["decode", "decode-paged", "chunk"])  # fmt: skip
def test_kvcache_cuda(dtype, seqlen_q, paged, per_batch):
    _check_kvcache("cuda", dtype, seqlen_q, paged, per_batch)


@needs_cpu_kernel
def test_kvcache_token_by_token_equals_one_call():
    """Decoding with ALiBi one token at a time gives what attending to the whole sequence at once gives."""
    b, s, h, hk, d = 2, 12, 4, 2, 32
    q, k, v = random_qkv(b, s, s, h, hk, d, torch.float32, "cpu")
    slopes = _slopes(b, h, True)
    whole = llmkernels.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    k_cache, v_cache = torch.zeros(b, s, hk, d), torch.zeros(b, s, hk, d)
    steps = []
    for t in range(s):
        steps.append(llmkernels.flash_attn_with_kvcache(
            q[:, t : t + 1], k_cache, v_cache, k[:, t : t + 1], v[:, t : t + 1], cache_seqlens=t, causal=True,
            alibi_slopes=slopes,
        ))  # fmt: skip
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_kvcache_refuses_bad_slopes_before_writing_the_cache():
    q, k_cache, v_cache = torch.randn(2, 1, 4, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=3,
                                           alibi_slopes=torch.ones(2, 2))  # fmt: skip
    assert torch.equal(k_cache, before)


# ---------------------------------------------------------------------------------------------------
# The C++ ops: opcheck, their own checks, torch.compile
# ---------------------------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("per_batch", [False, True], ids=["1d", "2d"])
def test_opcheck(per_batch):
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 9, 12, 4, 2, 16, torch.float32, "cpu"))
    slopes = _slopes(2, 4, per_batch)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_fwd.default, (q, k, v, 0.25, -1, 0, 0.0, slopes))
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.25, -1, 0, 0.0, slopes)
    # (the backward op has no derivative: its inputs must not ask for one, or opcheck's autograd test raises)
    q, k, v = q.detach(), k.detach(), v.detach()
    args = (torch.randn_like(out), q, k, v, out.detach(), lse.detach(), 0.25, -1, 0, 0.0, None, slopes)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_bwd.default, args)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    kc, vc = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    kvargs = (q.detach()[:, :1], kc, vc, None, None, lens, 0.25, -1, 0, 0.0, None, None, None, None, True, None, slopes)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache.default, kvargs)


@needs_cpu_kernel
def test_cpu_op_checks_the_slopes():
    q, k, v = random_qkv(2, 4, 4, 4, 2, 16, torch.float32, "cpu")
    op = torch.ops.llmkernels.flash_attn_fwd
    with pytest.raises(RuntimeError, match="alibi_slopes must have dtype float32"):
        op(q, k, v, 0.25, -1, -1, 0.0, torch.ones(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="alibi_slopes must be"):
        op(q, k, v, 0.25, -1, -1, 0.0, torch.ones(3, 4))


@needs_cpu_kernel
def test_compile_fullgraph():
    q, k, v = random_qkv(2, 9, 12, 4, 2, 16, torch.float32, "cpu")
    slopes = _slopes(2, 4, True)

    def f(q, k, v, slopes):
        return llmkernels.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)

    q.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, slopes)
    out.sum().backward()
    q2 = q.detach().clone().requires_grad_()
    eager = f(q2, k, v, slopes)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(q.grad, q2.grad)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_slopes_are_refused(backend, bad):
    """The backends disagreed on them (whole rows NaN, or -inf - -inf); the host-side ones name the argument."""
    q, k, v = random_qkv(1, 3, 3, 2, 1, 16, torch.float32, "cpu")
    slopes = torch.tensor([0.5, bad])
    with llmkernels.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="slopes must be finite"):
        llmkernels.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_slopes_get_no_gradient_on_any_backend(backend):
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k, v = torch.randn(1, 7, 1, 16), torch.randn(1, 7, 1, 16)
    slopes = torch.rand(2, requires_grad=True)
    with llmkernels.use_backend(backend):
        llmkernels.flash_attn_func(q, k, v, alibi_slopes=slopes).square().sum().backward()
    assert slopes.grad is None and q.grad is not None
