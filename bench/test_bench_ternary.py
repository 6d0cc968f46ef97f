"""pytest-benchmark timings of ternary decode (run explicitly: pytest bench/test_bench_ternary.py).

One token through a 4096x4096 layer: llmkernels (cuda on a GPU, the C++ kernels on CPU with 2 threads)
against F.linear in bf16 (GPU) / fp32 (CPU).
"""

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import _ext

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
OURS = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
N = K = 4096


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not _ext.has_kernel("ternary_linear_a8", OURS.upper()), reason=f"no {OURS} kernel built")
@pytest.mark.parametrize("act_bits", [8, None])
def test_ternary_decode(benchmark, synced, two_threads, act_bits):
    w_packed, w_scale = llmkernels.ternary.quantize_weight(torch.randn(N, K, device=DEVICE))
    x = torch.randn(1, K, device=DEVICE, dtype=DTYPE)

    def fn():
        with llmkernels.use_backend(OURS):
            return llmkernels.ternary_linear(x, w_packed, w_scale, act_bits=act_bits)

    benchmark(synced(fn))


def test_f_linear_decode(benchmark, synced, two_threads):
    w = torch.randn(N, K, device=DEVICE, dtype=DTYPE)
    x = torch.randn(1, K, device=DEVICE, dtype=DTYPE)
    benchmark(synced(lambda: F.linear(x, w)))
