"""The Triton GEMM against the reference: under the interpreter on CPU (small shapes), on the GPU when present."""

import pytest
import torch
from ternary_cases import DTYPES, MODEL_SHAPES, check_backend_matches_reference, random_layer

import llmkernels
from llmkernels._backend import triton_unavailable_reason

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_reason = triton_unavailable_reason(DEVICE)
pytestmark = [pytest.mark.triton_interp, pytest.mark.skipif(_reason is not None, reason=str(_reason))]

SMALL_SHAPES = [(1, 1, 1), (2, 17, 113), (7, 33, 300), (17, 70, 260)]  # the interpreter is slow


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES)
def test_triton_matches_reference(m, n, k, dtype):
    check_backend_matches_reference("triton", DEVICE, m, n, k, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64, 513])
@pytest.mark.parametrize("_, n, k", MODEL_SHAPES)
def test_triton_matches_reference_model_shapes_gpu(m, _, n, k):
    check_backend_matches_reference("triton", "cuda", m, n, k, torch.bfloat16)


def test_opcheck_triton_ops():
    k, n = 130, 9
    w_packed, w_scale, bias = random_layer(n, k, DEVICE, bias_dtype=torch.float32)
    x = torch.randn(3, k, device=DEVICE)
    x_q, _ = llmkernels.ternary.quantize_activation(x)
    from llmkernels.triton import ternary  # noqa: F401  (registers the triton ops)

    # The CPU interpreter cannot launch on the functional tensors of the aot_dispatch test (it reads raw
    # storages); that check runs on the GPU only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA:
        utils += ("test_aot_dispatch_dynamic",)
    ops = torch.ops.llmkernels
    torch.library.opcheck(ops.ternary_matmul_int8_triton.default, (x_q, w_packed, k), test_utils=utils)
    torch.library.opcheck(ops.ternary_linear_a8_triton.default, (x, w_packed, w_scale, bias, k), test_utils=utils)
    torch.library.opcheck(ops.ternary_linear_w2_triton.default, (x, w_packed, w_scale, None, k), test_utils=utils)
