"""The bf16 forward on AMX tiles (csrc/attention/cpu/kernel_amx.cpp: ATen's brgemm for the two products, the online
softmax ours), taken for bf16 prefill on CPUs with AMX-BF16, against the fp32 reference, on shapes that cross its
blocks (128 query rows, 256 keys, 64-column strips): windows that start inside a block, rows that see no key,
soft-capping, GQA, head dims 64 / 96 / 128 / 256, a KV cache with ragged lengths. On other CPUs the same cases run
the vdpbf16ps / AVX2 kernels (still checked); the last test says which path ran."""

import os
import subprocess
import sys

import pytest
import torch
from attn_cases import needs_cpu_kernel
from utils import assert_error_within_ratio

import llmkernels
from llmkernels.reference.attention import flash_attn_ref, flash_attn_with_kvcache_ref


def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


AMX = _cpu_has_amx_bf16()

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap)
CASES = [
    (1, 300, 600, 8, 2, 128, True, (100, 0), 0.0),  # window starting inside a 256-key block, GQA
    (2, 129, 257, 4, 4, 64, False, (-1, -1), 0.0),  # one row / one key past a block
    (1, 400, 130, 4, 1, 96, True, (-1, -1), 5.0),  # seqlen_q > seqlen_k: the first rows see no key; MQA; softcap
    (1, 64, 1000, 2, 2, 256, False, (300, 40), 0.0),  # two-sided window, head dim 256 (four strips)
    (1, 16, 16, 2, 1, 64, True, (-1, -1), 0.0),  # the smallest call that takes the path
]


@needs_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bf16_forward_against_reference(case):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = (torch.randn(b, s, n, d).to(torch.bfloat16) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    with llmkernels.use_backend("cpu"):
        out, lse, _ = llmkernels.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    exact = flash_attn_ref(q.float(), k.float(), v.float(), **kw)
    same = flash_attn_ref(q, k, v, upcast=False, **kw)
    assert_error_within_ratio(out, exact, same, ratio=2.0)
    from llmkernels.reference.attention import flash_attn_fwd_ref, normalize_window

    _, ref_lse = flash_attn_fwd_ref(q.float(), k.float(), v.float(), d**-0.5, *normalize_window(causal, window),
                                    softcap)  # fmt: skip
    torch.testing.assert_close(lse, ref_lse, rtol=2e-2, atol=2e-2)  # -inf rows included


@needs_cpu_kernel
def test_bf16_prefill_into_a_ragged_cache():
    q = torch.randn(3, 40, 8, 128).to(torch.bfloat16)
    k_new, v_new = (torch.randn(3, 40, 2, 128).to(torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.randn(3, 700, 2, 128).to(torch.bfloat16) for _ in range(2))
    lens = torch.tensor([0, 250, 600], dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    with llmkernels.use_backend("cpu"):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)
    exact = flash_attn_with_kvcache_ref(q.float(), kc.float(), vc.float(), k_new.float(), v_new.float(), lens,
                                        causal=True)  # fmt: skip
    same = flash_attn_with_kvcache_ref(q, kc, vc, k_new, v_new, lens, causal=True, upcast=False)
    assert_error_within_ratio(out, exact, same, ratio=2.0)


@needs_cpu_kernel
@pytest.mark.skipif(not AMX, reason="the CPU has no AMX tiles: the brgemm path is never taken here")
def test_the_amx_path_runs_and_can_be_turned_off():
    """LLMKERNELS_CPU_AMX=0 gives the vdpbf16ps kernel: a different rounding of P, so the outputs differ a little;
    both are within tolerance (the cases above)."""
    code = (
        "import torch, llmkernels; torch.manual_seed(0);"
        "q, k, v = (torch.randn(1, 200, 4, 64).to(torch.bfloat16) for _ in range(3));"
        "torch.save(llmkernels.flash_attn_func(q, k, v, causal=True), sys.argv[1])"
    )
    outs = []
    for flag in ("1", "0"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llmk_amx_{os.getpid()}_{flag}.pt")
        env = {**os.environ, "LLMKERNELS_CPU_AMX": flag}
        subprocess.run([sys.executable, "-c", "import sys;" + code, path], check=True, env=env)
        outs.append(torch.load(path))
        os.remove(path)
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)
