"""A second derivative (create_graph=True: gradient penalties, Hessian-vector products) through an op whose C++
backward has no derivative raises, naming the op. It silently gave zeros: torch's fallback for an op without an
autograd kernel only warns. The reference backend computes it (checked here against that, so the call is valid)."""

import pytest
import torch

import llmkernels
from llmkernels import _ext


def _attention(x):
    q = x.view(1, 6, 2, 8)
    return llmkernels.flash_attn_func(q, q.detach() * 0.5, q.detach(), causal=True)


def _varlen(x):
    q = x.view(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return llmkernels.flash_attn_varlen_func(q, q.detach(), q.detach() * 2, cu, cu, 4, 4, causal=True)


def _conv(x):
    return llmkernels.causal_conv1d_fn(x.view(2, 8, 6), torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
                                       activation="silu")  # fmt: skip


def _scan(x):
    u = x.view(2, 8, 6)
    g = torch.Generator().manual_seed(1)
    a, b, c = -torch.rand(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    return llmkernels.selective_scan_fn(u, u.detach().sigmoid(), a, b, c)


def _add_norm(x):
    return llmkernels.rms_norm_fn(x.view(12, 8), torch.randn(8, generator=torch.Generator().manual_seed(2)), None,
                                  residual=x.detach().view(12, 8).flip(0))  # fmt: skip


def _gated_norm(x):
    return llmkernels.rmsnorm_fn(x.view(12, 8), torch.ones(8), None, z=x.detach().view(12, 8))


OPS = {
    "flash_attn_bwd": _attention,
    "flash_attn_varlen_bwd": _varlen,
    "causal_conv1d_bwd": _conv,
    "selective_scan_bwd": _scan,
    "add_norm_bwd": _add_norm,
    "rmsnorm_gated_bwd": _gated_norm,
}


def _second_derivative(fn, backend):
    x = torch.randn(96, requires_grad=True)
    with llmkernels.use_backend(backend):
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
    return x.grad


@pytest.mark.parametrize("bwd_op", list(OPS), ids=str)
def test_second_derivative_through_a_cpp_backward_raises(bwd_op):
    if not _ext.has_kernel(bwd_op, "CPU"):
        pytest.skip(f"no C++ CPU kernel for llmkernels::{bwd_op}")
    reference = _second_derivative(OPS[bwd_op], "reference")
    assert reference is not None and reference.abs().max() > 0  # the call has a non-zero second derivative
    with pytest.raises(NotImplementedError, match=f"C\\+\\+ {bwd_op} op .* second derivative"):
        _second_derivative(OPS[bwd_op], "cpu")


def test_first_derivative_under_create_graph_still_works():
    """create_graph=True alone (no second backward) is fine: the error comes only when the second one runs."""
    if not _ext.has_kernel("flash_attn_bwd", "CPU"):
        pytest.skip("no C++ CPU kernel for llmkernels::flash_attn_bwd")
    x = torch.randn(96, requires_grad=True)
    with llmkernels.use_backend("cpu"):
        (g,) = torch.autograd.grad(_attention(x).sum(), x, create_graph=True)
    with llmkernels.use_backend("reference"):
        (ref,) = torch.autograd.grad(_attention(x).sum(), x)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
