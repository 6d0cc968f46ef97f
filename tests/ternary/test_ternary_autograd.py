"""ternary_linear is differentiable in x and bias (straight-through for the activation quantisation), on every
backend, with the gradient nn.BitLinear gives for the same weights."""

import pytest
import torch

import llmkernels
from llmkernels import _ext
from llmkernels._backend import triton_unavailable_reason
from llmkernels.nn import BitLinear

HAS_CUDA = torch.cuda.is_available()


def _backend_cases():
    cases = [pytest.param("reference", "cpu", id="reference")]
    cpu_ok = _ext.has_kernel("ternary_linear_a8", "CPU")
    cases.append(pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(not cpu_ok, reason="no CPU kernels")))
    triton_device = "cuda" if HAS_CUDA else "cpu"
    reason = triton_unavailable_reason(triton_device)
    cases.append(
        pytest.param(
            "triton",
            triton_device,
            id="triton",
            marks=[pytest.mark.triton_interp, pytest.mark.skipif(reason is not None, reason=str(reason))],
        )
    )
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    return cases


@pytest.mark.parametrize("act_bits", [8, None])
@pytest.mark.parametrize("backend,device", _backend_cases())
def test_grad_matches_bitlinear(backend, device, act_bits):
    in_f, out_f = 300, 37  # in_features not a multiple of the 256-weight packing block
    bit = BitLinear(in_f, out_f, bias=True, act_bits=act_bits).to(device)
    with torch.no_grad():
        bit.bias.normal_()
    tern = bit.to_ternary()
    tern.bias.requires_grad_(True)
    x = torch.randn(2, 5, in_f, device=device)
    dy = torch.randn(2, 5, out_f, device=device)

    x_ref = x.clone().requires_grad_(True)
    bit(x_ref).backward(dy)
    x_ours = x.clone().requires_grad_(True)
    with llmkernels.use_backend(backend):
        y = tern(x_ours)
    y.backward(dy)

    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tern.bias.grad, bit.bias.grad, rtol=1e-5, atol=1e-5)


def test_no_graph_without_grad():
    tern = BitLinear(64, 16).to_ternary()
    y = tern(torch.randn(3, 64))
    assert y.grad_fn is None and not y.requires_grad


def test_bf16_grad_is_dy_times_scaled_ternary_weights():
    tern = BitLinear(40, 24, bias=False).to_ternary()
    x = torch.randn(4, 40, dtype=torch.bfloat16, requires_grad=True)
    tern(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    # dy is all ones here (the sum), so dx = ones @ (W_t * gamma); bf16 output: bf16 rounding tolerance.
    w = llmkernels.ternary.unpack_ternary(tern.w_packed, 40).float() * tern.w_scale
    torch.testing.assert_close(x.grad.float(), torch.ones(4, 24) @ w, rtol=1e-2, atol=1e-2)


def test_compiles_with_backward():
    tern = BitLinear(64, 32, bias=True, act_bits=None).to_ternary()
    tern.bias.requires_grad_(True)
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(tern, fullgraph=True)
    compiled(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    tern(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
