"""Edge cases of the CUDA scan kernels (csrc/scan/cuda) that test_triton_scan.py's CUDA tests do not reach.

- the largest dstate through the backward, with a chunk boundary one step before the end (1025 = 1024 + 1);
- mixed activation dtypes, which the host code runs in fp32 and whose gradients come back in each input's dtype;
- the backward called without dlast_state and without initial_state.
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
