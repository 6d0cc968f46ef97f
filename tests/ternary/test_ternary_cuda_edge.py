"""CUDA edge cases found in review: fp16 weight-only prefill whose unscaled x @ W_t^T exceeds fp16's range,
a prefill longer than one launch of the int8 GEMM (grid.y <= 65535 token tiles of 64), and an output of more
than 2^31 elements (the Triton kernel's row offsets were int32)."""

import pytest
import torch

import llmkernels
from llmkernels.reference import ternary as ref

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("m", [3, 40])  # GEMV and cuBLAS paths of the weight-only linear
def test_cuda_w2_fp16_large_unscaled_sums(m):
    """y = (x @ W_t^T) * gamma fits fp16 although x @ W_t^T (~1.5e5) does not: fp32 until the epilogue."""
    k, n = 4096, 24
    w_t = (torch.rand(n, k, device="cuda") < 0.9).to(torch.int8)  # mostly +1: the row sums add up
    w_packed = llmkernels.ternary.pack_ternary(w_t)
    w_scale = torch.tensor(0.01, device="cuda")
    x = (torch.rand(m, k, device="cuda") * 40 + 20).half()
    with llmkernels.use_backend("cuda"):
        y = llmkernels.ternary_linear(x, w_packed, w_scale, act_bits=None)
    y_ref = ref.ternary_linear_w2_ref(x.float(), w_packed, w_scale, None, k)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-3, atol=0)


def test_cuda_int8_gemm_more_rows_than_one_launch(monkeypatch):
    """More than 65535 * 64 tokens: the mma GEMM is launched in slices; check both ends and the seam."""
    monkeypatch.setenv("LLMKERNELS_TERNARY_GEMM", "mma")  # our kernel (cuBLASLt is the default from sm_90)
    m, k, n = 65535 * 64 + 17, 256, 8
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w_packed = llmkernels.ternary.pack_ternary(torch.randint(-1, 2, (n, k), device="cuda"))
    with llmkernels.use_backend("cuda"):
        acc = llmkernels.ternary.ternary_matmul_int8(x_q, w_packed, k)
    seam = 65535 * 64
    for rows in (slice(0, 100), slice(seam - 100, seam + 17)):
        torch.testing.assert_close(acc[rows], ref.ternary_matmul_int8_ref(x_q[rows], w_packed, k), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_int8_matmul_output_past_2_31_elements(backend, monkeypatch):
    """65600 x 32768 int32 (8.6 GB): rows past 65536 start beyond 2^31 elements. Both ends against the reference."""
    monkeypatch.setenv("LLMKERNELS_TERNARY_GEMM", "mma")  # our kernel (cuBLASLt is the default from sm_90)
    m, k, n = 65600, 256, 32768
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w_packed = llmkernels.ternary.pack_ternary(torch.randint(-1, 2, (n, k), device="cuda"))
    with llmkernels.use_backend(backend):
        acc = llmkernels.ternary.ternary_matmul_int8(x_q, w_packed, k)
    for rows in (slice(0, 64), slice(m - 80, m)):
        torch.testing.assert_close(acc[rows], ref.ternary_matmul_int8_ref(x_q[rows], w_packed, k), rtol=0, atol=0)
