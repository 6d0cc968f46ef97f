"""Shared by the attention tests: the backends under test and how to run one against the reference."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils import assert_error_within_ratio, poison_

import llmkernels
from llmkernels import _ext
from llmkernels.reference.attention import flash_attn_ref, flash_attn_with_kvcache_ref

NO_CPU_KERNEL = not _ext.has_kernel("flash_attn_fwd", "CPU")
needs_cpu_kernel = pytest.mark.skipif(NO_CPU_KERNEL, reason=f"no C++ CPU attention kernel ({_ext.load_error})")

# Each C++ backend with the dtypes its kernels take; the cuda cases run on a GPU machine (conftest skips them).
BACKENDS = [pytest.param("cpu", marks=needs_cpu_kernel), pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}

# (backend, device) of ops that every backend runs, the CUDA C++ one aside: the reference, the C++ CPU kernels,
# Triton on CPU tensors under the interpreter here and on CUDA tensors on a GPU machine.
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKEND_DEVICES = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=needs_cpu_kernel),
    pytest.param("triton", "cpu", id="triton-interp", marks=[pytest.mark.triton_interp, pytest.mark.skipif(
        not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"), reason="needs the Triton interpreter")]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_TRITON, reason="triton is not installed")]),
]  # fmt: skip

# fp32 kernels against the fp64 reference: reordered fp32 sums over up to 2k keys.
FP32_TOL = {"out": (1e-4, 1e-5), "grad": (2e-4, 5e-5)}


def random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device):
    q = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device)
    return q, k, v


def forward_backward(fn, inputs, dout):
    """(out, [dq, dk, dv]) of fn(*inputs) with out.backward(dout), on fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check_flash_attn(backend, inputs, *, causal=False, window_size=(-1, -1), softcap=0.0, backward=True,
                     alibi_slopes=None):  # fmt: skip
    """flash_attn_func on `backend` against the reference: fp32 inputs against fp64 with tight tolerances,
    lower precisions within 2x (output) / 3x (gradients) the error of the same-precision reference."""
    q = inputs[0]
    kw = {"causal": causal, "window_size": window_size, "softcap": softcap, "alibi_slopes": alibi_slopes}
    dout = torch.randn_like(q, dtype=torch.float32)

    def ours(*t):
        with llmkernels.use_backend(backend):
            return llmkernels.flash_attn_func(*t, **kw)

    def reference(upcast):
        return lambda *t: flash_attn_ref(*t, upcast=upcast, **kw)

    if not backward:
        with torch.no_grad():
            out, grads = ours(*inputs), None
    else:
        out, grads = forward_backward(ours, inputs, dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    if q.dtype == torch.float32:
        exact = [t.double().cpu() for t in inputs]
        ref, ref_grads = forward_backward(reference(True), exact, dout.double().cpu())
        torch.testing.assert_close(out.cpu().double(), ref, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for name, g, r in zip(("dq", "dk", "dv"), grads or (), ref_grads):
            torch.testing.assert_close(
                g.cpu().double(),
                r,
                rtol=FP32_TOL["grad"][0],
                atol=FP32_TOL["grad"][1],
                msg=lambda m, name=name: f"{name}: {m}",
            )
    else:
        exact, exact_grads = forward_backward(reference(True), [t.float() for t in inputs], dout)
        same, same_grads = forward_backward(reference(False), inputs, dout)
        assert_error_within_ratio(out, exact, same, ratio=2.0)
        for name, g, e, s in zip(("dq", "dk", "dv"), grads or (), exact_grads, same_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)


def run_kvcache_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, **kw):
    """flash_attn_with_kvcache on the cuda backend, and the reference in fp32 (exact) and in q's precision (same),
    each on its own copy of the caches. Checks the in-place append bit for bit; returns (out, exact, same)."""
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with llmkernels.use_backend("cuda"):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, **kw)
    k_expect, v_expect = k_before.clone(), v_before.clone()
    exact = flash_attn_with_kvcache_ref(q, k_expect, v_expect, k_new, v_new, cache_seqlens, upcast=True, **kw)
    same = flash_attn_with_kvcache_ref(
        q, k_before.clone(), v_before.clone(), k_new, v_new, cache_seqlens, upcast=False, **kw
    )
    torch.testing.assert_close(k_cache, k_expect, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expect, rtol=0, atol=0, equal_nan=True)
    return out, exact, same


def check_lengths_past_the_capacity(backend, nheads):
    """cache_seqlens lives on the device, so nothing checks it against the capacity: a row claiming 40 keys of a
    32-slot cache must read its own 32 (the next row in memory holds NaN). 2 KV heads of 64, bf16."""
    buf = torch.randn(2, 32, 2, 64, dtype=torch.bfloat16, device="cuda")
    poison_(buf[1])
    k_cache, v_cache = buf[:1], buf[:1].clone()  # k_cache row 0 is followed by NaN in memory
    q = torch.randn(1, 2, nheads, 64, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([40], dtype=torch.int32, device="cuda")
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    full = torch.tensor([32], dtype=torch.int32, device="cuda")
    exact = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, full, upcast=True)
    same = flash_attn_with_kvcache_ref(q, k_cache, v_cache, None, None, full, upcast=False)
    assert torch.isfinite(out).all()
    assert_error_within_ratio(out, exact, same, ratio=2.0)
