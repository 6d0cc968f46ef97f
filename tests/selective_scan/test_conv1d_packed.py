"""causal_conv1d_fn's packed sequences (seq_idx) and chunked prefill (initial_states, return_final_states,
final_states_out), with the causal_conv1d package's signature, on the C++ backends against the reference, and the
reference against convolving each sequence alone with F.conv1d (an independent formulation)."""

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_dtype, poison_

import llmkernels
from llmkernels import _ext
from llmkernels.reference.causal_conv1d import causal_conv1d_ref

needs_ext = pytest.mark.skipif(not _ext.has_kernel("causal_conv1d_fwd", "CPU"), reason="no C++ CPU conv1d kernel")
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=needs_ext),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {  # sequence lengths per row
    "mixed": [[5, 1, 11], [17]],
    "ones": [[1] * 9, [2, 3, 4]],
    "one-token": [[1], [1]],
    "long": [[130, 1, 2, 125], [3, 255]],
    "tile-edge": [[255, 2, 3], [256, 4]],  # starts at 255, 256, 257: the CUDA kernels' tiles are 256 steps
}


def _seq_idx(lengths, device="cpu", dtype=torch.int32):
    rows = [torch.repeat_interleave(torch.arange(len(ls)) * 5 - 3, torch.tensor(ls)) for ls in lengths]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _each_sequence_alone(x, w, bias, silu, lengths):
    """F.conv1d on each sequence alone (zero padding at its start), concatenated."""
    width = w.shape[1]
    rows = []
    for b, ls in enumerate(lengths):
        pieces, start = [], 0
        for n in ls:
            part = x[b : b + 1, :, start : start + n]
            out = F.conv1d(part, w.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :n]
            pieces.append(F.silu(out) if silu else out)
            start += n
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows)


