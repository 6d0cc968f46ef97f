"""The bf16 CPU backward on vdpbf16ps (kernel_avx512bf16.cpp, taken for bf16 inputs on CPUs with AVX512-BF16; on
CPUs with AMX tiles, head dims a multiple of 32 take kernel_amx_bwd.cpp, which rounds the same way): that this CPU
takes one of them (its probabilities are rounded to bf16 before dV = P^T dO, which the fp32 kernels never do), and
its gradients against the fp32 reference within 3x the error of PyTorch's bf16 reference plus the usual floor, on
ragged sizes, the head dims the kernel takes, GQA, causal / windowed / soft-capped masks, query blocks that start at
odd rows, and the split path (bitwise deterministic)."""

import os

import pytest
import torch
from attn_cases import check_flash_attn, forward_backward, needs_cpu_kernel, random_qkv
from utils import assert_error_within_ratio, run_with_cpu_isa

from llmkernels.reference.attention import flash_attn_ref


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512_bf16"} <= set(flags)


needs_bf16_dot = pytest.mark.skipif(
    not _cpu_has_avx512_bf16() or os.environ.get("LLMKERNELS_CPU_ISA", "") in ("avx2", "scalar"),
    reason="the vdpbf16ps kernels need a CPU with AVX512-BF16 (and no LLMKERNELS_CPU_ISA cap)",
)

# 1/3 rounded to bf16: 0.0101010|10101... rounds up to 171/512, 2/3 of a bf16 step away from any midpoint, so
# the kernel's fp32 probability (1/3 within a few fp32 ulps) always rounds to it.
_THIRD_BF16 = 171 / 512


def uniform_attention_value_grad():
    """(dout, dv) for one query attending equally to 3 keys (q = 0: every p = 1/3), dout row = every bf16 in
    [1, 2). dv_j = p * dout exactly in fp32 (one product), then rounded to bf16 once."""
    d = 128
    q = torch.zeros(1, 1, 1, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, 1, d).bfloat16() for _ in range(2))
    dout = (1 + torch.arange(d, dtype=torch.float32) / d).bfloat16().view(1, 1, 1, d)
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, 1.0, -1, -1, 0.0)
    _, _, dv = torch.ops.llmkernels.flash_attn_bwd(dout, q, k, v, out, lse, 1.0, -1, -1, 0.0)
    return dout, dv


def _rounded_p_prediction(dout):
    return (dout.float() * _THIRD_BF16).bfloat16()  # exact fp32 product (8 x 8 significant bits), one rounding


@needs_cpu_kernel
@needs_bf16_dot
def test_bf16_backward_takes_the_vdpbf16ps_path():
    dout, dv = uniform_attention_value_grad()
    rounded = _rounded_p_prediction(dout)
    unrounded = (dout.float() * (1 / 3)).bfloat16()
    assert (rounded != unrounded).sum() >= 30  # the signature can tell the two apart
    for j in range(3):
        assert torch.equal(dv[0, j, 0], rounded[0, 0, 0]), "dV was not computed from bf16-rounded probabilities"

    # The fp32 backward (AVX2 kernels, ISA capped in a child process) keeps P in fp32: it does not match.
    code = (
        "import torch, llmkernels; from test_cpu_bf16_backward import uniform_attention_value_grad, "
        "_rounded_p_prediction; dout, dv = uniform_attention_value_grad(); "
        "print(int(torch.equal(dv[0, 0, 0], _rounded_p_prediction(dout)[0, 0, 0])))"
    )
    assert run_with_cpu_isa("avx2", code, "attention").strip().splitlines()[-1] == "0"


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap)
CASES = [
    (1, 1, 1, 1, 1, 32, False, (-1, -1), 0.0),
    (2, 17, 113, 4, 1, 64, True, (-1, -1), 0.0),  # GQA group 4, causal with seqlen_q < seqlen_k
    (1, 100, 163, 8, 2, 64, True, (-1, -1), 0.0),  # shift 63: query blocks start at odd rows
    (1, 113, 17, 8, 2, 96, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k: the first rows see no key
    (1, 113, 200, 4, 1, 128, False, (30, 8), 0.0),  # two-sided window, odd first rows, group 4
    (2, 65, 130, 4, 4, 256, False, (-1, -1), 20.0),  # soft-capped, largest head dim
    (1, 130, 77, 8, 2, 17, False, (-1, -1), 5.0),  # odd head dim: the last pair padded with a zero
    (1, 200, 200, 4, 1, 40, True, (50, 0), 0.0),  # head dim that pads to whole registers, window
    (3, 64, 64, 2, 2, 128, False, (0, 0), 0.0),  # each query sees one key
]


def _case_id(case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    return (
        f"b{b}-q{sq}-k{sk}-h{h}/{hk}-d{d}"
        + ("-causal" if causal else "")
        + (f"-w{window[0]},{window[1]}" if window != (-1, -1) else "")
        + (f"-cap{softcap:g}" if softcap else "")
    )


@needs_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bf16_gradients_against_fp32_reference(case):
    torch.manual_seed(hash(case) % 2**31)
    b, sq, sk, h, hk, d, causal, window, softcap = case
    inputs = random_qkv(b, sq, sk, h, hk, d, torch.bfloat16, "cpu")
    check_flash_attn("cpu", inputs, causal=causal, window_size=window, softcap=softcap)


@needs_cpu_kernel
def test_bf16_split_path_deterministic_and_accurate():
    """One (batch, KV head) pair on 3 threads: each head's key blocks split over 3 tasks, each with its own dq
    buffer. GQA group of 4, causal with a window, ragged last key block; two runs bitwise equal."""
    torch.manual_seed(7)
    q, k, v = random_qkv(1, 150, 261, 4, 1, 64, torch.bfloat16, "cpu")
    dout = torch.randn_like(q)
    scale, window = 0.125, (120, 0)
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, scale, *window, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        grads = [torch.ops.llmkernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, *window, 0.0) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*grads):
        assert torch.equal(first, second)

    def reference(upcast):
        return lambda *t: flash_attn_ref(*t, softmax_scale=scale, window_size=window, upcast=upcast)

    _, exact = forward_backward(reference(True), [t.float() for t in (q, k, v)], dout.float())
    _, same = forward_backward(reference(False), [q, k, v], dout)
    for name, g, e, s in zip(("dq", "dk", "dv"), grads[0], exact, same):
        assert_error_within_ratio(g, e, s, ratio=3.0, name=name)
