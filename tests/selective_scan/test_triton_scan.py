"""Triton selective scan / state update against the references, and the CUDA kernels of csrc/scan/cuda.

Interpreter cases (`triton_interp`) run CPU tensors under TRITON_INTERPRET=1 with small shapes; `cuda` cases run
on a GPU (skipped here with the reason). Tolerances are mamba_ssm's (tests/utils.py TOLERANCES).
"""

from __future__ import annotations

import os

import pytest
import torch

from llmkernels import _ext
from llmkernels.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from llmkernels.reference.selective_scan import selective_scan_ref, selective_state_update_ref
from tests.utils import TOLERANCES

pytest.importorskip("triton")

interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (no GPU here)"
)

SEQLENS = [1, 17, 33]
LAYOUTS = ["constant", "per_token", "grouped"]
# (has_D, has_z, has_bias, softplus): everything, nothing, and two mixes.
OPTIONS = [
    (True, True, True, True),
    (False, False, False, False),
    (True, False, True, False),
    (False, True, False, True),
]


def _ssm_inputs(batch, dim, dstate, seqlen, layout, dtype, device, options, initial=True):
    """Random scan inputs: A < 0 (decaying states), moderate delta, B/C in the requested layout."""
    has_D, has_z, has_bias, softplus = options
    kw = dict(device=device)
    u = torch.randn(batch, dim, seqlen, **kw).to(dtype)
    if softplus:  # raw values, softplus makes them positive
        delta = (torch.randn(batch, dim, seqlen, **kw) - 1.0).to(dtype)
    else:
        delta = (0.5 * torch.randn(batch, dim, seqlen, **kw) + 0.6).abs().to(dtype)
    A = -(torch.rand(dim, dstate, **kw) + 0.2)
    if layout == "constant":
        B, C = torch.randn(dim, dstate, **kw), torch.randn(dim, dstate, **kw)
    elif layout == "per_token":
        B, C = (torch.randn(batch, dstate, seqlen, **kw).to(dtype) for _ in range(2))
    else:
        ngroups = 2 if dim % 2 == 0 else 1
        B, C = (torch.randn(batch, ngroups, dstate, seqlen, **kw).to(dtype) for _ in range(2))
    D = torch.randn(dim, **kw) if has_D else None
    z = torch.randn(batch, dim, seqlen, **kw).to(dtype) if has_z else None
    bias = 0.3 * torch.randn(dim, **kw) if has_bias else None
    init = torch.randn(batch, dim, dstate, **kw) if initial else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, delta_softplus=softplus, initial_state=init)


def _update_inputs(batch, dim, dstate, grouped, dtype, state_dtype, device, options, sliced=True):
    has_D, has_z, has_bias, softplus = options
    kw = dict(device=device)
    if sliced:  # the state as a strided, unaligned slice of a larger cache
        state = torch.randn(batch + 1, dim, dstate + 3, **kw).to(state_dtype)[1:, :, 1 : dstate + 1]
    else:
        state = torch.randn(batch, dim, dstate, **kw).to(state_dtype)
    x = torch.randn(batch, dim, **kw).to(dtype)
    dt = (torch.randn(batch, dim, **kw) - (1.0 if softplus else -1.0)).abs().to(dtype)
    A = -(torch.rand(dim, dstate, **kw) + 0.2)
    shape = (batch, 2, dstate) if grouped else (batch, dstate)
    B, C = torch.randn(shape, **kw).to(dtype), torch.randn(shape, **kw).to(dtype)
    D = torch.randn(dim, **kw) if has_D else None
    z = torch.randn(batch, dim, **kw).to(dtype) if has_z else None
    bias = 0.3 * torch.randn(dim, **kw) if has_bias else None
    return dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=bias, dt_softplus=softplus)


def _assert_close(out, ref, dtype, name):
    rtol, atol = TOLERANCES[dtype]
    assert not torch.isnan(out).any(), f"{name}: NaN (unwritten or invalid elements)"
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_close_to_scale(grad, ref, dtype, name):
    """Gradients, some summed over batch and seqlen (dA, dD, constant dB/dC): the kernel and the reference see the
    same rounded inputs and both accumulate in fp32, so they differ by summation order and by the final rounding
    to the gradient's dtype; the tolerance is relative to the largest reference magnitude."""
    rtol, atol = TOLERANCES[dtype]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert not torch.isnan(grad).any(), f"{name}: NaN (unwritten or invalid elements)"
    torch.testing.assert_close(grad.float(), ref, rtol=rtol, atol=atol + rtol * scale, msg=lambda m: f"{name}: {m}")


def _check_scan_triton(args, dtype):
    from llmkernels.triton.selective_scan import selective_scan_triton

    out, last = selective_scan_triton(**args)
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    assert out.dtype == args["u"].dtype and last.dtype == torch.float32
    _assert_close(out, ref_out, dtype, "out")
    _assert_close(last, ref_last, dtype, "last_state")


