"""The bf16 kernels on AMX tiles (csrc/attention/cpu/kernel_amx.cpp forward, kernel_amx_bwd.cpp backward: products
on our tile micro-kernel, common/cpu_amx_tiles.h), taken for bf16 on CPUs with AMX-BF16, against the fp32
reference, on shapes that cross their blocks (forward: 128 query rows by 256 keys; backward: 128 by 128; 32-row
tile strips): windows that start inside a block, rows that see no key, query blocks from odd rows, soft-capping, GQA,
head dims 32 / 64 / 96 / 128 / 256, a KV cache with ragged lengths, packed variable-length batches, the gradient
of lse, the backward split over threads. On other CPUs the same cases run the vdpbf16ps / AVX2 kernels (still
checked); the last tests say which path ran."""

import pytest
import torch
from attn_cases import check_flash_attn, forward_backward, needs_cpu_kernel, random_qkv
from utils import assert_error_within_ratio, cpu_has_flag, saved_with_amx_on_and_off

import llmkernels
from llmkernels.reference.attention import flash_attn_ref, flash_attn_varlen_fwd_ref, flash_attn_with_kvcache_ref

AMX = cpu_has_flag("amx_bf16")

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap)
CASES = [
    (1, 300, 600, 8, 2, 128, True, (100, 0), 0.0),  # window starting inside a 256-key block, GQA
    (2, 129, 257, 4, 4, 64, False, (-1, -1), 0.0),  # one row / one key past a block
    (1, 400, 130, 4, 1, 96, True, (-1, -1), 5.0),  # seqlen_q > seqlen_k: the first rows see no key; MQA; softcap
    (1, 64, 1000, 2, 2, 256, False, (300, 40), 0.0),  # two-sided window, head dim 256 (four strips)
    (1, 16, 16, 2, 1, 64, True, (-1, -1), 0.0),  # the smallest call that takes the path
    (1, 600, 700, 4, 2, 64, True, (-1, -1), 0.0),  # five query blocks, the last 88 rows (rounded up to 96)
    (2, 513, 513, 2, 2, 32, False, (-1, -1), 0.0),  # one row past four query blocks, one key past two key blocks
]


@needs_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bf16_forward_against_reference(case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = (torch.randn(b, s, n, d).to(torch.bfloat16) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    with llmkernels.use_backend("cpu"):
        out, lse, _ = llmkernels.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    exact = flash_attn_ref(q.float(), k.float(), v.float(), **kw)
    same = flash_attn_ref(q, k, v, upcast=False, **kw)
    assert_error_within_ratio(out, exact, same, ratio=2.0)
    from llmkernels.reference.attention import flash_attn_fwd_ref, normalize_window

    _, ref_lse = flash_attn_fwd_ref(q.float(), k.float(), v.float(), d**-0.5, *normalize_window(causal, window),
                                    softcap)  # fmt: skip
    torch.testing.assert_close(lse, ref_lse, rtol=2e-2, atol=2e-2)  # -inf rows included


@needs_cpu_kernel
def test_bf16_prefill_into_a_ragged_cache():
    q = torch.randn(3, 40, 8, 128).to(torch.bfloat16)
    k_new, v_new = (torch.randn(3, 40, 2, 128).to(torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.randn(3, 700, 2, 128).to(torch.bfloat16) for _ in range(2))
    lens = torch.tensor([0, 250, 600], dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    with llmkernels.use_backend("cpu"):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)
    exact = flash_attn_with_kvcache_ref(q.float(), kc.float(), vc.float(), k_new.float(), v_new.float(), lens,
                                        causal=True)  # fmt: skip
    same = flash_attn_with_kvcache_ref(q, kc, vc, k_new, v_new, lens, causal=True, upcast=False)
    assert_error_within_ratio(out, exact, same, ratio=2.0)


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap) for the backward
BWD_CASES = [
    (1, 300, 600, 8, 2, 128, True, (100, 0), 0.0),  # window starting inside a 128-key block, GQA
    (2, 129, 257, 4, 4, 64, False, (-1, -1), 0.0),  # one row / one key past a block
    (1, 400, 130, 4, 1, 96, True, (-1, -1), 5.0),  # the first rows see no key; MQA; softcap
    (1, 64, 1000, 2, 2, 256, False, (300, 40), 0.0),  # two-sided window, head dim 256
    (1, 131, 300, 4, 2, 32, True, (-1, -1), 0.0),  # shift 169: key blocks' first queries at odd rows
    (1, 1, 300, 2, 1, 64, False, (-1, -1), 0.0),  # one query row (half a row pair)
]


@needs_cpu_kernel
@pytest.mark.parametrize("case", BWD_CASES, ids=[str(i) for i in range(len(BWD_CASES))])
def test_bf16_backward_against_reference(case):
    torch.manual_seed(len(BWD_CASES) + BWD_CASES.index(case))
    b, sq, sk, h, hk, d, causal, window, softcap = case
    inputs = random_qkv(b, sq, sk, h, hk, d, torch.bfloat16, "cpu")
    check_flash_attn("cpu", inputs, causal=causal, window_size=window, softcap=softcap)


@needs_cpu_kernel
def test_bf16_backward_split_lse_gradient_deterministic():
    """One (batch, KV head) pair on 3 threads: the key blocks split over 3 tasks (each with its own dq buffer), a
    window, GQA; a gradient reaching lse too. Two runs bitwise equal, both within 3x the bf16 reference's error."""
    torch.manual_seed(11)
    q, k, v = random_qkv(1, 150, 700, 4, 1, 64, torch.bfloat16, "cpu")
    dout, dlse = torch.randn_like(q), torch.randn(1, 4, 150)
    scale, window = 0.125, (300, 0)
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, scale, *window, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        grads = [
            torch.ops.llmkernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, *window, 0.0, dlse) for _ in range(2)
        ]
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*grads):
        assert torch.equal(first, second)

    cu_q, cu_k = torch.tensor([0, 150], dtype=torch.int32), torch.tensor([0, 700], dtype=torch.int32)

    def reference(upcast):  # (out, lse) of batch row 0, lse differentiable
        return lambda *t: flash_attn_varlen_fwd_ref(*(x[0] for x in t), cu_q, cu_k, scale, *window, upcast=upcast)

    results = []
    for upcast, inputs in ((True, [t.float() for t in (q, k, v)]), (False, [q, k, v])):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        o, lse_ref = reference(upcast)(*inputs)
        torch.autograd.backward([o, lse_ref], [dout[0].to(o.dtype), dlse[0]])
        results.append([t.grad for t in inputs])
    for name, g, e, s in zip(("dq", "dk", "dv"), grads[0], *results):
        assert_error_within_ratio(g, e, s, ratio=3.0, name=name)


