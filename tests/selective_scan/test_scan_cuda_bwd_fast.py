"""The channel-parallel CUDA scan backward (csrc/scan/cuda/selective_scan_bwd_fast.cuh), run through
LLMKERNELS_SCAN_BWD=fast: dstate 16, per-token or grouped B/C, rows of whole 16-byte vectors, 64-channel CTAs
within one group of B and of C. Shapes cut its 16-step tiles and 4-step sub-tiles short at the end (a seqlen of
whole vectors but not whole tiles), put several CTAs in one group (the partial sums over CTAs) and several
batches (the sums over batch), and poison the outputs and the kernel's scratch with NaN.
"""

import pytest
import torch
from test_scan_cuda_edge import NAMES, _poison_allocator
from test_triton_scan import OPTIONS, _assert_close_to_scale, _scan_op_args, _ssm_inputs

from llmkernels.reference.selective_scan import selective_scan_ref

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _fast_backward(monkeypatch):
    monkeypatch.setenv("LLMKERNELS_SCAN_BWD", "fast")


def _reference_grads(args, dout, dlast):
    leaves = {k: args[k].detach().float().requires_grad_() for k in NAMES if args[k] is not None}
    out, last = selective_scan_ref(**{**args, **leaves}, return_last_state=True)
    outs, grads = [out], [dout.float()]
    if dlast is not None:
        outs.append(last)
        grads.append(dlast)
    torch.autograd.backward(outs, grads)
    return leaves


