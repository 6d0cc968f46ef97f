"""The C++ attention ops as torch.library ops (opcheck, torch.compile), backend choice, and argument errors."""

import math

import pytest
import torch
from attn_cases import needs_cpu_kernel

import llmkernels
from llmkernels.ops import attention as attention_ops


def _qkv(sq=9, sk=12, h=4, hk=2, d=16, dtype=torch.float32):
    return (
        torch.randn(2, sq, h, d, dtype=dtype),
        torch.randn(2, sk, hk, d, dtype=dtype),
        torch.randn(2, sk, hk, d, dtype=dtype),
    )


# ---------------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((3, 0), 2.0)])
def test_opcheck_fwd_and_bwd(window, softcap):
    q, k, v = (t.requires_grad_() for t in _qkv())
    args = (0.25, *window, softcap)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q.detach(), k.detach(), v.detach(), *args)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.llmkernels.flash_attn_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, *args)
    )


@needs_cpu_kernel
def test_opcheck_kvcache():
    q = torch.randn(2, 3, 4, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    k_new, v_new = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    lens = torch.tensor([4, 9], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.llmkernels.flash_attn_with_kvcache.default,
        (q, k_cache, v_cache, k_new, v_new, lens, 0.25, -1, 0, 0.0),
    )
    torch.library.opcheck(
        torch.ops.llmkernels.flash_attn_with_kvcache.default, (q, k_cache, v_cache, None, None, lens, 0.25, 2, 1, 0.0)
    )


@needs_cpu_kernel
def test_compile_flash_attn_func():
    """fullgraph torch.compile through dispatch, the fake kernel and the autograd formula (aot_eager: no codegen,
    so the test stays cheap on CPU)."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    fn = torch.compile(
        lambda q, k, v: llmkernels.flash_attn_func(q, k, v, causal=True), fullgraph=True, backend="aot_eager"
    )
    out = fn(q, k, v)
    out.sum().backward()
    ref = llmkernels.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    torch.testing.assert_close(out, ref)
    assert q.grad is not None and k.grad.shape == k.shape


@needs_cpu_kernel
def test_compile_flash_attn_with_kvcache():
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([4, 9], dtype=torch.int32)
    k2, v2 = k_cache.clone(), v_cache.clone()
    fn = torch.compile(llmkernels.flash_attn_with_kvcache, fullgraph=True, backend="aot_eager")
    out = fn(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)
    ref = llmkernels.flash_attn_with_kvcache(q, k2, v2, k_new, v_new, cache_seqlens=lens, causal=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(k_cache, k2)  # the in-place update survives functionalization


# ---------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------
@needs_cpu_kernel
def test_cpu_tensors_choose_the_cpu_kernel():
    q, k, v = _qkv()
    assert attention_ops.flash_attn.choose(q, k, v, 0.25, -1, -1, 0.0) == "cpu"


def test_cuda_backend_refuses_float32_with_reason():
    q, k, v = _qkv()
    reason = attention_ops._cuda_supports(q, k, v, 0.25, -1, -1, 0.0)
    assert "float16/bfloat16" in reason
    q, k, v = _qkv(d=20, dtype=torch.bfloat16)
    assert "multiple of 8" in attention_ops._cuda_supports(q, k, v, 0.25, -1, -1, 0.0)


def test_cuda_backend_declines_deterministic():
    """The CUDA C++ backward adds dq (and GQA's dk / dv) with fp32 atomics: deterministic=True must run elsewhere
    (Triton's fixed-order dQ kernel on a GPU)."""
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert attention_ops._cuda_supports(q, k, v, 0.25, -1, -1, 0.0, deterministic=False) is None
    assert "atomically" in attention_ops._cuda_supports(q, k, v, 0.25, -1, -1, 0.0, deterministic=True)


@pytest.mark.cuda
def test_gpu_deterministic_backward_is_bit_exact():
    """Auto-dispatch on a GPU with deterministic=True: two backward passes give the same bits (GQA 4, 1k keys: many
    query tiles add into each dq row and key tiles into each dk / dv row)."""
    q, k, v = (torch.randn(2, 1024, h, 128, device="cuda", dtype=torch.bfloat16).requires_grad_() for h in (16, 4, 4))
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = llmkernels.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_reference_backend_matches_cpu():
    q, k, v = _qkv()
    with llmkernels.use_backend("reference"):
        ref = llmkernels.flash_attn_func(q, k, v, window_size=(2, 3))
    torch.testing.assert_close(llmkernels.flash_attn_func(q, k, v, window_size=(2, 3)), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Argument errors name the argument
# ---------------------------------------------------------------------------------------------------
def _bad_calls():
    q, k, v = _qkv()
    f = llmkernels.flash_attn_func
    return [
        ("dropout_p must be a number in", ValueError, lambda: f(q, k, v, dropout_p=1.0)),
        ("alibi_slopes must have shape", ValueError, lambda: f(q, k, v, alibi_slopes=torch.ones(3))),
        ("alibi_slopes must have dtype", TypeError, lambda: f(q, k, v, alibi_slopes=torch.ones(4).double())),
        ("q must have 4 dimensions", ValueError, lambda: f(q[0], k, v)),
        ("k must have shape", ValueError, lambda: f(q, k[:, :, :, :8], v)),
        ("v must have shape", ValueError, lambda: f(q, k, v[:, :5])),
        ("q must have dtype", TypeError, lambda: f(q.double(), k.double(), v.double())),
        ("k must have the dtype of q", TypeError, lambda: f(q, k.half(), v)),
        ("q must be contiguous in its last dimension", ValueError, lambda: f(q.transpose(1, 3), k, v)),
        (
            "v must be contiguous in its last dimension",
            ValueError,
            lambda: f(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2)),
        ),
        (
            "multiple of k's nheads_k",
            ValueError,
            lambda: f(q, k[:, :, :1].expand(2, 12, 3, 16).contiguous(), v[:, :, :1].expand(2, 12, 3, 16).contiguous()),
        ),
        ("head dim in", ValueError, lambda: f(*_qkv(d=264))),
        ("multiple of k's nheads_k \\(0\\)", ValueError, lambda: f(q, k[:, :, :0], v[:, :, :0])),
        ("window_size", ValueError, lambda: f(q, k, v, window_size=(-2, 0))),
        ("softcap", ValueError, lambda: f(q, k, v, softcap=-1.0)),
        ("softmax_scale", ValueError, lambda: f(q, k, v, softmax_scale=0.0)),
        ("softcap must be a finite number >= 0 \\(0 disables it\\) that fp32 holds", ValueError,
         lambda: f(q, k, v, softcap=1e-46)),  # (fp32 would round it to 0: no cap)  # fmt: skip
        ("softmax_scale must be a positive finite number that fp32 holds", ValueError,
         lambda: f(q, k, v, softmax_scale=1e39)),  # (inf in fp32)  # fmt: skip
        ("q must be a torch.Tensor", TypeError, lambda: f(q.numpy(), k, v)),
    ]


def _bad_kvcache_calls():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    f = llmkernels.flash_attn_with_kvcache
    return [
        ("k and v", ValueError, lambda: f(q, kc, vc, k=kn, cache_seqlens=lens)),
        ("cache_seqlens must have dtype", TypeError, lambda: f(q, kc, vc, kn, vn, cache_seqlens=lens.long())),
        ("cache_seqlens must have shape", ValueError, lambda: f(q, kc, vc, kn, vn, cache_seqlens=lens[:1])),
        ("cache_seqlens", ValueError, lambda: f(q, kc, vc, kn, vn, cache_seqlens=20)),
        ("v_cache must have shape", ValueError, lambda: f(q, kc, vc[:, :10], kn, vn, cache_seqlens=lens)),
        ("k must have shape", ValueError, lambda: f(q, kc, vc, kn[:, :, :1], vn, cache_seqlens=lens)),
        ("k_cache must have the dtype of q", TypeError, lambda: f(q, kc.bfloat16(), vc, kn, vn, cache_seqlens=lens)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_flash_attn_func_bad_argument(index):
    match, exc, call = _bad_calls()[index]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("index", range(len(_bad_kvcache_calls())))
def test_flash_attn_with_kvcache_bad_argument(index):
    match, exc, call = _bad_kvcache_calls()[index]
    with pytest.raises(exc, match=match):
        call()


@needs_cpu_kernel
def test_cpu_kernel_rejects_overflowing_cache_seqlens():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    kn, vn = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    with pytest.raises(RuntimeError, match="cache_seqlens must leave room"):
        llmkernels.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=torch.tensor([3, 19], dtype=torch.int32))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(3, 0), (0, 5)])
def test_backward_without_keys_or_queries(backend, dtype, sq, sk):
    """No scores at all: zero gradients (the CPU bf16 backward once crashed the process on seqlen_k = 0, head dim
    128: the AMX kernel indexed key blocks that do not exist; an empty dout arrives from autograd with 0 strides)."""
    q, k, v = (t.requires_grad_() for t in _qkv(sq=sq, sk=sk, h=2, hk=1, d=128, dtype=dtype))
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_func(q, k, v, causal=True)
    assert out.shape == q.shape and (out == 0).all()
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_reference_kvcache_refuses_lengths_past_the_cache():
    """The reference reads cache_seqlens back (the kernels check or clamp it): it names it rather than wrapping a
    negative index or failing inside torch's indexing."""
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    kn, vn = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    for lens in ([-1, 2], [18, 2]):
        lens = torch.tensor(lens, dtype=torch.int32)
        with llmkernels.use_backend("reference"), pytest.raises(ValueError, match=r"cache_seqlens must lie in"):
            llmkernels.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens)


@needs_cpu_kernel
def test_cpu_op_checks_its_arguments():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="flash_attn_fwd: k must have shape"):
        torch.ops.llmkernels.flash_attn_fwd(q, k[:, :, :, :8], v, 0.25, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="flash_attn_bwd: softmax_lse must have dtype"):
        torch.ops.llmkernels.flash_attn_bwd(q, q, k, v, q, torch.zeros(2, 4, 9, dtype=torch.float64), 0.25, -1, -1, 0.0)


