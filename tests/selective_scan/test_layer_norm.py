"""layer_norm_fn / rms_norm_fn (the residual add + LayerNorm / RMSNorm of mamba_ssm's blocks): every backend against
the fp64 reference, forward and every gradient (x, residual, weight, bias, through y and the prenorm residual),
mixed dtypes of x and the residual stream, strided rows, a mean far larger than the spread; other instruction
sets, the Triton kernels under the interpreter, opcheck, torch.compile, bad arguments; the reference against
torch's own norms; the modules."""

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_dtype, nan_filled_empty, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.nn import LayerNorm, RMSNorm
from llmkernels.reference.layer_norm import layer_norm_ref

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("add_norm_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::add_norm_fwd (extension: {_ext.load_error or 'built without it'})",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_rows(lead, hidden, dtype, strided, device="cpu", shift=0.0):
    if not strided:
        return (torch.randn(*lead, hidden, device=device) + shift).to(dtype)
    wide = (torch.randn(*lead, hidden + 11, device=device) + shift).to(dtype)  # a slice of wider rows
    return wide[..., 3 : 3 + hidden]


def check_case(lead, hidden, dtype, residual_dtype, rms, with_bias, prenorm, residual_in_fp32=False, strided=False,
               backend="cpu", device="cpu", shift=0.0, use_y=True):  # fmt: skip
    """One call against the fp64 reference; residual_dtype None: no residual. use_y False: only the prenorm residual
    is used downstream (its gradient alone reaches x)."""
    x = make_rows(lead, hidden, dtype, strided, device, shift).requires_grad_()
    r = make_rows(lead, hidden, residual_dtype, strided, device).requires_grad_() if residual_dtype else None
    w = (1 + 0.3 * torch.randn(hidden, device=device)).requires_grad_()
    b = (0.2 * torch.randn(hidden, device=device)).requires_grad_() if with_bias else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    with nan_filled_empty(), llmkernels.use_backend(backend):
        out = llmkernels.layer_norm_fn(x, w, b, residual=r, eps=1e-5, prenorm=prenorm,
                                       residual_in_fp32=residual_in_fp32, is_rms_norm=rms)  # fmt: skip
        outs = list(out) if prenorm else [out]
        douts = [torch.randn_like(o) for o in outs]
        if not use_y:
            outs, douts = outs[1:], douts[1:]
        grads = torch.autograd.grad(outs, leaves, douts, allow_unused=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rr = next(it) if r is not None else None
    rw = next(it)
    rb = next(it) if with_bias else None
    ref = layer_norm_ref(rx, rw, rb, rr, 1e-5, prenorm, residual_in_fp32, rms)
    ref_outs = list(ref) if prenorm else [ref]
    if not use_y:
        ref_outs = ref_outs[1:]
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, [d.double() for d in douts], allow_unused=True)
    if prenorm and use_y:
        expected_res_dtype = residual_dtype or (torch.float32 if residual_in_fp32 else dtype)
        assert outs[1].dtype == expected_res_dtype and outs[1].shape == x.shape
        # the residual stream is the sum rounded once to its dtype: exact against the rounded fp64 sum
        torch.testing.assert_close(outs[1].double(), ref_outs[1].to(expected_res_dtype).double(), rtol=0, atol=0)
    assert outs[0].shape == x.shape
    if use_y:
        assert outs[0].dtype == dtype
        assert_close_dtype(outs[0], ref_outs[0])
    names = ["x"] + (["residual"] if r is not None else []) + ["weight"] + (["bias"] if with_bias else [])
    for name, g, rg, leaf in zip(names, grads, ref_grads, leaves):
        if rg is None:
            assert g is None or not g.any(), name
            continue
        # dweight / dbias sum over the rows: scale the absolute tolerance by their size
        scale = max(1.0, rg.abs().max().item()) if name in ("weight", "bias") else 1.0
        assert g.dtype == leaf.dtype and g.shape == rg.shape, name
        # a 16-bit gradient of x is the fp32 one rounded, judged in its own dtype; an fp32 one beside 16-bit
        # inputs carries their rounding too: the dtype of the row's least precise operand
        worst = dtype if dtype != torch.float32 else (residual_dtype or dtype)
        assert_close_dtype(g, rg, worst if g.dtype == torch.float32 else g.dtype, scale=scale)


CPU_GRID = [((1,), 16), ((17,), 64), ((2, 9), 40), ((3,), 37), ((1, 5), 130), ((2,), 1), ((4,), 2048)]


@needs_ext
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("residual_dtype", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, hidden", CPU_GRID, ids=str)
def test_add_norm_cpu_against_reference(lead, hidden, dtype, residual_dtype, rms, with_bias, prenorm):
    residual_dtype = dtype if residual_dtype == "same" else residual_dtype
    check_case(lead, hidden, dtype, residual_dtype, rms, with_bias, prenorm)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_add_norm_cpu_residual_in_fp32_strided_many_rows(dtype, rms):
    """residual_in_fp32 without a residual (the first block of a Mamba model), rows as slices of wider rows (read in
    place) and 1400 rows (several chunks of the dweight sums); then only the residual stream used downstream."""
    check_case((2, 700), 48, dtype, None, rms, True, True, residual_in_fp32=True, strided=True)
    check_case((3, 5), 40, dtype, torch.float32, rms, False, True, use_y=False)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_cpu_mean_far_from_zero(dtype):
    """LayerNorm of rows whose mean (300) dwarfs their spread (1): the variance is a pass over the centred sum, not
    E[s^2] - mean^2, which loses most digits in fp32 (an error of ~3e-2 in y). The reference reads the same rounded
    inputs, so only the fp32 sum s = x + residual rounds differently: ~300 * 6e-8 = 2e-5 of a unit spread."""
    check_case((9,), 96, dtype, torch.float32, False, True, True, shift=300.0)
    x = torch.randn(9, 96) + 300
    r, w = torch.randn(9, 96), torch.randn(96)
    with llmkernels.use_backend("cpu"):
        y = llmkernels.layer_norm_fn(x, w, None, residual=r)
    torch.testing.assert_close(y.double(), layer_norm_ref(x.double(), w.double(), None, r.double()), rtol=0,
                               atol=1e-4)  # fmt: skip


@needs_ext
def test_prenorm_without_residual_returns_x_itself():
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(16)
    with llmkernels.use_backend("cpu"):
        y, res = llmkernels.rms_norm_fn(x, w, None, prenorm=True)
    assert res is x
    torch.testing.assert_close(y, layer_norm_ref(x.detach(), w, None, None, 1e-6, is_rms_norm=True))


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_add_norm_other_cpu_instruction_sets(isa):
    code = (
        "import torch, test_layer_norm as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for rms in (True, False):\n"
        "        t.check_case((2, 7), 40, dtype, torch.float32, rms, True, True)\n"
        "        t.check_case((5,), 37, dtype, dtype, rms, False, True, strided=True)\n"
        "        t.check_case((3,), 9, dtype, None, rms, True, False)\n"
    )
    run_with_cpu_isa(isa, code, "selective_scan")


# (lead, hidden, dtype, residual_dtype, rms, with_bias, prenorm, residual_in_fp32, strided)
TRITON_CASES = [
    ((3,), 16, torch.float32, None, True, False, True, False, False),
    ((2, 5), 40, torch.bfloat16, torch.float32, True, False, True, False, True),
    ((7,), 37, torch.float32, torch.float32, False, True, True, False, False),
    ((33,), 24, torch.bfloat16, None, False, True, True, True, False),
    ((4,), 20, torch.float16, torch.float16, True, True, False, False, True),
]


@pytest.mark.triton_interp
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_add_norm_triton_interpreter(case):
    """The Triton kernels on CPU tensors (interpreter); 33 rows: more than one backward program's rows."""
    pytest.importorskip("triton")
    lead, hidden, dtype, rdt, rms, with_bias, prenorm, rif, strided = case
    check_case(lead, hidden, dtype, rdt, rms, with_bias, prenorm, rif, strided, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("case", TRITON_CASES + [((2, 1000), 4096, torch.bfloat16, torch.float32, True, False, True,
                                                   False, False)], ids=str)  # fmt: skip
def test_add_norm_cuda(case, backend):
    """On a GPU: the Triton kernels, and whatever auto-dispatch picks there."""
    lead, hidden, dtype, rdt, rms, with_bias, prenorm, rif, strided = case
    check_case(lead, hidden, dtype, rdt, rms, with_bias, prenorm, rif, strided, backend=backend, device="cuda")


def test_reference_against_torch_norms():
    x, r = torch.randn(3, 8).double(), torch.randn(3, 8).double()
    w, b = torch.randn(8).double(), torch.randn(8).double()
    torch.testing.assert_close(layer_norm_ref(x, w, b, r, 1e-5), F.layer_norm(x + r, (8,), w, b, 1e-5))
    torch.testing.assert_close(layer_norm_ref(x, w, None, r, 1e-5, is_rms_norm=True),
                               F.rms_norm(x + r, (8,), w, 1e-5))  # fmt: skip
    y, res = layer_norm_ref(x.float(), w.float(), None, None, 1e-5, prenorm=True, residual_in_fp32=True)
    assert res.dtype == torch.float32 and torch.equal(res, x.float())


@needs_ext
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rms", [True, False])
def test_opcheck_add_norm(with_residual, rms):
    x, w, b = torch.randn(5, 24), torch.randn(24), torch.randn(24)
    r = torch.randn(5, 24).requires_grad_() if with_residual else None
    ops = torch.ops.llmkernels
    leaves = [x.requires_grad_(), r, w.requires_grad_(), b.requires_grad_()]
    torch.library.opcheck(ops.add_norm_fwd.default, [*leaves, 1e-5, rms, torch.float32 if with_residual else None])
    torch.library.opcheck(ops.add_norm_bwd.default, [torch.randn(5, 24), torch.randn(5, 24) if with_residual else None,
                                                     x.detach(), None if r is None else r.detach(), w.detach(), None,
                                                     1e-5, rms])  # fmt: skip


@needs_ext
def test_torch_compile_add_norm_fullgraph():
    x, r, w = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32), torch.randn(32)

    def block(x, r):
        y, res = llmkernels.rms_norm_fn(x, w, None, residual=r, prenorm=True, residual_in_fp32=True)
        return y * 2 + res

    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r)
    out.sum().backward()
    y, res = layer_norm_ref(x.detach(), w, None, r, 1e-6, True, True, True)
    assert_close_dtype(out, y * 2 + res)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs, match, error",
    [
        (dict(weight=torch.randn(7)), "layer_norm_fn: weight must have shape", ValueError),
        (dict(bias=torch.randn(3)), "layer_norm_fn: bias must have shape", ValueError),
        (dict(residual=torch.randn(2, 7)), "layer_norm_fn: residual must have shape", ValueError),
        (dict(residual=torch.randn(2, 8).double()), "layer_norm_fn: residual must have dtype in", TypeError),
        (dict(eps=float("nan")), "layer_norm_fn: eps must be", ValueError),
        (dict(eps=-1.0), "layer_norm_fn: eps must be", ValueError),
        (dict(x=torch.randn(2, 8).double()), "layer_norm_fn: x must have dtype in", TypeError),
        (dict(x=torch.tensor(1.0)), "layer_norm_fn: x must have at least 1 dimension", ValueError),
        (dict(weight=torch.randn(8, device="meta")), "layer_norm_fn: weight must be on", ValueError),
        (dict(dropout_p=0.1), "layer_norm_fn: dropout_p=0.1 is not supported", NotImplementedError),
        (dict(x1=torch.randn(2, 8)), "layer_norm_fn: x1 is not supported", NotImplementedError),
        (dict(rowscale=torch.randn(2)), "layer_norm_fn: rowscale is not supported", NotImplementedError),
        (dict(return_dropout_mask=True), "layer_norm_fn: return_dropout_mask=True", NotImplementedError),
    ],
)
def test_bad_add_norm_arguments_are_named(kwargs, match, error):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(8), bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        llmkernels.layer_norm_fn(**args)


