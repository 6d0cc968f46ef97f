"""causal_conv1d_fn / causal_conv1d_update on the C++ backends vs the reference; widths 2, 3, 4."""

import pytest
import torch
from utils import assert_close_dtype, poison_, run_with_cpu_isa

import llmkernels
from llmkernels import _ext
from llmkernels.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("causal_conv1d_fwd", "CPU"),
    reason=f"no C++ CPU kernel for llmkernels::causal_conv1d_fwd (extension: {_ext.load_error or 'built without it'})",
)
SHAPES = [(1, 3, 1), (2, 5, 17), (2, 8, 255), (1, 4, 2048)]  # (batch, dim, seqlen)


def _inputs(shape, width, dtype, device, bias=True):
    b, d, L = shape
    x = torch.randn(b, d, L, device=device).to(dtype)
    w = (torch.randn(d, width, device=device) / width**0.5).to(dtype)
    return x, w, (torch.randn(d, device=device).to(dtype) if bias else None)


@needs_ext
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_forward_and_backward(backend, shape, width, dtype, activation):
    device = "cuda" if backend == "cuda" else "cpu"
    x, w, bias = _inputs(shape, width, dtype, device, bias=width != 3)
    leaves = [t.requires_grad_() for t in (x, w, bias) if t is not None]
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_fn(x, w, bias, activation=activation)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = causal_conv1d_ref(*ref_leaves, *([None] if bias is None else []), activation=activation)
    assert out.dtype == dtype
    assert_close_dtype(out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    for name, g, rg in zip(("x", "weight", "bias"), grads, ref_grads):
        # dweight / dbias sum batch x seqlen products: scale the absolute tolerance by their size.
        scale = max(1.0, rg.abs().max().item())
        assert g.dtype == dtype, name
        assert_close_dtype(g, rg, dtype, scale=scale if name != "x" else 1.0)


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_conv1d_forward_other_cpu_instruction_sets(isa):
    """The forward's row kernel as built for AVX2 and portable code (this machine may pick AVX-512), in a child."""
    code = (
        "import torch, test_conv1d as t\n"
        "for shape in [(1, 3, 1), (2, 5, 17), (2, 8, 255)]:\n"
        "    for width in (2, 3, 4):\n"
        "        for dtype in (torch.float32, torch.bfloat16):\n"
        "            t.check_forward(shape, width, dtype, 'silu' if width != 3 else None)\n"
    )
    run_with_cpu_isa(isa, code, "selective_scan")


def check_forward(shape, width, dtype, activation):
    x, w, bias = _inputs(shape, width, dtype, "cpu", bias=width != 2)
    with llmkernels.use_backend("cpu"):
        out = llmkernels.causal_conv1d_fn(x, w, bias, activation=activation)
    ref = causal_conv1d_ref(x.float(), w.float(), None if bias is None else bias.float(), activation=activation)
    assert out.dtype == dtype
    assert_close_dtype(out, ref)


@needs_ext
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_update_steps_equal_full_conv(backend, width, dtype, state_dtype):
    device = "cuda" if backend == "cuda" else "cpu"
    x, w, bias = _inputs((2, 6, 9), width, dtype, device)
    state = poison_(torch.empty(2, 6, width, device=device, dtype=state_dtype)).zero_()  # causal zero padding
    ref_state = state.clone()
    with llmkernels.use_backend(backend):
        steps = [llmkernels.causal_conv1d_update(x[..., t], state, w, bias, "silu") for t in range(9)]
    ref_steps = [causal_conv1d_update_ref(x[..., t], ref_state, w, bias, "silu") for t in range(9)]
    assert_close_dtype(torch.stack(steps, -1), torch.stack(ref_steps, -1))
    assert_close_dtype(state, ref_state)
    # The state holds the inputs in its own dtype: against the full conv, the less precise of the two counts.
    tol_dtype = torch.bfloat16 if torch.bfloat16 in (dtype, state_dtype) else dtype
    assert_close_dtype(torch.stack(steps, -1), causal_conv1d_ref(x, w, bias, "silu"), tol_dtype)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference",
                                     pytest.param("cuda", marks=pytest.mark.cuda)])  # fmt: skip
def test_conv1d_update_several_tokens_at_once(backend):
    """x (batch, dim, seqlen): one call equals seqlen single steps (speculative decoding's draft tokens); seqlen 0
    leaves the state alone, and bad arguments are still refused."""
    device = "cuda" if backend == "cuda" else "cpu"
    x, w, bias = _inputs((2, 6, 5), 4, torch.float32, device)
    state = torch.randn(2, 6, 4, device=device)
    ref_state = state.clone()
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_update(x, state, w, bias, "silu")
        assert llmkernels.causal_conv1d_update(x[..., :0], state, w, bias, "silu").shape == (2, 6, 0)
    steps = [causal_conv1d_update_ref(x[..., t], ref_state, w, bias, "silu") for t in range(5)]
    assert out.shape == x.shape
    assert_close_dtype(out, torch.stack(steps, -1))
    assert_close_dtype(state, ref_state)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        llmkernels.causal_conv1d_update(x[..., :0], state[:, :3].contiguous(), w, bias, "silu")


# The CPU decode kernel's paths: channels in vectors with a tail, the multi-threaded split into 512-channel
# items (3000 and 1700 channels, batch * dim above the serial limit), a 16-bit state converted per item, no bias,
# no SiLU.
LARGE_UPDATE_CASES = [
    (3, 3000, 4, torch.float32, torch.float32, True, "silu"),
    (5, 1700, 3, torch.bfloat16, torch.bfloat16, False, "silu"),
    (2, 70, 2, torch.float16, torch.float32, True, None),
]