@pytest.mark.triton_interp
def test_triton_backend_through_the_public_api():
    """The dispatch glue to llmkernels/triton/flash_attn.py (the kernels have their own tests): forward and
    backward through flash_attn_func with the triton backend forced, on tiny CPU tensors (interpreter)."""
    reason = attention_ops._triton_supports_for("flash_attn_triton")(torch.empty(1, 1, 1, 16))
    if reason is not None or llmkernels._backend.triton_unavailable_reason("cpu") is not None:
        pytest.skip(reason or llmkernels._backend.triton_unavailable_reason("cpu"))
    q, k, v = (t.requires_grad_() for t in _qkv(sq=5, sk=7, h=2, hk=1, d=16))
    with llmkernels.use_backend("triton"):
        out = llmkernels.flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    with llmkernels.use_backend("reference"):
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref = llmkernels.flash_attn_func(q2, k2, v2, causal=True)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-4, atol=1e-4)


def test_cuda_glue_realigns_inputs_but_never_copies_the_caches():
    """The CUDA kernels need 16-byte aligned rows: unaligned q/k/v are copied, unaligned caches refused."""
    base = torch.randn(2, 9, 4, 16, dtype=torch.bfloat16)
    odd = base[:, :, :, :8]  # strides (576, 64, 16, 1): aligned
    assert attention_ops._rows_aligned(odd)
    shifted = base.flatten()[4:].view(-1)[: 2 * 9 * 4 * 8].view(2, 9, 4, 8)  # element offset 4: 8-byte aligned
    assert not attention_ops._rows_aligned(shifted)
    realigned = attention_ops._aligned(shifted)
    assert attention_ops._rows_aligned(realigned) and torch.equal(realigned, shifted)
    rest = (None, None, None, 0.25, -1, -1, 0.0, None, None, None, None, True)  # k_new .. rotary_interleaved
    assert "k_cache" in attention_ops._cuda_kvcache_supports(odd, shifted, shifted, *rest)


