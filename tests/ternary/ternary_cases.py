"""Shapes and the backend-vs-reference check shared by the ternary test files (CPU, Triton, CUDA)."""

from __future__ import annotations

import torch
from utils import TOLERANCES

import llmkernels
from llmkernels.reference import ternary as ref

# (tokens, out_features, in_features): odd sizes with every token count; the model shapes with few tokens
# on CPU (the float64 reference is the slow part).
ODD_SHAPES = [(1, 1, 1), (2, 17, 113), (7, 33, 300), (16, 5, 257), (64, 113, 1023), (513, 19, 131)]
MODEL_SHAPES = [(1, 2560, 2560), (2, 6912, 2560), (1, 2560, 6912), (1, 4096, 4096), (16, 256, 4096)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_layer(n: int, k: int, device, bias_dtype=None):
    """(w_packed, w_scale, bias) from a random latent weight; bias None unless bias_dtype."""
    w_packed, w_scale = llmkernels.ternary.quantize_weight(torch.randn(n, k, device=device))
    bias = torch.randn(n, device=device, dtype=bias_dtype) if bias_dtype is not None else None
    return w_packed, w_scale, bias


def random_activations(m: int, k: int, device, dtype) -> torch.Tensor:
    """Random rows of varied scale (some tiny, one outlier column), so s and rounding are exercised."""
    x = torch.randn(m, k, device=device) * torch.rand(m, 1, device=device).mul(4).exp2()
    x[:, torch.randint(k, (1,))] *= 8
    return x.to(dtype)


def check_backend_matches_reference(backend: str, device, m: int, n: int, k: int, dtype) -> None:
    """Every op of `backend` against the reference: x_q / s / int32 accumulator bit-identical, linear within
    the dtype's tolerance (act_bits=8: one rounding of the fp32 epilogue; weight-only: fp32 sum order)."""
    w_packed, w_scale, bias = random_layer(n, k, device, bias_dtype=dtype)
    x = random_activations(m, k, device, dtype)
    x_q_ref, s_ref = ref.quantize_activation_ref(x)
    with llmkernels.use_backend(backend):
        if backend != "triton":  # Triton quantises with the reference code itself
            x_q, s = llmkernels.ternary.quantize_activation(x)
            assert torch.equal(x_q, x_q_ref) and torch.equal(s, s_ref)
        acc = llmkernels.ternary.ternary_matmul_int8(x_q_ref, w_packed, k)
        assert acc.dtype == torch.int32
        torch.testing.assert_close(acc, ref.ternary_matmul_int8_ref(x_q_ref, w_packed, k), rtol=0, atol=0)
        for act_bits, ref_fn in ((8, ref.ternary_linear_a8_ref), (None, ref.ternary_linear_w2_ref)):
            y = llmkernels.ternary_linear(x, w_packed, w_scale, bias, act_bits=act_bits)
            y_ref = ref_fn(x.float(), w_packed, w_scale, bias, k)  # fp32 ground truth
            assert y.dtype == dtype and not torch.isnan(y).any()
            rtol, atol = TOLERANCES[dtype]
            scale = max(1.0, y_ref.abs().max().item() / 16)  # outputs grow like sqrt(k): tolerance relative to that
            torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol * scale)
