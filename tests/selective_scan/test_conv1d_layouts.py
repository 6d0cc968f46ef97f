"""causal_conv1d_fn on time-major x: (batch, seqlen, dim) memory seen as (batch, dim, seqlen), what Mamba layers,
mamba_ssm and transformers hand the convolution after in_proj. The CPU ops read and write that layout in place
(outputs and dx keep it); every other layout goes through the row-major kernels. Checked against the fp64
reference for both layouts, with packed sequences and initial states, dout in either layout, on every CPU
instruction set, through opcheck and torch.compile."""

import pytest
import torch
from utils import assert_close_dtype, nan_filled_empty, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.ops.causal_conv1d import time_major
from llmkernels.reference.causal_conv1d import causal_conv1d_ref

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("causal_conv1d_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::causal_conv1d_fwd (extension: {_ext.load_error or 'built without it'})",
)
LAYOUTS = ["row", "time_major", "time_major_slice"]


def make_x(layout, batch, dim, seqlen, dtype):
    if layout == "row":
        return torch.randn(batch, dim, seqlen).to(dtype)
    if layout == "time_major":
        return torch.randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
    wide = torch.randn(batch, seqlen, dim + 9).to(dtype)  # x as a slice of in_proj's wider rows
    return wide[..., 5 : 5 + dim].transpose(1, 2)


def check_case(layout, batch, dim, seqlen, width, dtype, activation, mode, dout_layout="same"):
    x = make_x(layout, batch, dim, seqlen, dtype).requires_grad_()
    w = (torch.randn(dim, width) / width**0.5).to(dtype).requires_grad_()
    bias = torch.randn(dim).to(dtype).requires_grad_()
    seq_idx = init = None
    if mode == "seq_idx":  # 1-3 sequences per row, some a single token
        seq_idx = torch.sort(torch.randint(0, 3, (batch, seqlen)), dim=1).values.to(torch.int32)
    elif mode == "initial_states":
        init = torch.randn(batch, dim, width - 1).to(dtype).requires_grad_()
    leaves = [x, w, bias] + ([init] if init is not None else [])
    with nan_filled_empty(), llmkernels.use_backend("cpu"):
        out = llmkernels.causal_conv1d_fn(x, w, bias, seq_idx=seq_idx, initial_states=init, activation=activation)
        if dout_layout == "same":
            dout = torch.randn_like(out)
        elif dout_layout == "row":
            dout = torch.randn(batch, dim, seqlen).to(dtype)
        else:
            dout = torch.randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
        grads = torch.autograd.grad(out, leaves, dout)
    expect_time_major = layout != "row" and dim > 1 and seqlen > 1
    assert time_major(out) == expect_time_major, out.stride()
    assert time_major(grads[0]) == expect_time_major, grads[0].stride()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = causal_conv1d_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2], activation, seq_idx,
                            ref_leaves[3] if init is not None else None)  # fmt: skip
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert out.dtype == dtype
    assert_close_dtype(out, ref)
    for name, g, rg in zip(("x", "weight", "bias", "initial_states"), grads, ref_grads):
        # dweight / dbias sum batch x seqlen products: scale the absolute tolerance by their size
        scale = max(1.0, rg.abs().max().item()) if name in ("weight", "bias") else 1.0
        assert g.dtype == dtype, name
        assert_close_dtype(g, rg, dtype, scale=scale)


@needs_ext
@pytest.mark.parametrize("mode", ["plain", "seq_idx", "initial_states"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 3, 1), (2, 37, 17), (1, 130, 70), (2, 16, 2)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv1d_layouts_against_reference(layout, shape, width, dtype, activation, mode):
    check_case(layout, *shape, width, dtype, activation, mode)


@needs_ext
@pytest.mark.parametrize("dout_layout", ["row", "time_major"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv1d_backward_takes_either_dout_layout(layout, dout_layout):
    for dtype in (torch.float32, torch.bfloat16):
        check_case(layout, 2, 37, 23, 4, dtype, "silu", "plain", dout_layout)


@needs_ext
def test_conv1d_time_major_long_rows():
    """More channels than a work item (64) and a sequence longer than any vector, in place in the wide rows."""
    check_case("time_major_slice", 1, 200, 1100, 4, torch.bfloat16, "silu", "plain")
    check_case("time_major_slice", 2, 150, 300, 3, torch.float32, None, "seq_idx")


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_conv1d_layouts_other_cpu_instruction_sets(isa):
    """Both layouts' forward and backward kernels as built for AVX2 and portable code, in a child process."""
    code = (
        "import torch, test_conv1d_layouts as t\n"
        "for layout in t.LAYOUTS:\n"
        "    for width, mode in ((2, 'plain'), (3, 'seq_idx'), (4, 'initial_states')):\n"
        "        for dtype in (torch.float32, torch.bfloat16):\n"
        "            t.check_case(layout, 2, 37, 19, width, dtype, 'silu' if width != 3 else None, mode)\n"
    )
    run_with_cpu_isa(isa, code, "selective_scan")


@needs_ext
@pytest.mark.parametrize("mode", ["plain", "seq_idx", "initial_states"])
def test_opcheck_conv1d_time_major(mode):
    """The fake kernels give the layouts the CPU ops give (time-major in, time-major out)."""
    x = torch.randn(2, 9, 12).transpose(1, 2)  # (2, 12, 9) time-major
    w, bias = torch.randn(12, 4), torch.randn(12)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [2] * 9], dtype=torch.int32) if mode == "seq_idx" else None
    init = torch.randn(2, 12, 3) if mode == "initial_states" else None
    ops = torch.ops.llmkernels
    torch.library.opcheck(ops.causal_conv1d_fwd.default, [x.requires_grad_(), w.requires_grad_(), bias, True,
                                                          seq_idx, init])  # fmt: skip
    dout = torch.randn(2, 9, 12).transpose(1, 2)
    torch.library.opcheck(ops.causal_conv1d_bwd.default, [dout, x.detach(), w.detach(), bias, True, seq_idx, init])
    torch.library.opcheck(ops.causal_conv1d_bwd.default, [dout.contiguous(), x.detach(), w.detach(), None, False,
                                                          seq_idx, init])  # fmt: skip


@needs_ext
def test_torch_compile_conv1d_time_major():
    wide = torch.randn(2, 13, 40)
    w, bias = torch.randn(24, 4), torch.randn(24)

    def f(wide):
        out = llmkernels.causal_conv1d_fn(wide[..., 8:32].transpose(1, 2), w, bias, activation="silu")
        return out.transpose(1, 2) * 2

    leaf = wide.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(leaf)
    out.sum().backward()
    ref_leaf = wide.clone().requires_grad_()
    ref = causal_conv1d_ref(ref_leaf[..., 8:32].transpose(1, 2), w, bias, "silu").transpose(1, 2) * 2
    ref.sum().backward()
    assert_close_dtype(out, ref)
    assert_close_dtype(leaf.grad, ref_leaf.grad)