def _check_update_triton(args, dtype):
    from llmkernels.triton.selective_scan import selective_state_update_triton

    ref_state = args["state"].clone()
    y = selective_state_update_triton(**args)
    y_ref = selective_state_update_ref(**{**args, "state": ref_state})
    assert y.dtype == args["x"].dtype
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(
        args["state"],
        ref_state,
        args["state"].dtype if args["state"].dtype != torch.float32 else dtype,
        "state (updated in place)",
    )


# ------------------------------------------------------------------------------------------------------------------
# Triton under the interpreter
# ------------------------------------------------------------------------------------------------------------------
@interp
@pytest.mark.triton_interp
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scan_triton_matches_reference(seqlen, layout, dtype):
    options = OPTIONS[seqlen % len(OPTIONS)]  # cycle the option mixes across seqlens; every mix meets every layout
    args = _ssm_inputs(2, 6, 5, seqlen, layout, dtype, "cpu", options, initial=seqlen != 17)
    _check_scan_triton(args, dtype)


@interp
@pytest.mark.triton_interp
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dim,dstate", [(1, 1), (4, 16), (16, 4), (13, 7)])
def test_scan_triton_options_and_sizes(options, dim, dstate):
    args = _ssm_inputs(2, dim, dstate, 9, "grouped", torch.float32, "cpu", options)
    _check_scan_triton(args, torch.float32)


@interp
@pytest.mark.triton_interp
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16)],
)
def test_state_update_triton_matches_reference(options, grouped, dtype, state_dtype):
    args = _update_inputs(2, 10, 16, grouped, dtype, state_dtype, "cpu", options)
    _check_update_triton(args, dtype)


@interp
@pytest.mark.triton_interp
@pytest.mark.parametrize("bwd", ["cpp", "reference"])
@pytest.mark.parametrize("layout", ["constant", "grouped"])
def test_scan_triton_backward(bwd, layout, monkeypatch):
    """The triton op's autograd: C++ selective_scan_bwd of the device when built, else autograd of the reference."""
    from llmkernels.triton import selective_scan as mod

    if bwd == "cpp" and not _ext.has_kernel("selective_scan_bwd", "CPU"):
        pytest.skip("the loaded build has no CPU selective_scan_bwd")
    if bwd == "reference":
        monkeypatch.setattr(mod._ext, "has_kernel", lambda op, key: False)
    args = _ssm_inputs(2, 4, 3, 11, layout, torch.float32, "cpu", OPTIONS[0])
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    mine = {k: args[k].clone().requires_grad_() for k in names}
    ref = {k: args[k].clone().requires_grad_() for k in names}
    out, last = mod.selective_scan_triton(**{**args, **mine})
    ref_out, ref_last = selective_scan_ref(**{**args, **ref}, return_last_state=True)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    torch.autograd.backward([out, last], [dout, dlast])
    torch.autograd.backward([ref_out, ref_last], [dout, dlast])
    for k in names:
        _assert_close_to_scale(mine[k].grad, ref[k].grad, torch.float32, f"d{k}")