def _inputs(batch, dim, seqlen, width, dtype, device, bias=True):
    x = torch.randn(batch, dim, seqlen, device=device).to(dtype)
    w = (torch.randn(dim, width, device=device) / width**0.5).to(dtype)
    return x, w, (torch.randn(dim, device=device).to(dtype) if bias else None)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_equals_each_sequence_alone(layout, width):
    lengths = LAYOUTS[layout]
    x, w, bias = _inputs(2, 3, sum(lengths[0]), width, torch.float64, "cpu")
    for silu in (False, True):
        got = causal_conv1d_ref(x, w, bias, "silu" if silu else None, seq_idx=_seq_idx(lengths))
        torch.testing.assert_close(got, _each_sequence_alone(x, w, bias, silu, lengths))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_packed_forward_and_gradients(backend, device, layout, width, dtype):
    lengths = LAYOUTS[layout]
    x, w, bias = _inputs(2, 5, sum(lengths[0]), width, dtype, device, bias=width != 4)
    seq_idx = _seq_idx(lengths, device)
    leaves = [t.requires_grad_() for t in (x, w, bias) if t is not None]
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_fn(x, w, bias, seq_idx=seq_idx, activation="silu")
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = causal_conv1d_ref(*ref_leaves, *([None] if bias is None else []), activation="silu", seq_idx=seq_idx)
    assert out.dtype == dtype
    assert_close_dtype(out, ref)
    dout = torch.randn_like(out)
    for name, g, rg in zip(("x", "weight", "bias"), torch.autograd.grad(out, leaves, dout),
                           torch.autograd.grad(ref, ref_leaves, dout.float())):  # fmt: skip
        assert g.dtype == dtype, name
        assert_close_dtype(g, rg, dtype, scale=max(1.0, rg.abs().max().item()) if name != "x" else 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_chunks_with_initial_states_equal_one_call(backend, device, width, dtype):
    """conv(x1 ++ x2 ++ x3) == the chunks, each continuing from the previous one's final states (chunked prefill),
    outputs and gradients; chunks shorter than width - 1 included."""
    x, w, bias = _inputs(2, 6, 40, width, dtype, device)
    leaves = [t.requires_grad_() for t in (x, w, bias)]
    with llmkernels.use_backend(backend):
        whole = llmkernels.causal_conv1d_fn(x, w, bias, activation="silu")
        outs, state = [], None
        for a, b in ((0, 1), (1, 18), (18, 40)):
            out, state = llmkernels.causal_conv1d_fn(x[..., a:b], w, bias, initial_states=state,
                                                     return_final_states=True, activation="silu")  # fmt: skip
            outs.append(out)
    chunked = torch.cat(outs, dim=-1)
    assert_close_dtype(chunked, whole.float(), dtype)
    torch.testing.assert_close(state, x[..., 40 - (width - 1) :].detach())
    dout = torch.randn_like(whole)
    for g, rg in zip(torch.autograd.grad(chunked, leaves, dout), torch.autograd.grad(whole, leaves, dout)):
        assert_close_dtype(g, rg.float(), dtype, scale=max(1.0, rg.abs().max().item()))


@pytest.mark.parametrize("seqlen", [9, 257, 300])  # (past the CUDA kernels' first 256-step tile, the one reading them)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_initial_states_against_the_reference(backend, device, width, seqlen):
    x, w, bias = _inputs(2, 4, seqlen, width, torch.float32, device)
    init = torch.randn(2, 4, width - 1, device=device, requires_grad=True)
    with llmkernels.use_backend(backend):
        out = llmkernels.causal_conv1d_fn(x, w, bias, initial_states=init, activation="silu")
    ref = causal_conv1d_ref(x, w, bias, "silu", initial_states=init)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), [init])
    (rg,) = torch.autograd.grad(ref.sum(), [init])
    torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_final_states_out_in_place_and_short_inputs(backend, device):
    x, w, bias = _inputs(2, 3, 2, 4, torch.float32, device)  # seqlen 2 < width - 1 = 3
    init = torch.randn(2, 3, 3, device=device)
    final_out = poison_(torch.empty(2, 3, 3, device=device))
    with llmkernels.use_backend(backend):
        _, final = llmkernels.causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True,
                                               final_states_out=final_out)  # fmt: skip
        _, no_init = llmkernels.causal_conv1d_fn(x, w, bias, return_final_states=True)
    assert final.data_ptr() == final_out.data_ptr()
    torch.testing.assert_close(final_out, torch.cat([init[..., 2:], x], dim=-1))
    torch.testing.assert_close(no_init, torch.cat([torch.zeros_like(x[..., :1]), x], dim=-1))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_final_states_flow_gradients(backend, device):
    """final_states is a slice of initial_states ++ x: its gradient lands on exactly those elements."""
    x, w, bias = _inputs(2, 3, 2, 4, torch.float32, device)  # seqlen 2 < width - 1: one state from initial_states
    init = torch.randn(2, 3, 3, device=device)
    x.requires_grad_(), init.requires_grad_()
    with llmkernels.use_backend(backend):
        _, final = llmkernels.causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True)
    dfinal = torch.randn_like(final)
    dx, dinit = torch.autograd.grad(final, [x, init], dfinal)
    torch.testing.assert_close(dx, dfinal[..., 1:])
    torch.testing.assert_close(dinit, F.pad(dfinal[..., :1], (2, 0)))


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_packed_final_states_continue_the_last_sequence(backend, device, width):
    """With seq_idx, final_states hold the last sequence's inputs only (an earlier sequence's read 0): continuing
    from them equals convolving the last sequence and the next chunk as one (the last sequence has 1 or 2 tokens,
    shorter than width - 1 for the wider convolutions)."""
    lengths = [[6, 1], [5, 2]]
    x, w, bias = _inputs(2, 4, 7, width, torch.float32, device)
    nxt = torch.randn(2, 4, 5, device=device)
    with llmkernels.use_backend(backend):
        _, final = llmkernels.causal_conv1d_fn(x, w, bias, seq_idx=_seq_idx(lengths, device),
                                               return_final_states=True, activation="silu")  # fmt: skip
        cont = llmkernels.causal_conv1d_fn(nxt, w, bias, initial_states=final, activation="silu")
    for b, last in enumerate((1, 2)):
        alone = torch.cat([x[b : b + 1, :, 7 - last :], nxt[b : b + 1]], dim=-1)
        expected = causal_conv1d_ref(alone, w, bias, "silu")[..., last:]
        torch.testing.assert_close(cont[b : b + 1], expected)
        kept = min(last, width - 1)
        torch.testing.assert_close(final[b, :, width - 1 - kept :], x[b, :, 7 - kept :])
        assert (final[b, :, : width - 1 - kept] == 0).all()


@needs_ext
def test_a_run_of_equal_values_is_one_sequence():
    """seq_idx values are compared as runs: [0, 1, 0] is three sequences (the last token does not see the first)."""
    x, w, _ = _inputs(1, 2, 3, 3, torch.float32, "cpu")
    for dtype in (torch.int32, torch.int64):
        seq_idx = torch.tensor([[0, 1, 0]], dtype=dtype)
        out = llmkernels.causal_conv1d_fn(x, w, seq_idx=seq_idx)
        torch.testing.assert_close(out, x * w[:, -1:])