def _check_bwd(args, dtype, with_dlast=True):
    u = args["u"]
    batch, dim, seqlen = u.shape
    dout = torch.randn_like(u)
    dlast = torch.randn(batch, dim, 16, device="cuda") if with_dlast else None
    # NaN blocks the size of the outputs and of the scratch (checkpoints, partials) for them to land on.
    ctas, ntiles = batch * dim // 64, (seqlen + 15) // 16
    _poison_allocator(
        ((batch, dim, seqlen), dtype),
        ((batch, dim, seqlen), dtype),
        ((ctas, ntiles, 64, 16), torch.float32),
        ((ctas, max(seqlen, 1), 32), torch.float32),
        ((batch, dim, 16), torch.float32),
        ((dim, 16), torch.float32),
        ((dim,), torch.float32),
    )
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    leaves = _reference_grads(args, dout, dlast)
    for name, grad in zip(NAMES, grads):
        if args[name] is None:
            assert grad.numel() == 0, f"d{name} of an absent input must be empty"
            continue
        ref = leaves[name].grad
        assert grad.shape == args[name].shape and grad.dtype == args[name].dtype, f"d{name} shape/dtype"
        if seqlen > 0 and name not in ("initial_state",):
            assert ref.abs().max() > 1e-3, f"d{name}: a test on a near-zero gradient cannot fail"
        _assert_close_to_scale(grad, ref, dtype, f"d{name}")
    return grads


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1], OPTIONS[3]], ids=["all", "none", "z_softplus"])
@pytest.mark.parametrize("layout", ["per_token", "grouped"])
@pytest.mark.parametrize(
    "dtype,seqlen",
    [(torch.float32, 36), (torch.float32, 4), (torch.float16, 72), (torch.bfloat16, 200), (torch.bfloat16, 16)],
)
def test_scan_bwd_fast(dtype, seqlen, layout, options):
    """batch 3, dim 256: per token 4 CTAs per group, grouped (2 groups) 2 CTAs per group."""
    args = _ssm_inputs(3, 256, 16, seqlen, layout, dtype, "cuda", options, initial=options[0])
    _check_bwd(args, dtype, with_dlast=options[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_bwd_fast_long(dtype):
    """Many tiles (1000 = 62 * 16 + 8): the state and q carried across tiles, the partials over time."""
    args = _ssm_inputs(2, 128, 16, 1000, "per_token", dtype, "cuda", OPTIONS[0])
    _check_bwd(args, dtype)


def test_scan_bwd_fast_mixed_groups():
    """B in 4 groups (one CTA each), C per token (4 CTAs in its one group), fp16, no dlast_state."""
    args = _ssm_inputs(2, 256, 16, 48, "per_token", torch.float16, "cuda", OPTIONS[3])
    args["B"] = torch.randn(2, 4, 16, 48, device="cuda").half()
    _check_bwd(args, torch.float16, with_dlast=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_bwd_fast_softplus_tails(dtype):
    """delta + delta_bias on both sides of softplus's threshold (20: the identity above it, gradient 1) and far
    below it (-30: dt ~ 1e-13), where the kernel's d softplus = -expm1(-dt) must still equal sigmoid(v); the
    other tests' delta ~ N(-1, 1) never leaves the middle of the curve."""
    args = _ssm_inputs(2, 128, 16, 48, "per_token", dtype, "cuda", OPTIONS[0])
    raw = torch.randn(2, 128, 48, device="cuda") - 1.0
    pick = torch.randint(0, 3, raw.shape, device="cuda")
    raw = torch.where(pick == 1, 20.0 + 0.5 * torch.randn_like(raw), raw)
    raw = torch.where(pick == 2, -30.0 + torch.randn_like(raw), raw)
    args["delta"] = raw.to(dtype)
    v = args["delta"].float() + args["delta_bias"][:, None]
    assert (v > 20).any() and ((v > 19) & (v <= 20)).any() and (v < -25).any(), "the tails must be hit"
    _check_bwd(args, dtype)


def test_scan_bwd_fast_past_2_31_elements():
    """(2, 16384, 65600) fp16, 2.15e9 elements: batch 1's last 31 rows start past element 2^31, and so do the
    last CTA's checkpoints (512 CTAs x 4100 tiles x 1024 floats). That CTA's per-channel gradients (du, ddelta,
    dinitial_state) against the same op on a copy of its 64 channels, a lone CTA with small offsets: the same
    arithmetic on the same values, so equal bit for bit. (dA, dD, ddelta_bias and dB/dC mix in other rows.)"""
    torch.cuda.empty_cache()  # blocks cached by earlier tests count as used
    if torch.cuda.mem_get_info()[0] < 40e9:
        pytest.skip("needs ~35 GB of free GPU memory")
    batch, dim, seqlen = 2, 16384, 65600
    kw = dict(device="cuda")
    u = torch.randn(batch, dim, seqlen, dtype=torch.float16, **kw)
    delta = torch.randn(batch, dim, seqlen, dtype=torch.float16, **kw).sub_(1.0)
    dout = torch.randn(batch, dim, seqlen, dtype=torch.float16, **kw)
    A = -torch.rand(dim, 16, **kw) - 0.2
    B, C = (torch.randn(batch, 16, seqlen, dtype=torch.float16, **kw) for _ in range(2))
    D, bias = torch.randn(dim, **kw), 0.3 * torch.randn(dim, **kw)
    init, dlast = torch.randn(batch, dim, 16, **kw), torch.randn(batch, dim, 16, **kw)
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, None, bias, True, init)
    tail = slice(dim - 64, dim)
    rows = [t[1:, tail].contiguous() for t in (dout, dlast, u, delta)]
    params = [A[tail].contiguous(), B[1:].contiguous(), C[1:].contiguous(), D[tail], None, bias[tail]]
    small = torch.ops.llmkernels.selective_scan_bwd(*rows, *params, True, init[1:, tail].contiguous())
    for name in ("u", "delta", "initial_state"):
        i = NAMES.index(name)
        assert torch.isfinite(small[i]).all() and small[i].abs().max() > 1e-3, name
        torch.testing.assert_close(grads[i][1:, tail], small[i], rtol=0, atol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_scan_bwd_fast_seqlen_0():
    args = _ssm_inputs(2, 64, 16, 0, "per_token", torch.bfloat16, "cuda", OPTIONS[0])
    dout = torch.randn_like(args["u"])
    dlast = torch.randn(2, 64, 16, device="cuda")
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    for name, grad in zip(NAMES, grads):
        assert not torch.isnan(grad).any(), name
    torch.testing.assert_close(grads[NAMES.index("initial_state")], dlast)
    for name in ("A", "D", "delta_bias"):
        assert (grads[NAMES.index(name)] == 0).all(), name


def test_scan_bwd_fast_deterministic():
    """No atomics: two calls agree bit for bit (the chunked kernel's atomics do not promise this)."""
    args = _ssm_inputs(2, 256, 16, 136, "grouped", torch.bfloat16, "cuda", OPTIONS[0])
    dout = torch.randn_like(args["u"])
    first = torch.ops.llmkernels.selective_scan_bwd(dout, None, *_scan_op_args(args))
    second = torch.ops.llmkernels.selective_scan_bwd(dout, None, *_scan_op_args(args))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_bwd_fast_bench_geometry(dtype):
    """The benchmark's batch 8, dim 5120 (640 CTAs, several per SM) over 5 tiles plus 8 steps."""
    args = _ssm_inputs(8, 5120, 16, 88, "per_token", dtype, "cuda", OPTIONS[0])
    _check_bwd(args, dtype)


@pytest.mark.parametrize(
    "dstate,dim,seqlen,layout",
    [(8, 128, 40, "per_token"), (16, 96, 40, "per_token"), (16, 128, 37, "per_token"), (16, 128, 40, "constant")],
    ids=["dstate8", "dim96", "unaligned_rows", "constant_bc"],
)
def test_scan_bwd_fast_falls_back(dstate, dim, seqlen, layout):
    """Shapes the fast kernel does not take still get the chunked kernel's correct gradients with the switch on."""
    args = _ssm_inputs(2, dim, dstate, seqlen, layout, torch.float32, "cuda", OPTIONS[0])
    dout = torch.randn_like(args["u"])
    dlast = torch.randn(2, dim, dstate, device="cuda")
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    leaves = _reference_grads(args, dout, dlast)
    for name, grad in zip(NAMES, grads):
        if args[name] is not None:
            _assert_close_to_scale(grad, leaves[name].grad, torch.float32, f"d{name}")


def test_scan_bwd_fast_matches_chunked(monkeypatch):
    """The two kernels against each other on a mid-sized case (fp32: differences are summation order only)."""
    args = _ssm_inputs(2, 512, 16, 520, "grouped", torch.float32, "cuda", OPTIONS[0])
    dout = torch.randn_like(args["u"])
    dlast = torch.randn(2, 512, 16, device="cuda")
    fast = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    monkeypatch.setenv("LLMKERNELS_SCAN_BWD", "chunked")
    chunked = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    for name, a, b in zip(NAMES, fast, chunked):
        if args[name] is not None:
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"d{n}: {m}")


def test_scan_bwd_fast_is_taken():
    """The switch reaches the fast kernel (the tests above would also pass on the chunked fallback)."""
    args = _ssm_inputs(1, 64, 16, 32, "per_token", torch.bfloat16, "cuda", OPTIONS[0])
    dout = torch.randn_like(args["u"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.llmkernels.selective_scan_bwd(dout, None, *_scan_op_args(args))
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if "selective_scan" in e.name]
    if not kernels:
        pytest.skip("the profiler recorded no kernels (no CUPTI?)")
    assert any("selective_scan_bwd_fast_kernel" in n for n in kernels), kernels
    assert not any("selective_scan_bwd_kernel" in n for n in kernels), kernels