@needs_cpu_kernel
def test_bf16_varlen_forward_and_backward():
    """Packed sequences (lengths 1, 200, 17, 300): each its own AMX forward (when 16 rows or more) and backward."""
    torch.manual_seed(5)
    lens = [1, 200, 17, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total, h, hk, d = sum(lens), 4, 2, 64
    q, k, v = (torch.randn(total, n, d).to(torch.bfloat16) for n in (h, hk, hk))
    dout = torch.randn(total, h, d)
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.use_backend("cpu"):
        out = llmkernels.flash_attn_varlen_func(*qkv, cu, cu, max(lens), max(lens), causal=True)
    out.backward(dout.to(out.dtype))
    start = 0
    for n in lens:
        rows = slice(start, start + n)
        start += n
        seq = [t[rows].unsqueeze(0) for t in (q, k, v)]
        (exact, exact_g) = forward_backward(lambda *t: flash_attn_ref(*t, causal=True), [t.float() for t in seq],
                                            dout[rows].unsqueeze(0))  # fmt: skip
        (same, same_g) = forward_backward(lambda *t: flash_attn_ref(*t, causal=True, upcast=False), seq,
                                          dout[rows].unsqueeze(0))  # fmt: skip
        assert_error_within_ratio(out[rows].unsqueeze(0), exact, same, ratio=2.0)
        for name, t, e, s in zip(("dq", "dk", "dv"), qkv, exact_g, same_g):
            assert_error_within_ratio(t.grad[rows].unsqueeze(0), e, s, ratio=3.0, name=name)


@needs_cpu_kernel
@pytest.mark.skipif(not AMX, reason="the CPU has no AMX tiles: the tile kernels are never taken here")
def test_the_amx_path_runs_and_can_be_turned_off():
    """LLMKERNELS_CPU_AMX=0 gives the vdpbf16ps kernels: different summation orders (and, in the forward, a
    different rounding of P), so outputs and gradients differ a little; both are within tolerance (the cases
    above)."""
    code = (
        "import torch, llmkernels; torch.manual_seed(0);"
        "q, k, v = (torch.randn(1, 200, 4, 64).to(torch.bfloat16).requires_grad_() for _ in range(3));"
        "out = llmkernels.flash_attn_func(q, k, v, causal=True); out.backward(torch.randn_like(out));"
        "torch.save([out.detach(), q.grad, k.grad, v.grad], sys.argv[1])"
    )
    for on, off in zip(*saved_with_amx_on_and_off(code)):
        assert not torch.equal(on, off)
        torch.testing.assert_close(on.float(), off.float(), rtol=2e-2, atol=2e-2)


@needs_cpu_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_forward_when_later_keys_score_far_higher(causal):
    """Scores that grow by far more than 2^8 from one 256-key block to the next (the AMX forward keeps a row's
    running max until a block passes it by 8 in log2 units, then rescales what it has summed), and a first block
    whose scores are all very negative."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 600, 2, 64, generator=g)
    k = torch.randn(1, 600, 2, 64, generator=g)
    k[:, :256] *= -0.5  # the first block: low scores
    k[:, 256:512] *= 4.0  # the second: scores far above the first block's max
    q = (q * 2.0).to(torch.bfloat16)
    k = k.to(torch.bfloat16)
    v = torch.randn(1, 600, 2, 64, generator=g).to(torch.bfloat16)
    with llmkernels.use_backend("cpu"):
        out, lse, _ = llmkernels.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    exact = flash_attn_ref(q.float(), k.float(), v.float(), causal=causal)
    same = flash_attn_ref(q, k, v, upcast=False, causal=causal)
    assert_error_within_ratio(out, exact, same, ratio=2.0)
    from llmkernels.reference.attention import flash_attn_fwd_ref, normalize_window

    _, ref_lse = flash_attn_fwd_ref(q.float(), k.float(), v.float(), 64**-0.5, *normalize_window(causal, (-1, -1)), 0.0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
