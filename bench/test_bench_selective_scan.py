"""pytest-benchmark timings of the selective scan (run explicitly: pytest bench/test_bench_selective_scan.py).

On a GPU: bf16, batch 8, dim 2048, seqlen 2048, dstate 16, with z; decode batch 64, dim 5120.
On CPU: fp32, batch 1, dim 64, seqlen 2048; decode batch 16, dim 1024.
"""

import pytest
import torch

import llmkernels
from bench.bench_selective_scan import scan_inputs
from llmkernels import _ext
from llmkernels.reference.selective_scan import selective_scan_ref

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
OURS = "cuda" if GPU else "cpu"
BATCH, DIM, SEQLEN = (8, 2048, 2048) if GPU else (1, 64, 2048)
DTYPE = torch.bfloat16 if GPU else torch.float32
needs_ours = pytest.mark.skipif(not _ext.has_kernel("selective_scan_fwd", OURS.upper()), reason=f"no {OURS} kernel")


@needs_ours
def test_scan_forward(benchmark, synced):
    kw = scan_inputs(BATCH, DIM, SEQLEN, DTYPE, DEVICE)

    def fn():
        with llmkernels.use_backend(OURS):
            return llmkernels.selective_scan_fn(**kw)

    benchmark(synced(fn))


@needs_ours
def test_scan_forward_backward(benchmark, synced):
    kw = scan_inputs(BATCH, DIM, SEQLEN, DTYPE, DEVICE)
    for k in ("u", "delta", "B", "C", "z"):
        kw[k].requires_grad_()

    def fn():
        with llmkernels.use_backend(OURS):
            out = llmkernels.selective_scan_fn(**kw)
        out.backward(torch.ones_like(out))

    benchmark(synced(fn))


def test_scan_forward_reference(benchmark, synced):
    kw = scan_inputs(BATCH, DIM, SEQLEN, DTYPE, DEVICE)
    benchmark.pedantic(synced(lambda: selective_scan_ref(**kw)), rounds=2, iterations=1)


@needs_ours
def test_state_update_decode(benchmark, synced):
    batch, dim = (64, 5120) if GPU else (16, 1024)
    n = 16
    state = torch.randn(batch, dim, n, device=DEVICE)
    args = [torch.randn(batch, dim, device=DEVICE, dtype=DTYPE), torch.rand(batch, dim, device=DEVICE, dtype=DTYPE),
            -torch.rand(dim, n, device=DEVICE), torch.randn(batch, n, device=DEVICE, dtype=DTYPE),
            torch.randn(batch, n, device=DEVICE, dtype=DTYPE)]

    def fn():
        with llmkernels.use_backend(OURS):
            return llmkernels.selective_state_update(state, *args, dt_softplus=True)

    benchmark(synced(fn))
