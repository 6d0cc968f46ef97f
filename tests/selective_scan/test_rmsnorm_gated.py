"""rmsnorm_fn (Mamba-2's gated RMSNorm, mamba_ssm's signature): the C++ CPU kernels against the fp64 reference,
forward and every gradient, gate before / after the norm, groups, bias, strided rows; other instruction sets,
opcheck, torch.compile, bad arguments; the reference against a formula written out; the modules."""

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_dtype, nan_filled_empty, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.nn import RMSNormGated
from llmkernels.nn.mamba2 import GatedRMSNorm
from llmkernels.reference.rmsnorm_gated import rmsnorm_gated_ref

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("rmsnorm_gated_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::rmsnorm_gated_fwd (extension: {_ext.load_error or 'built without it'})",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_rows(lead, hidden, dtype, strided, device="cpu"):
    if not strided:
        return torch.randn(*lead, hidden, device=device).to(dtype)
    wide = torch.randn(*lead, hidden + 11, device=device).to(dtype)  # a slice of wider rows, as in_proj's gate
    return wide[..., 4 : 4 + hidden]


def check_case(lead, hidden, group_size, dtype, gated, with_bias, norm_before_gate, strided=False, backend="cpu",
               device="cpu"):  # fmt: skip
    x = make_rows(lead, hidden, dtype, strided, device).requires_grad_()
    z = make_rows(lead, hidden, dtype, strided, device).requires_grad_() if gated else None
    w = (1 + 0.3 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(hidden, device=device)).to(dtype).requires_grad_() if with_bias else None
    leaves = [t for t in (x, w, b, z) if t is not None]
    with nan_filled_empty(), llmkernels.use_backend(backend):
        out = llmkernels.rmsnorm_fn(x, w, b, z, 1e-5, group_size, norm_before_gate)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx, rw = next(it), next(it)
    rb = next(it) if with_bias else None
    rz = next(it) if gated else None
    ref = rmsnorm_gated_ref(rx, rw, rb, rz, 1e-5, group_size, norm_before_gate)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_dtype(out, ref)
    names = ["x", "weight"] + (["bias"] if with_bias else []) + (["z"] if gated else [])
    for name, g, rg in zip(names, grads, ref_grads):
        # dweight / dbias sum over the rows: scale the absolute tolerance by their size
        scale = max(1.0, rg.abs().max().item()) if name in ("weight", "bias") else 1.0
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert_close_dtype(g, rg, dtype, scale=scale)


@needs_ext
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lead, hidden, group_size",
    [((1,), 16, None), ((17,), 64, 16), ((2, 9), 40, 8), ((3,), 37, 37), ((1, 5), 130, 65), ((4,), 96, 32)],
    ids=str,
)
def test_rmsnorm_cpu_against_reference(lead, hidden, group_size, dtype, gated, with_bias, norm_before_gate):
    check_case(lead, hidden, group_size, dtype, gated, with_bias, norm_before_gate)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_cpu_strided_rows(dtype):
    """x and z as slices of wider rows (in place) and many rows (several chunks of the dweight sums)."""
    for norm_before_gate in (True, False):
        check_case((3, 700), 64, 16, dtype, True, True, norm_before_gate, strided=True)


# (lead, hidden, group_size, gated, with_bias, norm_before_gate)
TRITON_CASES = [
    ((3,), 16, None, True, False, True),
    ((2, 5), 40, 8, True, True, False),
    ((7,), 37, 37, False, True, True),
    ((33,), 24, 12, True, True, True),
]


@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_rmsnorm_triton_interpreter(case, dtype):
    """The Triton kernels on CPU tensors (interpreter); 33 rows: more than one backward program's rows."""
    pytest.importorskip("triton")
    lead, hidden, group_size, gated, with_bias, nbg = case
    check_case(lead, hidden, group_size, dtype, gated, with_bias, nbg, strided=gated, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES + [((2, 1000), 4096, 2048, True, False, False)], ids=str)
def test_rmsnorm_cuda(case, dtype, backend):
    """On a GPU: the Triton kernels, and whatever auto-dispatch picks there."""
    lead, hidden, group_size, gated, with_bias, nbg = case
    check_case(lead, hidden, group_size, dtype, gated, with_bias, nbg, strided=gated, backend=backend, device="cuda")


@pytest.mark.triton_interp
def test_rmsnorm_triton_eps_zero_partial_block():
    """eps = 0 and 5 rows (a backward program's block of 16 only partly filled): the missing rows add nothing."""
    pytest.importorskip("triton")
    x, z, w = torch.randn(5, 32, requires_grad=True), torch.randn(5, 32, requires_grad=True), torch.randn(32)
    w.requires_grad_()
    with llmkernels.use_backend("triton"):
        grads = torch.autograd.grad(llmkernels.rmsnorm_fn(x, w, None, z, 0.0, 16, False).sum(), [x, w, z])
    ref = rmsnorm_gated_ref(x.double(), w.double(), None, z.double(), 0.0, 16, False)
    ref_grads = torch.autograd.grad(ref.sum(), [x, w, z])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-4)