@needs_ext
def test_bad_raw_op_arguments_are_named():
    ops = torch.ops.llmkernels
    with pytest.raises(RuntimeError, match=r"add_norm_fwd: residual must have shape \[2, 8\]"):
        ops.add_norm_fwd(torch.randn(2, 8), torch.randn(2, 7), torch.randn(8), None, 1e-6, True, None)
    with pytest.raises(RuntimeError, match=r"add_norm_fwd: weight must have shape \[8\]"):
        ops.add_norm_fwd(torch.randn(2, 8), None, torch.randn(7), None, 1e-6, True, None)
    with pytest.raises(RuntimeError, match="add_norm_fwd: eps must be finite"):
        ops.add_norm_fwd(torch.randn(2, 8), None, torch.randn(8), None, float("inf"), True, None)
    with pytest.raises(RuntimeError, match="add_norm_bwd: dy must have shape"):
        ops.add_norm_bwd(torch.randn(2, 4), None, torch.randn(2, 8), None, torch.randn(8), None, 1e-6, True)
    with pytest.raises(RuntimeError, match="add_norm_bwd: dresidual_out must have shape"):
        ops.add_norm_bwd(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 8), None, torch.randn(8), None, 1e-6,
                         False)  # fmt: skip


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_modules(backend):
    x, r = torch.randn(2, 5, 48).bfloat16(), torch.randn(2, 5, 48)
    rms, ln = RMSNorm(48, eps=1e-5), LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        rms.weight.normal_()
        ln.weight.normal_()
        ln.bias.normal_()
    with llmkernels.use_backend(backend):
        y, res = rms(x, r, prenorm=True)
        y_ln = ln(x.float())
    expect_y, expect_res = layer_norm_ref(x.double(), rms.weight.detach().double(), None, r.double(), 1e-5, True,
                                          False, True)  # fmt: skip
    assert_close_dtype(y, expect_y)
    assert res.dtype == torch.float32
    torch.testing.assert_close(res.double(), expect_res.float().double(), rtol=0, atol=0)
    # with neither residual nor prenorm, LayerNorm is torch's nn.LayerNorm (whose weight and bias it keeps)
    torch.testing.assert_close(y_ln, torch.nn.LayerNorm.forward(ln, x.float()), rtol=1e-5, atol=1e-5)
    assert rms.bias is None and set(rms.state_dict()) == {"weight"} and set(ln.state_dict()) == {"weight", "bias"}
    with pytest.raises(NotImplementedError, match="RMSNorm: dropout_p=0.1"):
        RMSNorm(8, dropout_p=0.1)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_hidden_size_zero_and_rows_zero(backend):
    for shape in ((3, 0), (0, 8), (2, 0, 5)):
        x, w = torch.randn(*shape), torch.randn(shape[-1])
        with llmkernels.use_backend(backend):
            y, res = llmkernels.rms_norm_fn(x, w, None, residual=torch.randn(*shape), prenorm=True)
        assert y.shape == x.shape and res.shape == x.shape


@needs_ext
def test_torch_compile_dynamic_norms():
    """dynamic=True hands eps over as a SymFloat (math.isfinite cannot take one) and group_size as a SymInt."""
    x, w, z = torch.randn(2, 7, 32, requires_grad=True), torch.randn(32), torch.randn(2, 7, 32)
    for fn, args in ((llmkernels.rms_norm_fn, (x, w, None)), (llmkernels.rmsnorm_fn, (x, w, None, z))):
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        for eps in (1e-5, 1e-6):
            out = compiled(*args, eps=eps)
            torch.testing.assert_close(out, fn(*args, eps=eps))
    for module in (RMSNorm(32), LayerNorm(32)):
        out = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")(x)
        torch.testing.assert_close(out, module(x))