@interp
@pytest.mark.triton_interp
def test_state_update_triton_steps_continue_the_scan():
    """Decoding token by token from the scan's last state reproduces the scan over the longer sequence."""
    from llmkernels.triton.selective_scan import selective_scan_triton, selective_state_update_triton

    args = _ssm_inputs(2, 8, 4, 12, "per_token", torch.float32, "cpu", OPTIONS[0], initial=False)
    full = selective_scan_ref(**args)
    prefix = {k: (v[..., :8] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    _, state = selective_scan_triton(**prefix)
    for t in range(8, 12):
        y = selective_state_update_triton(
            state,
            args["u"][..., t],
            args["delta"][..., t],
            args["A"],
            args["B"][..., t],
            args["C"][..., t],
            args["D"],
            args["z"][..., t],
            args["delta_bias"],
            True,
        )
        _assert_close(y, full[..., t], torch.float32, f"step {t}")


def _opcheck_triton_ops(device, test_utils):
    from llmkernels.triton import selective_scan  # noqa: F401  (registers the ops)

    ops = torch.ops.llmkernels
    args = _ssm_inputs(2, 4, 4, 5, "grouped", torch.float32, device, OPTIONS[0])
    torch.library.opcheck(ops.selective_scan_fwd_triton.default, tuple(args.values()), test_utils=test_utils)
    args = _ssm_inputs(2, 4, 4, 5, "constant", torch.float32, device, OPTIONS[1], initial=False)
    torch.library.opcheck(ops.selective_scan_fwd_triton.default, tuple(args.values()), test_utils=test_utils)
    uargs = _update_inputs(2, 4, 4, True, torch.float32, torch.float32, device, OPTIONS[0])
    torch.library.opcheck(ops.selective_state_update_triton.default, tuple(uargs.values()), test_utils=test_utils)


@interp
@pytest.mark.triton_interp
def test_opcheck_triton_ops():
    # The interpreter cannot launch on the functional tensors of the aot_dispatch test (it reads raw storages):
    # that check runs in test_opcheck_triton_ops_gpu.
    _opcheck_triton_ops("cpu", ("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.cuda
def test_opcheck_triton_ops_gpu():
    _opcheck_triton_ops(
        "cuda", ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    )


def _compile_fullgraph(device, backend):
    from llmkernels.triton.selective_scan import selective_scan_triton, selective_state_update_triton

    args = _ssm_inputs(1, 4, 4, 3, "per_token", torch.float32, device, OPTIONS[0])
    uargs = _update_inputs(1, 4, 4, False, torch.float32, torch.float32, device, OPTIONS[0])
    ref_state = uargs["state"].clone()

    @torch.compile(fullgraph=True, backend=backend)
    def step(args, uargs):
        return selective_scan_triton(**args), selective_state_update_triton(**uargs)

    (out, last), y = step(args, uargs)
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    _assert_close(out, ref_out, torch.float32, "compiled scan out")
    _assert_close(y, selective_state_update_ref(**{**uargs, "state": ref_state}), torch.float32, "compiled update y")
    _assert_close(uargs["state"], ref_state, torch.float32, "compiled update state")


@interp
@pytest.mark.triton_interp
def test_triton_ops_compile_fullgraph():
    """Dynamo traces both ops without graph breaks. The "eager" backend: the interpreter cannot run on the
    functional tensors of aot_eager / inductor (test_triton_ops_compile_fullgraph_gpu covers those)."""
    _compile_fullgraph("cpu", "eager")


@pytest.mark.cuda
def test_triton_ops_compile_fullgraph_gpu():
    _compile_fullgraph("cuda", "inductor")


@interp
@pytest.mark.triton_interp
def test_triton_bad_arguments_name_the_argument():
    from llmkernels.triton.selective_scan import selective_scan_triton, selective_state_update_triton

    args = _ssm_inputs(2, 4, 4, 5, "per_token", torch.float32, "cpu", OPTIONS[1])
    with pytest.raises(ValueError, match="B"):
        selective_scan_triton(**{**args, "B": args["B"][..., :4]})
    with pytest.raises(ValueError, match="delta"):
        selective_scan_triton(**{**args, "delta": args["delta"][:1]})
    with pytest.raises(TypeError, match="u"):
        selective_scan_triton(**{**args, "u": args["u"].to(torch.int32)})
    with pytest.raises(ValueError, match="B"):  # 3 groups do not divide dim 4
        selective_scan_triton(**{**args, "B": torch.randn(2, 3, 4, 5)})
    uargs = _update_inputs(2, 4, 4, False, torch.float32, torch.float32, "cpu", OPTIONS[1])
    with pytest.raises(ValueError, match="state"):
        selective_state_update_triton(**{**uargs, "state": uargs["state"][:, :, :3]})
    with pytest.raises(ValueError, match="C"):
        selective_state_update_triton(**{**uargs, "C": uargs["C"][:, :3]})


# ------------------------------------------------------------------------------------------------------------------
# GPU: Triton on CUDA tensors, and the CUDA kernels (csrc/scan/cuda) called through their ops
# ------------------------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("seqlen", [1, 17, 1000])
def test_scan_triton_gpu(layout, dtype, seqlen):
    args = _ssm_inputs(2, 24, 16, seqlen, layout, dtype, "cuda", OPTIONS[seqlen % len(OPTIONS)])
    _check_scan_triton(args, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dstate", [1, 16, 64, 256])
@pytest.mark.parametrize("grouped", [False, True])
def test_state_update_triton_gpu(dtype, dstate, grouped):
    args = _update_inputs(3, 40, dstate, grouped, dtype, torch.float32, "cuda", OPTIONS[0])
    _check_update_triton(args, dtype)


def _scan_op_args(args):
    return (
        args["u"],
        args["delta"],
        args["A"],
        args["B"],
        args["C"],
        args["D"],
        args["z"],
        args["delta_bias"],
        args["delta_softplus"],
        args["initial_state"],
    )


# (seqlen, dstate): a chunk of the CUDA kernel is 1024 timesteps. 2500 and 2056 are three chunks, the last one
# ragged; rows of 2056 fp16/bf16 (or 2500 fp32) elements are whole 16-byte vectors, so they take the vector loads.
CUDA_SCAN_SIZES = [(1, 16), (17, 1), (17, 33), (1024, 16), (2500, 16), (2056, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("seqlen,dstate", CUDA_SCAN_SIZES)
def test_scan_cuda_fwd_bwd(layout, dtype, seqlen, dstate):
    args = _ssm_inputs(2, 6, dstate, seqlen, layout, dtype, "cuda", OPTIONS[(seqlen + dstate) % len(OPTIONS)])
    out, last = torch.ops.llmkernels.selective_scan_fwd(*_scan_op_args(args))
    ref_out, ref_last = selective_scan_ref(**args, return_last_state=True)
    _assert_close(out, ref_out, dtype, "out")
    _assert_close(last, ref_last, dtype, "last_state")

    # Backward against autograd through the fp32 reference on the same (rounded) inputs.
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last)
    grads = torch.ops.llmkernels.selective_scan_bwd(dout, dlast, *_scan_op_args(args))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    leaves = {k: args[k].detach().float().requires_grad_() for k in names if args[k] is not None}
    ref_args = {**args, **leaves}
    o, s = selective_scan_ref(**ref_args, return_last_state=True)
    torch.autograd.backward([o, s], [dout.float(), dlast])
    for name, grad in zip(names, grads):
        if args[name] is None:
            assert grad.numel() == 0, f"d{name} of an absent input must be empty"
            continue
        assert grad.shape == args[name].shape and grad.dtype == args[name].dtype, f"d{name} shape/dtype"
        _assert_close_to_scale(grad, leaves[name].grad, dtype, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("state_dtype", GPU_DTYPES)
@pytest.mark.parametrize("dstate", [1, 16, 48, 256])
@pytest.mark.parametrize("sliced", [False, True])  # contiguous: the vector path; sliced: entry by entry
def test_state_update_cuda(dtype, state_dtype, dstate, sliced):
    args = _update_inputs(3, 40, dstate, dstate % 2 == 0, dtype, state_dtype, "cuda", OPTIONS[dstate % 4], sliced)
    ref_state = args["state"].clone()
    y = torch.ops.llmkernels.selective_state_update(*args.values())
    y_ref = selective_state_update_ref(**{**args, "state": ref_state})
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(args["state"], ref_state, state_dtype if state_dtype != torch.float32 else dtype, "state")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 17, 300])
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_cuda(dtype, width, seqlen, silu):
    x = torch.randn(2, 12, seqlen, device="cuda").to(dtype)
    weight, bias = torch.randn(12, width, device="cuda"), torch.randn(12, device="cuda")
    act = "silu" if silu else None
    out = torch.ops.llmkernels.causal_conv1d_fwd(x, weight, bias, silu)
    _assert_close(out, causal_conv1d_ref(x, weight, bias, act), dtype, "out")

    dout = torch.randn_like(out)
    dx, dw, db = torch.ops.llmkernels.causal_conv1d_bwd(dout, x, weight, bias, silu)
    xl, wl, bl = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    causal_conv1d_ref(xl, wl, bl, act).backward(dout.float())
    _assert_close_to_scale(dx, xl.grad, dtype, "dx")
    _assert_close_to_scale(dw, wl.grad, dtype, "dweight")
    _assert_close_to_scale(db, bl.grad, dtype, "dbias")

    conv_state = torch.randn(2, 12, width, device="cuda").to(dtype)
    ref_state = conv_state.clone()
    xs = torch.randn(2, 12, device="cuda").to(dtype)
    y = torch.ops.llmkernels.causal_conv1d_update(xs, conv_state, weight, bias, silu)
    _assert_close(y, causal_conv1d_update_ref(xs, ref_state, weight, bias, act), dtype, "update y")
    assert torch.equal(conv_state, ref_state), "conv_state after the update"


@pytest.mark.cuda
def test_cuda_kernels_registered():
    """The CUDA build registers a CUDA kernel for every op of the scan family."""
    for op in (
        "selective_scan_fwd",
        "selective_scan_bwd",
        "selective_state_update",
        "causal_conv1d_fwd",
        "causal_conv1d_bwd",
        "causal_conv1d_update",
    ):
        assert _ext.has_kernel(op, "CUDA"), f"no CUDA kernel for llmkernels::{op}"


@interp
@pytest.mark.triton_interp
def test_interpreter_under_aot_tracing_refuses_instead_of_returning_garbage():
    """AOTDispatcher inlines a mutating triton_op's body: under the interpreter its launch would be missing from the
    compiled graph (the output whatever torch.empty held, the state not stepped). A clear error instead."""
    from llmkernels.triton.selective_scan import selective_state_update_triton

    uargs = _update_inputs(2, 4, 4, False, torch.float32, torch.float32, "cpu", OPTIONS[0])
    compiled = torch.compile(selective_state_update_triton, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="cannot run under TRITON_INTERPRET=1 inside torch.compile"):
        compiled(**uargs)