@needs_ext
def test_rmsnorm_cpu_full_precision_gate_with_bf16_x():
    """An fp32 z beside a bf16 x is read in fp32 (not rounded to x's dtype first): dz at fp32 precision."""
    x = torch.randn(16, 64).bfloat16().requires_grad_()
    z = torch.randn(16, 64, requires_grad=True)
    w = torch.randn(64)
    dout = torch.randn(16, 64).bfloat16()
    with llmkernels.use_backend("cpu"):
        out = llmkernels.rmsnorm_fn(x, w, None, z, 1e-5, 16, False)
        (dz,) = torch.autograd.grad(out, [z], dout)
    zr = z.detach().double().requires_grad_()
    ref = rmsnorm_gated_ref(x.detach().double(), w.double(), None, zr, 1e-5, 16, False)
    (ref_dz,) = torch.autograd.grad(ref, [zr], dout.double())
    assert dz.dtype == torch.float32
    torch.testing.assert_close(dz.double(), ref_dz, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), ref.bfloat16().double(), rtol=0.0, atol=0.0, msg="bf16 rounding")


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_rmsnorm_other_cpu_instruction_sets(isa):
    code = (
        "import torch, test_rmsnorm_gated as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for nbg in (True, False):\n"
        "        t.check_case((2, 7), 40, 8, dtype, True, True, nbg)\n"
        "        t.check_case((5,), 37, None, dtype, True, False, nbg, strided=True)\n"
        "    t.check_case((3,), 24, 12, dtype, False, True, True)\n"
    )
    run_with_cpu_isa(isa, code, "selective_scan")


def test_reference_against_written_formula():
    x, z, w, b = torch.randn(3, 8).double(), torch.randn(3, 8).double(), torch.randn(8).double(), torch.randn(8)
    b = b.double()

    def rms(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

    torch.testing.assert_close(rmsnorm_gated_ref(x, w, b, z, 1e-6, None, True), (rms(x) * w + b) * F.silu(z))
    torch.testing.assert_close(rmsnorm_gated_ref(x, w, None, z, 1e-6, 8, False), rms(x * F.silu(z)) * w)
    halves = torch.cat([rms(x[:, :4]), rms(x[:, 4:])], dim=-1) * w
    torch.testing.assert_close(rmsnorm_gated_ref(x, w, None, None, 1e-6, 4, True), halves)


@needs_ext
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck_rmsnorm(gated):
    x, w, b = torch.randn(5, 24), torch.randn(24), torch.randn(24)
    z = torch.randn(5, 24) if gated else None
    ops = torch.ops.llmkernels
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    torch.library.opcheck(ops.rmsnorm_gated_fwd.default, [*leaves, z, 1e-5, 8, False])
    torch.library.opcheck(ops.rmsnorm_gated_bwd.default, [torch.randn(5, 24), x.detach(), w.detach(), None, z, 1e-5,
                                                          12, True])  # fmt: skip


@needs_ext
def test_torch_compile_rmsnorm_fullgraph():
    x, z, w = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32), torch.randn(32)
    fn = torch.compile(llmkernels.rmsnorm_fn, fullgraph=True, backend="aot_eager")
    out = fn(x, w, None, z, 1e-5, 16, False)
    out.sum().backward()
    assert_close_dtype(out, rmsnorm_gated_ref(x.detach(), w, None, z, 1e-5, 16, False))
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.randn(7)), "rmsnorm_fn: weight must have shape"),
        (dict(bias=torch.randn(3)), "rmsnorm_fn: bias must have shape"),
        (dict(z=torch.randn(2, 7)), "rmsnorm_fn: z must have shape"),
        (dict(group_size=5), "rmsnorm_fn: group_size must be a positive int dividing"),
        (dict(group_size=0), "rmsnorm_fn: group_size must be"),
        (dict(eps=float("nan")), "rmsnorm_fn: eps must be"),
        (dict(x=torch.randn(2, 8).double()), "rmsnorm_fn: x must have dtype in"),
        (dict(weight=torch.randn(8, device="meta")), "rmsnorm_fn: weight must be on"),
    ],
)
def test_bad_rmsnorm_arguments_are_named(kwargs, match):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(8), bias=None, z=None, eps=1e-6, group_size=None)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        llmkernels.rmsnorm_fn(**args)


@needs_ext
def test_bad_raw_op_arguments_are_named():
    ops = torch.ops.llmkernels
    with pytest.raises(RuntimeError, match="rmsnorm_gated_fwd: group_size must be positive and divide 8"):
        ops.rmsnorm_gated_fwd(torch.randn(2, 8), torch.randn(8), None, None, 1e-6, 3, True)
    with pytest.raises(RuntimeError, match=r"rmsnorm_gated_fwd: z must have shape \[2, 8\]"):
        ops.rmsnorm_gated_fwd(torch.randn(2, 8), torch.randn(8), None, torch.randn(2, 7), 1e-6, 8, True)
    with pytest.raises(RuntimeError, match=r"rmsnorm_gated_fwd: bias must have shape \[8\]"):
        ops.rmsnorm_gated_fwd(torch.randn(2, 8), torch.randn(8), torch.randn(7), None, 1e-6, 8, True)
    with pytest.raises(RuntimeError, match="rmsnorm_gated_bwd: dout must have shape"):
        ops.rmsnorm_gated_bwd(torch.randn(2, 4), torch.randn(2, 8), torch.randn(8), None, None, 1e-6, 8, True)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_modules(backend):
    x, z = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    norm = RMSNormGated(48, eps=1e-5, group_size=16, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.normal_()
    hf_style = GatedRMSNorm(48, 16, eps=1e-5)
    hf_style.load_state_dict(norm.state_dict())
    with llmkernels.use_backend(backend):
        got, got_hf = norm(x, z), hf_style(x, z)
    expect = rmsnorm_gated_ref(x.double(), norm.weight.detach().double(), None, z.double(), 1e-5, 16, False)
    assert_close_dtype(got, expect)
    torch.testing.assert_close(got_hf, got)
    assert norm.bias is None and set(norm.state_dict()) == {"weight"}
