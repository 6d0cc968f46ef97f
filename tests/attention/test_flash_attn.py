"""flash_attn_func on each C++ backend against the reference: forward and backward, GQA, causal, windows,
softcap, ragged sizes. The CPU grid is a representative subset (CI runs it on 2 cores); the cuda-marked grid
crosses every sequence length pair with every head dim."""

import itertools

import pytest
import torch
from attn_cases import BACKENDS, DTYPES, check_flash_attn, needs_cpu_kernel, random_qkv
from utils import run_with_cpu_isa

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap)
CPU_CASES = [
    (1, 1, 1, 1, 1, 32, False, (-1, -1), 0.0),
    (2, 17, 17, 4, 4, 64, True, (-1, -1), 0.0),
    (3, 113, 64, 8, 1, 96, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k: the first rows see no key
    (1, 64, 113, 8, 2, 128, False, (16, 0), 0.0),
    (2, 128, 128, 4, 1, 32, False, (0, 0), 0.0),  # window 0: each query sees one key
    (1, 256, 512, 4, 4, 256, True, (300, -1), 0.0),
    (1, 17, 1023, 4, 4, 64, False, (5, 3), 30.0),  # small two-sided window, soft-capped
    (2, 1, 2048, 8, 1, 128, True, (-1, -1), 0.0),  # decode: one query, MQA
    (1, 512, 256, 8, 8, 64, True, (4000, 4000), 0.0),  # window larger than the sequence
    (1, 1023, 1023, 2, 1, 64, True, (-1, -1), 0.0),
    (1, 2048, 2048, 2, 2, 64, False, (-1, -1), 0.0),
    (1, 113, 17, 4, 2, 17, False, (-1, -1), 5.0),  # head dim not a multiple of the SIMD width
]
# Cases too long for the fp32 -> fp64 and bf16 reference backward on 2 cores: forward only on the CPU.
FORWARD_ONLY = {(1, 2048, 2048, 2, 2, 64, False, (-1, -1), 0.0)}

SEQLENS = (1, 17, 64, 113, 128, 256, 512, 1023, 2048)
_CUDA_CONFIGS = [  # (causal, window_size, nheads_k, softcap), rotated over the (seqlens, head dim) grid
    (False, (-1, -1), 8, 0.0),
    (True, (-1, -1), 2, 0.0),
    (False, (64, 0), 1, 0.0),
    (True, (0, 0), 8, 20.0),
    (False, (17, 100), 4, 0.0),
]


def _cuda_case(config, sq, sk, d):
    causal, window, hk, softcap = _CUDA_CONFIGS[config % len(_CUDA_CONFIGS)]
    return (2, sq, sk, 8, hk, d, causal, window, softcap)


CUDA_CASES = [
    _cuda_case(pair + i, sq, sk, d)
    for pair, (sq, sk) in enumerate(itertools.product(SEQLENS, SEQLENS))
    for i, d in enumerate((32, 64, 96, 128, 256))
]


def _case_id(case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    return f"b{b}-q{sq}-k{sk}-h{h}/{hk}-d{d}" + ("-causal" if causal else "") + (
        f"-w{window[0]},{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "")


def _params(backend, cases):
    return [
        pytest.param(backend, dtype, case, id=f"{backend}-{str(dtype)[6:]}-{_case_id(case)}", marks=marks)
        for case in cases
        for dtype in DTYPES[backend]
        for marks in [[needs_cpu_kernel] if backend == "cpu" else [pytest.mark.cuda]]
    ]


@pytest.mark.parametrize("backend,dtype,case", _params("cpu", CPU_CASES) + _params("cuda", CUDA_CASES))
def test_flash_attn_matches_reference(backend, dtype, case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    inputs = random_qkv(b, sq, sk, h, hk, d, dtype, backend)
    backward = backend != "cpu" or case not in FORWARD_ONLY
    check_flash_attn(backend, inputs, causal=causal, window_size=window, softcap=softcap, backward=backward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q, k, v sliced out of one packed qkv projection (flash_attn's usual layout): strided, last dim contiguous."""
    dtype = DTYPES[backend][0]
    qkv = torch.randn(2, 77, 3, 4, 64, dtype=dtype, device=backend)
    check_flash_attn(backend, qkv.unbind(2), causal=True)


@needs_cpu_kernel
def test_cpu_float16():
    check_flash_attn("cpu", random_qkv(2, 33, 70, 4, 2, 64, torch.float16, "cpu"), causal=True)


@needs_cpu_kernel
def test_cpu_avx2_path():
    """The AVX2 kernels (chosen on CPUs without AVX-512) in a fresh process with the ISA capped."""
    code = (
        "import torch, llmkernels; from attn_cases import check_flash_attn, random_qkv;"
        "torch.manual_seed(0);"
        "check_flash_attn('cpu', random_qkv(2, 77, 130, 4, 2, 40, torch.float32, 'cpu'), causal=True);"
        "check_flash_attn('cpu', random_qkv(1, 70, 70, 2, 2, 64, torch.bfloat16, 'cpu'), window_size=(9, 3))"
    )
    run_with_cpu_isa("avx2", code, "attention")