@needs_ext
@pytest.mark.parametrize("case", LARGE_UPDATE_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_update_larger_shapes(backend, case):
    batch, dim, width, dtype, state_dtype, with_bias, activation = case
    device = "cuda" if backend == "cuda" else "cpu"
    x, w, bias = _inputs((batch, dim, 1), width, dtype, device, bias=with_bias)
    state = torch.randn(batch, dim, width, device=device).to(state_dtype)
    ref_state = state.clone()
    with llmkernels.use_backend(backend):
        y = llmkernels.causal_conv1d_update(x[..., 0], state, w, bias, activation)
    ref_y = causal_conv1d_update_ref(x[..., 0], ref_state, w, bias, activation)
    assert y.dtype == dtype
    assert_close_dtype(y, ref_y)
    assert_close_dtype(state, ref_state, state_dtype)


@needs_ext
def test_conv1d_update_op_strided_state():
    """The raw op (the Python wrapper insists on a contiguous conv_state) updates a strided one through a copy."""
    x, w, bias = _inputs((2, 5, 1), 4, torch.float32, "cpu")
    state = torch.randn(2, 4, 5).transpose(1, 2)  # (batch, dim, width), not contiguous
    ref_state = state.clone()
    y = torch.ops.llmkernels.causal_conv1d_update(x[..., 0], state, w, bias, True)
    assert_close_dtype(y, causal_conv1d_update_ref(x[..., 0], ref_state, w, bias, "silu"))
    assert_close_dtype(state, ref_state)


@needs_ext
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_conv1d(with_bias):
    x, w, bias = _inputs((2, 3, 7), 4, torch.float32, "cpu", bias=with_bias)
    ops = torch.ops.llmkernels
    torch.library.opcheck(ops.causal_conv1d_fwd.default, [x.requires_grad_(), w.requires_grad_(), bias, True])
    torch.library.opcheck(ops.causal_conv1d_bwd.default, [torch.randn(2, 3, 7), x.detach(), w.detach(), bias, False])
    x1 = x.detach()[..., 0].contiguous()
    torch.library.opcheck(ops.causal_conv1d_update.default, [x1, torch.randn(2, 3, 4), w.detach(), bias, True])


@needs_ext
def test_torch_compile_conv1d_fullgraph():
    x, w, bias = _inputs((2, 3, 11), 4, torch.float32, "cpu")
    x.requires_grad_()
    fn = torch.compile(llmkernels.causal_conv1d_fn, fullgraph=True, backend="aot_eager")
    out = fn(x, w, bias, activation="silu")
    out.sum().backward()
    assert_close_dtype(out, causal_conv1d_ref(x.detach(), w, bias, "silu"))
    assert x.grad is not None


@needs_ext
def test_torch_compile_conv1d_update_fullgraph():
    x, w, bias = _inputs((2, 3, 1), 3, torch.float32, "cpu")
    state, ref_state = torch.randn(2, 3, 3), None
    ref_state = state.clone()
    fn = torch.compile(llmkernels.causal_conv1d_update, fullgraph=True, backend="aot_eager")
    y = fn(x[..., 0], state, w, bias, "silu")
    assert_close_dtype(y, causal_conv1d_update_ref(x[..., 0], ref_state, w, bias, "silu"))
    assert_close_dtype(state, ref_state)


BAD = [
    (lambda x, w, b: (x[0], w, b, None), "causal_conv1d_fn: x must have 3 dimensions"),
    (lambda x, w, b: (x.double(), w, b, None), "causal_conv1d_fn: x must have dtype in"),
    (lambda x, w, b: (x, w[:, :1], b, None), "causal_conv1d_fn: weight must have shape .*width in 2..4"),
    (lambda x, w, b: (x, torch.randn(3, 5), b, None), "causal_conv1d_fn: weight must have shape"),
    (lambda x, w, b: (x, w[:2], b, None), "causal_conv1d_fn: weight must have shape"),
    (lambda x, w, b: (x, w, b[:2], None), "causal_conv1d_fn: bias must have shape"),
    (lambda x, w, b: (x, w, b, "relu"), "causal_conv1d_fn: activation must be"),
    (lambda x, w, b: (x, w.to("meta"), b, None), "causal_conv1d_fn: weight must be on cpu"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_conv1d_arguments_are_named(i):
    make, match = BAD[i]
    x, w, b = _inputs((2, 3, 5), 4, torch.float32, "cpu")
    x, w, b, act = make(x, w, b)
    with pytest.raises((ValueError, TypeError), match=match):
        llmkernels.causal_conv1d_fn(x, w, b, activation=act)


def test_bad_conv1d_update_state_is_named():
    x, w, b = _inputs((2, 3, 1), 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="causal_conv1d_update: conv_state must have shape"):
        llmkernels.causal_conv1d_update(x[..., 0], torch.zeros(2, 3, 2), w, b)  # state_len < width - 1
    with pytest.raises(ValueError, match="causal_conv1d_update: conv_state is written in place and must not have"):
        llmkernels.causal_conv1d_update(x[..., 0], torch.zeros(1, 3, 4).expand(2, 3, 4), w, b)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_conv1d_empty_sequence(backend):
    """seqlen 0: an empty result (F.conv1d, which the reference calls, refuses empty inputs)."""
    x = torch.randn(2, 4, 0, requires_grad=True)
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_fn(x, torch.randn(4, 3))
    assert out.shape == (2, 4, 0)
