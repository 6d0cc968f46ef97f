"""CUDA kernels against the reference (GEMV for 1..16 tokens, the int8 tensor-core GEMM above), opcheck."""

import pytest
import torch
from ternary_cases import (
    DTYPES,
    MODEL_SHAPES,
    ODD_SHAPES,
    check_backend_matches_reference,
    random_activations,
    random_layer,
)

import llmkernels
from llmkernels.reference import ternary as ref

pytestmark = pytest.mark.cuda

TOKENS = [1, 2, 3, 7, 16, 17, 64, 513]  # 3 and 7 run a wider GEMV tile with masked tokens; 17+ the GEMM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", ODD_SHAPES)
def test_cuda_matches_reference_odd_shapes(m, n, k, dtype):
    check_backend_matches_reference("cuda", "cuda", m, n, k, dtype)


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("_, n, k", MODEL_SHAPES + [(1, 28672, 8192), (1, 11008, 4096)])
def test_cuda_matches_reference_model_shapes(m, _, n, k):
    check_backend_matches_reference("cuda", "cuda", m, n, k, torch.bfloat16)


def test_cuda_is_chosen_automatically():
    w_packed, w_scale, _ = random_layer(64, 256, "cuda")
    assert (
        llmkernels.ops.ternary.linear_a8_op.choose(torch.randn(2, 256, device="cuda"), w_packed, w_scale, None, 256)
        == "cuda"
    )


def test_opcheck_cuda_ops():
    k, n = 300, 17
    w_packed, w_scale, bias = random_layer(n, k, "cuda", bias_dtype=torch.float16)
    ops = torch.ops.llmkernels
    for m in (3, 40):  # GEMV and GEMM paths
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        x_q, _ = llmkernels.ternary.quantize_activation(x)
        torch.library.opcheck(ops.ternary_quantize_activation.default, (x,))
        torch.library.opcheck(ops.ternary_matmul_int8.default, (x_q, w_packed, k))
        torch.library.opcheck(ops.ternary_linear_a8.default, (x, w_packed, w_scale, bias, k))
        torch.library.opcheck(ops.ternary_linear_w2.default, (x, w_packed, w_scale, bias, k))


def test_cuda_rejects_mixed_devices():
    w_packed, w_scale, _ = random_layer(8, 40, "cuda")
    with pytest.raises(ValueError, match="w_packed must be on"):
        llmkernels.ternary_linear(torch.randn(2, 40), w_packed, w_scale)


@pytest.mark.parametrize("m", [1, 40])
def test_cuda_misaligned_views(m):
    """Contiguous views at an odd storage offset: the kernels' 16-byte loads must not see them misaligned."""
    k, n = 512, 24
    w_packed, w_scale, _ = random_layer(n, k, "cuda")
    shifted = torch.empty(w_packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(w_packed)
    shifted.copy_(w_packed)
    x_q = torch.randint(-128, 128, (m * k + 1,), dtype=torch.int8, device="cuda")[1:].view(m, k)
    with llmkernels.use_backend("cuda"):
        acc = llmkernels.ternary.ternary_matmul_int8(x_q, shifted, k)
    torch.testing.assert_close(acc, ref.ternary_matmul_int8_ref(x_q, w_packed, k))


@pytest.mark.parametrize("gemm", ["mma", "cublaslt"])
@pytest.mark.parametrize("m,n,k", [(17, 70, 260), (130, 200, 1000), (513, 2560, 2560)])
def test_cuda_prefill_gemm_paths(m, n, k, gemm, monkeypatch):
    """Both prefill GEMMs: our int8 mma.sync kernel and the cuBLASLt baseline (LLMKERNELS_TERNARY_GEMM)."""
    monkeypatch.setenv("LLMKERNELS_TERNARY_GEMM", gemm)
    check_backend_matches_reference("cuda", "cuda", m, n, k, torch.float16)


# Decode GEMV with the quantisation fused in (gemv_a8_decode: m * k_pad <= 40 KB): more rows than an H100's
# 132 * 2 * 16 warps (each warp loops over rows), rows of several weight batches and partial ones, masked
# tokens in the 4-, 8- and 16-token tiles, fewer rows than one block's 16 warps.
DECODE_SHAPES = [
    (1, 9001, 700),
    (1, 4500, 9000),
    (1, 37, 40000),
    (1, 5, 300),
    (3, 5003, 4100),
    (5, 4229, 7000),
    (9, 4300, 4000),
    (16, 4233, 2560),
]


@pytest.mark.parametrize("m,n,k", DECODE_SHAPES)
def test_cuda_decode_accumulators_exact(m, n, k):
    """fp32 output without bias keeps the int32 accumulator recoverable: y / ((s * gamma) / 127) must round to
    the reference's exact x_q @ W_t^T. Every output is checked, so an unwritten (NaN) or off-by-one one fails."""
    w_packed, w_scale, _ = random_layer(n, k, "cuda")
    x = random_activations(m, k, "cuda", torch.float32)
    torch.full((m, n), float("nan"), device="cuda").neg_()  # freed into the cache: the output likely reuses it
    with llmkernels.use_backend("cuda"):
        y = llmkernels.ternary_linear(x, w_packed, w_scale)
    x_q, s = ref.quantize_activation_ref(x)
    acc = ref.ternary_matmul_int8_ref(x_q, w_packed, k).double()
    row_scale = (s.double() * w_scale.double() / 127.0).unsqueeze(1)
    assert y.shape == (m, n) and not torch.isnan(y).any()
    err = (y.double() / row_scale - acc).abs().max().item()
    assert err < 0.25, f"accumulators off by up to {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 9001, 700), (7, 4231, 1000)])
def test_cuda_decode_with_bias_matches_reference(m, n, k, dtype):
    check_backend_matches_reference("cuda", "cuda", m, n, k, dtype)


@pytest.mark.parametrize("m", [1, 3, 17])  # the fused decode quantiser, and quantize_rows_kernel before the GEMM
def test_cuda_nonfinite_activations_give_nan_rows(m):
    """A NaN or inf in a token: s NaN / inf and x_q 0 as the reference's (fmaxf drops NaN operands), so the token's
    outputs are NaN rather than finite."""
    torch.manual_seed(6)
    k = 300
    w_packed, w_scale, _ = random_layer(40, k, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[0, 7] = float("nan")
    if m > 1:
        x[1, k - 1] = float("inf")
    x_q, s = llmkernels.ternary.quantize_activation(x)
    ref_q, ref_s = ref.quantize_activation_ref(x)
    assert torch.equal(x_q, ref_q)
    torch.testing.assert_close(s, ref_s, equal_nan=True)
    y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=8)
    assert y[: min(m, 2)].isnan().all() and not y[2:].isnan().any()