@needs_cpu_kernel
def test_explicit_scale_and_non_contiguous_output_gradient():
    """softmax_scale is honoured, and a gradient arriving strided in its last dimension (here through a
    transpose) is handled by the backward."""
    from llmkernels.reference.attention import flash_attn_ref

    q, k, v = (t.requires_grad_() for t in _qkv(sq=20, sk=33, d=24))
    w = torch.randn(2, 24, 4, 20)
    out = llmkernels.flash_attn_func(q, k, v, softmax_scale=0.1, causal=True, deterministic=True)
    (out.transpose(1, 3) * w).sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = flash_attn_ref(q2, k2, v2, softmax_scale=0.1, causal=True)
    (ref.transpose(1, 3) * w.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for g, r in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(g.double(), r, rtol=2e-4, atol=5e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_alternating_block_shapes_on_one_thread(dtype):
    """On one thread, blocks of 64 query rows (query-lane layout; vdpbf16ps for bf16 where the CPU has it) and
    tail blocks of 2 rows (row-major decode layout) take turns in one scratch buffer, with a head dim (40) that
    pads to whole registers and a window that cuts some key blocks. Output and lse against float64."""
    from llmkernels.reference.attention import flash_attn_ref

    q, k, v = (t.to(dtype) for t in _qkv(sq=66, sk=70, h=3, hk=3, d=40))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.3, 20, -1, 0.0)
    finally:
        torch.set_num_threads(threads)
    q2, k2, v2 = (t.double() for t in (q, k, v))
    ref = flash_attn_ref(q2, k2, v2, softmax_scale=0.3, window_size=(20, -1))
    i = torch.arange(66)[:, None] + 4  # shift = seqlen_k - seqlen_q
    j = torch.arange(70)[None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q2, k2) * 0.3
    ref_lse = scores.masked_fill((j < i - 20).expand_as(scores), float("-inf")).logsumexp(-1)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(out.double(), ref, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_cpu_backward_split_key_blocks_and_determinism():
    """With fewer (batch, KV head) pairs than threads can share evenly (here one pair, 3 threads), the CPU
    backward splits a head's key blocks over several tasks, each adding into its own dq buffer: GQA group of 3,
    causal with a window, a ragged last key block and a head dim that pads to whole registers. Gradients
    against float64, and bitwise equal across two runs."""
    from llmkernels.reference.attention import flash_attn_ref

    q, k, v = _qkv(sq=150, sk=201, h=3, hk=1, d=24)
    q, k, v = q[:1], k[:1], v[:1]
    dout = torch.randn_like(q)
    args = (0.3, 120, 0, 0.0)
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, *args)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        grads = [torch.ops.llmkernels.flash_attn_bwd(dout, q, k, v, out, lse, *args) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = flash_attn_ref(*leaves, softmax_scale=0.3, window_size=(120, 0))
    ref.backward(dout.double())
    for g, leaf in zip(grads[0], leaves):
        torch.testing.assert_close(g.double(), leaf.grad, rtol=2e-4, atol=5e-5)


@pytest.mark.parametrize("name", ["softmax_scale", "softcap"])
def test_infinite_scale_or_softcap_is_refused(name):
    """Every backend must refuse it alike (the CPU op did, Triton returned NaN, the reference finite values)."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{name} must be a"):
        llmkernels.flash_attn_func(q, k, v, **{name: math.inf})
    kc, vc = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    with pytest.raises(ValueError, match=f"{name} must be a"):
        llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, **{name: math.inf})


@needs_cpu_kernel
def test_cpp_ops_refuse_scalars_fp32_cannot_hold():
    """The C++ ops (CPU and CUDA hosts share the check) take softmax_scale and softcap as fp32, and the CPU kernels
    flush subnormals: a softcap under FLT_MIN would silently be no cap, one past 1e30 flushes scores (enters as a
    reciprocal), a scale past FLT_MAX is inf. Caps at both ends of the accepted range give the reference's output."""
    q, k, v = _qkv()
    for cap in (1e-40, 1e31):
        with pytest.raises(RuntimeError, match="softcap must be 0 or a normal fp32 number up to 1e30"):
            torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.25, -1, -1, cap)
    with pytest.raises(RuntimeError, match="softmax_scale must fit fp32"):
        torch.ops.llmkernels.flash_attn_fwd(q, k, v, 1e39, -1, -1, 0.0)
    from llmkernels.reference.attention import flash_attn_ref

    for cap in (2e-38, 1e30):
        out = llmkernels.flash_attn_func(q, k, v, softcap=cap)
        ref = flash_attn_ref(q.double(), k.double(), v.double(), softcap=cap).float()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_scalars_may_be_numpy_numbers():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    out = llmkernels.flash_attn_func(q, k, v, softmax_scale=np.float32(0.25), softcap=np.float64(3.0))
    torch.testing.assert_close(out, llmkernels.flash_attn_func(q, k, v, softmax_scale=0.25, softcap=3.0))
    with pytest.raises(ValueError, match="softcap"):
        llmkernels.flash_attn_func(q, k, v, softcap=True)
