"""Edge cases of the CUDA rolling-window kernels (csrc/sliding_window/*.cu) that test_rolling_cache.py misses:
softcap (the kernel's tanhf is tanh.approx.f32 under --use_fast_math) and a misaligned q refused by name."""

import pytest
import torch
from test_rolling_cache import run_generation, skip_unless_built


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [16, 1000])  # 1000: split over the window plus the combine kernel
def test_generation_gpu_softcap(dtype, window):
    chunks = [1, 9, 20, 1, 1] if window == 16 else [1, 3, 1, 1]
    run_generation("cuda", window, chunks, dtype, "cuda", offsets=(0, 21, 2 * window + 5), softcap=5.0)


@pytest.mark.cuda
def test_cuda_misaligned_q_is_refused():
    skip_unless_built("cuda")
    k, v = (torch.randn(1, 2, 2, 24, dtype=torch.float16, device="cuda") for _ in range(2))
    k_ring, v_ring = (torch.randn(1, 8, 2, 24, dtype=torch.float16, device="cuda") for _ in range(2))
    q = torch.randn(1 * 2 * 4 * 24 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 2, 4, 24)  # 2-byte offset
    seqlens = torch.tensor([3], dtype=torch.int32, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="q"):
        torch.ops.llmkernels.rolling_window_attn(q, k, v, k_ring, v_ring, seqlens, 0.2, 0.0)
