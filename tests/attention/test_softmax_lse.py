"""return_attn_probs=True (flash_attn's (out, softmax_lse, None)): the log-sum-exp against the reference, and its
gradient. flash_attn drops gradients that reach softmax_lse; here they flow into q and k (the backward lowers
D_i by dlse_i), which ring / context-parallel attention needs to merge partial results."""

import pytest
import torch
from attn_cases import needs_cpu_kernel

import llmkernels
from llmkernels._backend import triton_unavailable_reason
from llmkernels.reference.attention import flash_attn_fwd_ref, flash_attn_varlen_fwd_ref

_NO_TRITON = triton_unavailable_reason("cpu")  # the kernels run on CPU tensors under TRITON_INTERPRET=1
BACKENDS = [
    pytest.param("cpu", marks=needs_cpu_kernel),
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(_NO_TRITON is not None, reason=str(_NO_TRITON))),
]


def _loss(out, lse, w_out, w_lse):
    """Uses both outputs, so the gradient has an lse part (lse -inf rows: masked out, they carry no gradient)."""
    finite = torch.isfinite(lse)
    return (out.double() * w_out).sum() + torch.where(finite, lse.double(), 0.0).mul(w_lse).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (5, 2), 4.0)])
def test_lse_and_its_gradient_dense(backend, dtype, causal, window, softcap):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is not faithful (test_triton_attention.py)")
    q, k, v = torch.randn(2, 37, 4, 32, dtype=dtype), torch.randn(2, 50, 2, 32, dtype=dtype), \
        torch.randn(2, 50, 2, 32, dtype=dtype)
    w_out, w_lse = torch.randn(q.shape, dtype=torch.float64), torch.randn(2, 4, 37, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.use_backend(backend):
        out, lse, probs = llmkernels.flash_attn_func(*leaves, causal=causal, window_size=window, softcap=softcap,
                                                     return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    _loss(out, lse, w_out, w_lse).backward()

    exact = [t.double().requires_grad_() for t in (q, k, v)]
    from llmkernels.reference.attention import normalize_window

    left, right = normalize_window(causal, window)
    ref_out, ref_lse = flash_attn_fwd_ref(*exact, 32**-0.5, left, right, softcap)
    _loss(ref_out, ref_lse, w_out, w_lse).backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(lse.double(), ref_lse.double(), **tol)
    for name, got, want in zip("qkv", leaves, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_only_loss(backend):
    """A loss of lse alone: the output's gradient is absent (not materialised) and must count as zero."""
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.use_backend(backend):
        _, lse, _ = llmkernels.flash_attn_func(*leaves, causal=True, return_attn_probs=True)
    lse.sum().backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    flash_attn_fwd_ref(*exact, 0.25, -1, 0)[1].sum().backward()
    for got, want in zip(leaves, exact):
        # v is not in lse's graph: no gradient (autograd of the reference) or a zero one (the kernels)
        expected = want.grad if want.grad is not None else torch.zeros_like(want)
        actual = got.grad if got.grad is not None else torch.zeros_like(got)
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_its_gradient_varlen(backend):
    lengths_q, lengths_k = [5, 0, 17, 1], [9, 3, 17, 0]
    cu_q = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 29, 29], dtype=torch.int32)
    q, k, v = torch.randn(23, 4, 16), torch.randn(29, 2, 16), torch.randn(29, 2, 16)
    w_out, w_lse = torch.randn(q.shape, dtype=torch.float64), torch.randn(4, 23, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.use_backend(backend):
        out, lse, _ = llmkernels.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                        causal=True, return_attn_probs=True)
    assert lse.shape == (4, 23)
    _loss(out, lse, w_out, w_lse).backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = flash_attn_varlen_fwd_ref(*exact, cu_q, cu_k, 0.25, -1, 0)
    _loss(ref_out, ref_lse, w_out, w_lse).backward()
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[:, 22]).all()  # the last sequence has no key
    for name, got, want in zip("qkv", leaves, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@needs_cpu_kernel
def test_opcheck_bwd_with_dlse():
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.25, -1, 0, 0.0)
    args = (torch.randn_like(out), q, k, v, out, lse, 0.25, -1, 0, 0.0, torch.randn_like(lse))
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_bwd.default, args)
    with pytest.raises(RuntimeError, match="dsoftmax_lse must have softmax_lse's shape"):
        torch.ops.llmkernels.flash_attn_bwd(*args[:-1], torch.randn(2, 4, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (5, 2), 4.0)])
def test_lse_and_its_gradient_gpu(backend, causal, window, softcap):
    """bf16 on the GPU kernels (the CUDA backward lowers delta in its preprocess kernel; Triton on the host)."""
    from llmkernels.reference.attention import normalize_window

    q, k, v = (torch.randn(2, n, h, 64, dtype=torch.bfloat16, device="cuda") for n, h in ((77, 8), (90, 2), (90, 2)))
    w_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    w_lse = torch.randn(2, 8, 77, dtype=torch.float64, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.use_backend(backend):
        out, lse, _ = llmkernels.flash_attn_func(*leaves, causal=causal, window_size=window, softcap=softcap,
                                                 return_attn_probs=True)
    _loss(out, lse, w_out, w_lse).backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    left, right = normalize_window(causal, window)
    ref_out, ref_lse = flash_attn_fwd_ref(*exact, 64**-0.5, left, right, softcap)
    _loss(ref_out, ref_lse, w_out, w_lse).backward()
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=3e-2, atol=6e-2)
    for name, got, want in zip("qkv", leaves, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=3e-2, atol=6e-2,
                                   msg=lambda m, n=name: f"d{n}: {m}")
