"""Edge inputs found by fresh-eyes testing (session 19), each across the backends that take them: NaN inputs stay
NaN in attention (the reference and the CPU kernels turned them into 0 or dropped the key), empty batches and
channels in the references, a negative cache length named as such, a checkpoint's impossible 2-bit code."""

import pytest
import torch
from utils import run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.nn import TernaryLinear

CPU_ATTENTION = _ext.has_kernel("flash_attn_fwd", "CPU")
BACKENDS = ["reference"] + (["cpu"] if CPU_ATTENTION else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_nan_query_gives_nan_rows_only_there(backend, dtype, device="cpu"):
    """A NaN in one query: that row's output and lse are NaN (as SDPA's and the Triton kernels'), the others are
    untouched; a NaN in a key poisons exactly the rows that see that key."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, device=device).to(dtype) for _ in range(3))
    with llmkernels.use_backend("reference"):
        clean = llmkernels.flash_attn_func(q, k, v, causal=True)
    q[0, 7, 1, 3] = float("nan")
    k2 = k.clone()
    k2[0, 30, 0, 5] = float("nan")
    with llmkernels.use_backend(backend):
        out, lse, _ = llmkernels.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        out2 = llmkernels.flash_attn_func(q.nan_to_num(), k2, v, causal=True)
    assert out[0, 7, 1].isnan().all() and lse[0, 1, 7].isnan()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 7, 1] = False
    torch.testing.assert_close(out[keep].float(), clean[keep].float(), rtol=2e-2, atol=2e-2)
    assert out2[0, 30:, 0].isnan().all() and not out2[0, :30].isnan().any() and not out2[0, :, 1].isnan().any()


@pytest.mark.skipif(not CPU_ATTENTION, reason="no C++ CPU attention kernels")
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_attention_nan_stays_nan_on_other_instruction_sets(isa):
    """The AVX2 and scalar builds' exp2 / exp keep a NaN score NaN too (the AVX2 clamp dropped it as the AVX-512
    one did), for flash attention, decode and the rolling cache."""
    code = (
        "import torch, test_input_edges as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    t.test_attention_nan_query_gives_nan_rows_only_there('cpu', dtype)\n"
        "t.test_rolling_cache_nan_query_stays_nan('cpu')\n"
        "q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)\n"
        "kc[1, 3, 0, 2] = float('nan')\n"
        "import llmkernels\n"
        "with llmkernels.use_backend('cpu'):\n"
        "    lens = torch.tensor([9, 9], dtype=torch.int32)\n"
        "    out = llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)\n"
        "assert out[1, :, :2].isnan().all() and not out[1, :, 2:].isnan().any() and not out[0].isnan().any()\n"
    )
    run_with_cpu_isa(isa, code)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rolling_cache_nan_query_stays_nan(backend):
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    q[0, 1, 0, 0] = float("nan")
    with llmkernels.use_backend(backend):
        out = llmkernels.sliding_window_attn_with_cache(q, k, v, llmkernels.RollingKVCache(1, 4, 1, 8))
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_batch_of_zero_rows(backend):
    q, kc, vc = torch.randn(0, 1, 2, 8), torch.randn(0, 6, 2, 8), torch.randn(0, 6, 2, 8)
    with llmkernels.use_backend(backend):
        out, lse = llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, return_softmax_lse=True)
    assert out.shape == (0, 1, 2, 8) and lse.shape == (0, 2, 1)


@pytest.mark.skipif(not CPU_ATTENTION, reason="no C++ CPU attention kernels")
def test_negative_cache_seqlens_is_named_as_negative():
    q, kc, vc = torch.randn(1, 1, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    with llmkernels.use_backend("cpu"), pytest.raises(RuntimeError, match="cache_seqlens must be >= 0: row 0 holds -1"):
        llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([-1], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _ext.has_kernel("causal_conv1d_fwd", "CPU") else []))
def test_conv1d_of_zero_channels(backend):
    x, w = torch.randn(2, 0, 5, requires_grad=True), torch.randn(0, 4)
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_fn(x, w, activation="silu")
    assert out.shape == (2, 0, 5)


def test_checkpoint_with_code_3_is_refused():
    """Code 3 is no ternary weight (every kernel would read it as +2): refused on load, wherever it sits."""
    layer = TernaryLinear(20, 6)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["w_packed"][2, 0] |= 0x03
    with pytest.raises(RuntimeError, match="w_packed holds the 2-bit code 3"):
        TernaryLinear(20, 6).load_state_dict(sd)


CPU_SCAN = _ext.has_kernel("selective_scan_fwd", "CPU")


def _scan_nan_checks(backend="cpu", device="cpu"):
    """A NaN in A reaches every output of its channel (a finite value came out of the AVX2 / AVX-512 builds, whose
    exp clamp turned NaN into ~1e-38); a NaN delta at step 3 poisons du of steps 0-3 only (the backward runs back
    from the end), in the scan and the decode step."""
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, 2, 5, generator=g), torch.rand(1, 2, 5, generator=g) * 0.5
    A = -torch.rand(2, 4, generator=g) - 0.2
    A[0, 1] = float("nan")
    B, C = torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    u, dt, A, B, C = (t.to(device) for t in (u, dt, A, B, C))
    with llmkernels.use_backend(backend):
        y = llmkernels.selective_scan_fn(u, dt, A, B, C)
        assert y[0, 0].isnan().all() and not y[0, 1].isnan().any()
        state, x, dt1 = torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, generator=g), torch.rand(1, 2, generator=g)
        out = llmkernels.selective_state_update(state.to(device), x.to(device), dt1.to(device), A[:, 1].contiguous(),
                                                B[..., 0], C[..., 0])  # fmt: skip
        assert out[0, 0].isnan() and not out[0, 1].isnan()
        u2 = torch.randn(1, 1, 6, generator=g).to(device).requires_grad_()
        d2 = (torch.rand(1, 1, 6, generator=g) * 0.5).to(device)
        d2[0, 0, 3] = float("nan")
        B2, C2 = B[..., :1].expand(1, 4, 6), C[..., :1].expand(1, 4, 6)
        llmkernels.selective_scan_fn(u2, d2, A[1:], B2, C2).sum().backward()
        assert u2.grad[0, 0, :4].isnan().all() and not u2.grad[0, 0, 4:].isnan().any()


@pytest.mark.skipif(not CPU_SCAN, reason="no C++ CPU scan kernels")
@pytest.mark.parametrize("isa", ["default", "avx2", "scalar"])
def test_scan_nan_stays_nan_on_every_instruction_set(isa):
    if isa == "default":
        _scan_nan_checks()
    else:
        run_with_cpu_isa(isa, "import test_input_edges as t\nt._scan_nan_checks()\n")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_nan_stays_nan_on_the_gpu(backend):
    """The same NaN rules on a GPU's kernels (never run so far: what a GPU session should learn first). Backends that
    decline the inputs are skipped, not failed."""
    for dtype in (torch.float16, torch.bfloat16):
        try:
            test_attention_nan_query_gives_nan_rows_only_there(backend, dtype, device="cuda")
        except llmkernels.BackendError as exc:
            pytest.skip(f"{backend}: {exc}")
    try:
        _scan_nan_checks(backend, device="cuda")
    except llmkernels.BackendError as exc:
        pytest.skip(f"{backend}: {exc}")