@needs_ext
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seq_idx="silu"), TypeError, "activation='silu' by keyword"),
        (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), ValueError, "seq_idx must have shape"),
        (dict(seq_idx=torch.zeros(2, 7)), TypeError, "seq_idx must have dtype"),
        (
            dict(seq_idx=torch.zeros(2, 7, dtype=torch.int32), initial_states=torch.zeros(2, 3, 2)),
            NotImplementedError,
            "initial_states together with seq_idx",
        ),  # fmt: skip
        (dict(initial_states=torch.zeros(2, 3, 3)), ValueError, "initial_states must have shape"),
        (dict(final_states_out=torch.zeros(2, 3, 2)), ValueError, "return_final_states=True"),
        (dict(return_final_states=True, final_states_out=torch.zeros(2, 3, 5)), ValueError, "final_states_out"),
    ],
    ids=["positional-activation", "seq-shape", "seq-dtype", "seq-and-init", "init-shape", "out-alone", "out-shape"],
)
def test_bad_arguments_are_named(kwargs, error, match):
    x, w, bias = _inputs(2, 3, 7, 3, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        llmkernels.causal_conv1d_fn(x, w, bias, **kwargs)


@needs_ext
def test_cpp_ops_opcheck():
    x, w, bias = _inputs(2, 3, 11, 4, torch.float32, "cpu")
    seq_idx = _seq_idx([[4, 7], [1, 10]])
    init = torch.randn(2, 3, 3)
    dout = torch.randn_like(x)
    for extra in ((seq_idx, None), (None, init)):
        torch.library.opcheck(torch.ops.llmkernels.causal_conv1d_fwd.default, (x, w, bias, True, *extra))
        torch.library.opcheck(torch.ops.llmkernels.causal_conv1d_bwd.default, (dout, x, w, bias, True, *extra))
        leaves = (x.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_())
        torch.library.opcheck(torch.ops.llmkernels.causal_conv1d_fwd.default, (*leaves, True, *extra),
                              test_utils=("test_autograd_registration",))  # fmt: skip


@needs_ext
def test_compiles_with_seq_idx_and_initial_states():
    x, w, bias = _inputs(2, 3, 12, 4, torch.float32, "cpu")
    seq_idx = _seq_idx([[5, 7], [12]])
    init = torch.randn(2, 3, 3)
    fn = torch.compile(lambda *a, **k: llmkernels.causal_conv1d_fn(*a, **k), fullgraph=True)
    torch.testing.assert_close(fn(x, w, bias, seq_idx=seq_idx, activation="silu"),
                               causal_conv1d_ref(x, w, bias, "silu", seq_idx=seq_idx))  # fmt: skip
    out, final = fn(x, w, bias, initial_states=init, return_final_states=True)
    torch.testing.assert_close(out, causal_conv1d_ref(x, w, bias, initial_states=init))
    torch.testing.assert_close(final, x[..., -3:])
    _, packed_final = fn(x, w, bias, seq_idx=_seq_idx([[10, 2], [12]]), return_final_states=True)
    torch.testing.assert_close(packed_final, torch.cat([F.pad(x[:1, :, -2:], (1, 0)), x[1:, :, -3:]]))


def test_a_value_that_returns_after_another_run_is_a_new_sequence():
    """seq_idx [0, 1, 0, 0]: the second run of 0s does not read the first (the ops renumber runs; the reference too)."""
    x, w = torch.ones(1, 1, 4), torch.ones(1, 4)
    seq_idx = torch.tensor([[0, 1, 0, 0]], dtype=torch.int32)
    want = torch.tensor([[[1.0, 1.0, 1.0, 2.0]]])
    torch.testing.assert_close(causal_conv1d_ref(x, w, seq_idx=seq_idx), want)
    torch.testing.assert_close(llmkernels.causal_conv1d_fn(x, w, seq_idx=seq_idx), want)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.id != "reference"])
def test_raw_ops_take_runs_and_keep_an_fp32_dout(backend, device):
    """The C++ ops as torch.ops calls them, without the public function's checks: seq_idx values that return after
    another run ([0, 1, 0, ...]: runs, not values, are sequences), and an fp32 dout beside bf16 x in the backward,
    which must not be rounded to bf16 first (the weight gradient then keeps fp32 accuracy)."""
    x, w, bias = _inputs(2, 6, 300, 4, torch.float32, device)
    seq_idx = torch.tensor([0, 1, 0, 0, 1, 1, 0] * 42 + [5] * 6, dtype=torch.int32, device=device).repeat(2, 1)
    renumbered = torch.cat([torch.zeros(2, 1, dtype=torch.int64, device=device),
                            (seq_idx[:, 1:] != seq_idx[:, :-1]).cumsum(1)], dim=1)  # fmt: skip
    out = torch.ops.llmkernels.causal_conv1d_fwd(x, w, bias, True, seq_idx, None)
    torch.testing.assert_close(out, causal_conv1d_ref(x, w, bias, "silu", seq_idx=renumbered))
    xb = x.bfloat16()
    dout = torch.randn(x.shape, device=device)
    dx, dw, _, _ = torch.ops.llmkernels.causal_conv1d_bwd(dout, xb, w, bias, True, None, None)
    leaves = [t.double().requires_grad_() for t in (xb, w, bias)]
    ref = causal_conv1d_ref(*leaves, "silu")
    rdx, rdw = torch.autograd.grad(ref, leaves[:2], dout.double())
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-4)
    assert dx.dtype == torch.bfloat16  # (x's dtype, computed from the unrounded dout)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-2, atol=1e-2)
