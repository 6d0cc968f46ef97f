"""Edge cases of the CUDA scan kernels (csrc/scan/cuda) that test_triton_scan.py's CUDA tests do not reach.

- the largest dstate through the backward, with a chunk boundary one step before the end (1025 = 1024 + 1);
- mixed activation dtypes, which the host code runs in fp32 and whose gradients come back in each input's dtype;
- the backward called without dlast_state and without initial_state;
- activations and a decode state of more than 2^31 elements (int32 offsets overflowed in the Triton kernels);
- the forward's channel-parallel kernel (dstate 16, per-token or grouped B/C, dim a multiple of 64, rows of whole
  16-byte vectors, batch * dim >= 16384), with a partial last tile of 32 timesteps.
"""

import pytest
import torch
from test_triton_scan import OPTIONS, _assert_close, _assert_close_to_scale, _scan_op_args, _ssm_inputs

from llmkernels.reference.selective_scan import selective_scan_ref

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _check_fwd_bwd(args, dtype, with_dlast=True):
    out, last = torch.ops.llmkernels.selective_scan_fwd(*_scan_op_args(args))
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    assert out.dtype == args["u"].dtype and last.dtype == torch.float32
    _assert_close(out, ref_out, dtype, "out")
    _assert_close(last, ref_last, dtype, "last_state")
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last) if with_dlast else None
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    leaves = {k: args[k].detach().float().requires_grad_() for k in NAMES if args[k] is not None}
    o, s = selective_scan_ref(**{**args, **leaves}, return_last_state=True)
    torch.autograd.backward([o] + ([s] if with_dlast else []), [dout.float()] + ([dlast] if with_dlast else []))
    for name, grad in zip(NAMES, grads):
        if args[name] is None:
            assert grad.numel() == 0, f"d{name} of an absent input must be empty"
            continue
        assert grad.shape == args[name].shape and grad.dtype == args[name].dtype, f"d{name} shape/dtype"
        _assert_close_to_scale(grad, leaves[name].grad, dtype, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_cuda_dstate_256_chunk_boundary(dtype):
    args = _ssm_inputs(1, 4, 256, 1025, "grouped", dtype, "cuda", OPTIONS[0])
    _check_fwd_bwd(args, dtype)


@pytest.mark.cuda
def test_scan_cuda_mixed_dtypes():
    args = _ssm_inputs(2, 4, 16, 77, "per_token", torch.bfloat16, "cuda", OPTIONS[0])
    args["delta"] = args["delta"].float()
    args["B"] = args["B"].half()
    args["z"] = args["z"].float()
    _check_fwd_bwd(args, torch.bfloat16)


@pytest.mark.cuda
def test_scan_cuda_bwd_without_dlast_and_initial_state():
    args = _ssm_inputs(2, 6, 8, 1030, "constant", torch.float16, "cuda", OPTIONS[3], initial=False)
    _check_fwd_bwd(args, torch.float16, with_dlast=False)


def _poison_allocator(*shapes_dtypes):
    """Leaves NaN-filled blocks of these sizes in the caching allocator, for the op's outputs to land on."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


@pytest.mark.cuda
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1], OPTIONS[3]], ids=["all", "none", "z_softplus"])
@pytest.mark.parametrize("layout", ["per_token", "grouped"])
@pytest.mark.parametrize(
    "dtype,seqlen",
    [(torch.float32, 36), (torch.float32, 100), (torch.float16, 72), (torch.bfloat16, 200), (torch.bfloat16, 0)],
)
def test_scan_cuda_fwd_channel_parallel(dtype, seqlen, layout, options):
    """Shapes that take the channel-parallel forward kernel: 2 * 8192 rows, 64-channel CTAs within one of the 2
    groups, seqlen a multiple of the 16-byte vector but not of the 32-step tile (fp32 36 = 32 + 4)."""
    batch, dim, dstate = 2, 8192, 16
    args = _ssm_inputs(batch, dim, dstate, seqlen, layout, dtype, "cuda", options, initial=options[0])
    _poison_allocator(((batch, dim, seqlen), dtype), ((batch, dim, dstate), torch.float32))
    out, last = torch.ops.llmkernels.selective_scan_fwd(*_scan_op_args(args))
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert seqlen == 0 or ref_out.float().abs().max() > 0.1, "a test on near-zero outputs cannot fail"
    _assert_close(out, ref_out, dtype, "out")
    _assert_close(last, ref_last, dtype, "last_state")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_cuda_fwd_channel_parallel_bench_geometry(dtype):
    """The benchmark's batch 8, dim 5120 (640 CTAs, ~5 per SM, all resident at once) over 9 tiles, B/C per token."""
    args = _ssm_inputs(8, 5120, 16, 264, "per_token", dtype, "cuda", OPTIONS[0])
    _poison_allocator(((8, 5120, 264), dtype), ((8, 5120, 16), torch.float32))
    out, last = torch.ops.llmkernels.selective_scan_fwd(*_scan_op_args(args))
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    _assert_close(out, ref_out, dtype, "out")
    _assert_close(last, ref_last, dtype, "last_state")


def _scan_backend(backend):
    if backend == "triton":
        from llmkernels.triton.selective_scan import selective_scan_triton, selective_state_update_triton

        return selective_scan_triton, selective_state_update_triton
    return torch.ops.llmkernels.selective_scan_fwd, torch.ops.llmkernels.selective_state_update


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scan_more_than_2_31_elements(backend):
    """(2, 16384, 65600) fp16 activations, 2.15e9 elements (13 GB with delta and out): batch 1's last channels
    sit past 2^31. Those channels against the same op on a copy of them, whose offsets are small."""
    scan, _ = _scan_backend(backend)
    batch, dim, seqlen, dstate = 2, 16384, 65600, 4
    u = torch.randn(batch, dim, seqlen, dtype=torch.float16, device="cuda")
    delta = torch.rand(batch, dim, seqlen, dtype=torch.float16, device="cuda").mul_(0.1)
    A = -torch.rand(dim, dstate, device="cuda") - 0.5
    B, C = torch.randn(dim, dstate, device="cuda"), torch.randn(dim, dstate, device="cuda")
    D = torch.randn(dim, device="cuda")
    out, last = scan(u, delta, A, B, C, D, None, None, False, None)
    tail = slice(dim - 64, dim)
    small = [t[1:, tail].contiguous() for t in (u, delta)] + [t[tail].contiguous() for t in (A, B, C, D)]
    ref_out, ref_last = scan(*small, None, None, False, None)
    assert torch.isfinite(ref_out).all()
    torch.testing.assert_close(out[1:, tail], ref_out, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last[1:, tail], ref_last, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_state_update_state_past_2_31_elements(backend):
    """A (2049, 8192, 128) bf16 decode state (2.15e9 elements, 4.3 GB): the last rows against a copy of them."""
    _, update = _scan_backend(backend)
    batch, dim, dstate = 2049, 8192, 128
    state = torch.randn(batch, dim, dstate, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(batch, dim, dtype=torch.bfloat16, device="cuda")
    dt = torch.rand(batch, dim, dtype=torch.bfloat16, device="cuda")
    A = -torch.rand(dim, dstate, device="cuda") - 0.5
    B, C = (torch.randn(batch, dstate, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    tail = slice(batch - 2, batch)
    state_tail = state[tail].clone()
    y = update(state, x, dt, A, B, C, None, None, None, True)
    y_ref = update(state_tail, x[tail].contiguous(), dt[tail].contiguous(), A, B[tail].contiguous(),
                   C[tail].contiguous(), None, None, None, True)  # fmt: skip
    torch.testing.assert_close(state[tail], state_tail, rtol=0, atol=0)
    torch.testing.assert_close(y[tail], y_ref, rtol=1e-2, atol=1e-2)
