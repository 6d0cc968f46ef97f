"""Packed sequences in the selective scan: selective_scan_fn(seq_idx=...) and mamba_chunk_scan_combined's seq_idx,
cu_seqlens and return_varlen_states, on every backend, against the reference; the reference against running each
sequence alone (an independent formulation: the sequences never meet).

A new sequence starts wherever seq_idx changes, from a zero state; initial_state belongs to each row's first
sequence. Gradient tolerances as test_scan_ops.py (sums over batch x seqlen in another order).
"""

import pytest
import torch
from scan_cases import ScanCase, scan_inputs, triton_interp
from utils import TOLERANCES, assert_close_dtype

import llmkernels
from llmkernels import _ext
from llmkernels.reference.mamba_chunk_scan import mamba_chunk_scan_ref
from llmkernels.reference.selective_scan import selective_scan_ref

needs_ext = pytest.mark.skipif(not _ext.has_kernel("selective_scan_fwd", "CPU"), reason="no C++ CPU scan kernel")
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=needs_ext),
    pytest.param("triton", "cpu", id="triton-interp", marks=[triton_interp, pytest.mark.triton_interp, needs_ext]),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
]
SCAN_KEYS = ("u", "delta", "z")  # (batch, dim, seqlen)


def _seq_idx(lengths_per_row, device="cpu", dtype=torch.int32):
    """(batch, seqlen) sequence numbers from each row's sequence lengths (the rows' totals must agree)."""
    rows = [torch.repeat_interleave(torch.arange(len(ls)) * 3 + 7, torch.tensor(ls)) for ls in lengths_per_row]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _bounds(seq_row):
    starts = [0] + [t for t in range(1, len(seq_row)) if seq_row[t] != seq_row[t - 1]]
    return list(zip(starts, starts[1:] + [len(seq_row)]))


def _scan_each_sequence(kw, seq_idx):
    """The reference run on each sequence of each row alone, concatenated: (out, last state)."""
    outs, lasts = [], []
    for b in range(seq_idx.shape[0]):
        pieces, state = [], None
        for k, (t0, t1) in enumerate(_bounds(seq_idx[b].tolist())):
            part = {}
            for name, v in kw.items():
                if not isinstance(v, torch.Tensor) or name in ("A", "D", "delta_bias"):
                    part[name] = v
                elif name == "initial_state":
                    part[name] = v[b : b + 1] if k == 0 else None
                elif name in ("B", "C") and v.dim() == 2:
                    part[name] = v
                else:  # (batch, ..., seqlen)
                    part[name] = v[b : b + 1, ..., t0:t1]
            out, state = selective_scan_ref(**part, return_last_state=True)
            pieces.append(out)
        outs.append(torch.cat(pieces, dim=-1))
        lasts.append(state)
    return torch.cat(outs), torch.cat(lasts)


LAYOUTS = [
    # (case, sequence lengths per row): a length-1 sequence, one starting at t = 1, every token its own sequence
    (ScanCase(17, bc="group", has_init=True), [[5, 1, 11], [1, 16]]),
    (ScanCase(23, dstate=5, bc="token", has_D=False), [[23], [2, 3, 7, 11]]),
    (ScanCase(9, bc="const", has_z=False, softplus=False, has_init=True), [[1] * 9, [4, 5]]),
    (ScanCase(150, dstate=20, bc="group", ngroups=4, has_init=True), [[64, 1, 85], [63, 2, 70, 15]]),
    # the CPU kernels' blocks of rows walking 16 / 32-step chunks together (Mamba-2's A), sequences across chunks
    (ScanCase(150, dstate=20, bc="token", has_init=True, dim=37, a_per_row=True), [[64, 1, 85], [40, 33, 77]]),
]


@pytest.mark.parametrize("case, lengths", LAYOUTS, ids=[str(c) for c, _ in LAYOUTS])
def test_reference_equals_each_sequence_alone(case, lengths):
    kw = scan_inputs(case, torch.float64)
    kw.update({k: kw[k].double() for k in ("A", "D", "delta_bias", "initial_state") if kw[k] is not None})
    seq_idx = _seq_idx(lengths)
    out, last = selective_scan_ref(**kw, return_last_state=True, seq_idx=seq_idx)
    want_out, want_last = _scan_each_sequence(kw, seq_idx)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(last, want_last)


def _run(backend, kw, seq_idx):
    with llmkernels.use_backend(backend):
        return llmkernels.selective_scan_fn(**kw, return_last_state=True, seq_idx=seq_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, lengths", LAYOUTS, ids=[str(c) for c, _ in LAYOUTS])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_backends_forward_and_gradients(backend, device, case, lengths, dtype):
    kw = scan_inputs(case, dtype, device)
    seq_idx = _seq_idx(lengths, device)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    out, last = _run(backend, kw, seq_idx)
    ref_kw = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out, ref_last = selective_scan_ref(**ref_kw, return_last_state=True, seq_idx=seq_idx)
    assert_close_dtype(out, ref_out)
    assert_close_dtype(last, ref_last, torch.float32 if dtype == torch.float32 else dtype)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    grads = torch.autograd.grad([out, last], list(leaves.values()), [dout, dlast])
    ref_grads = torch.autograd.grad([ref_out, ref_last], [ref_kw[k] for k in leaves], [dout.float(), dlast])
    rtol, atol = TOLERANCES[dtype]
    scale = 4.0 if dtype == torch.float32 else 2.0
    for name, g, rg in zip(leaves, grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == kw[name].dtype, name
        bound = atol * scale * max(1.0, rg.abs().max().item())  # sums over seqlen grow with it
        torch.testing.assert_close(g.float(), rg, rtol=rtol * scale, atol=bound, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_one_sequence_is_the_plain_scan(backend, device):
    """A constant seq_idx changes nothing (bit for bit: the same kernels run over the same steps)."""
    kw = scan_inputs(ScanCase(40, bc="token", has_init=True), torch.float32, device)
    plain = _run(backend, kw, None)
    packed = _run(backend, kw, torch.full((2, 40), 5, dtype=torch.int32, device=device))
    for a, b in zip(plain, packed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_nonfinite_state_does_not_leak_into_the_next_sequence(backend, device):
    """The reset replaces the state (a product by 0 would turn an inf state into NaN)."""
    kw = scan_inputs(ScanCase(12, bc="token", has_init=True, has_z=False), torch.float32, device)
    kw["initial_state"][0, 0, 0] = float("inf")
    out, _ = _run(backend, kw, _seq_idx([[4, 8], [12]], device))
    assert torch.isfinite(out[0, :, 4:]).all() and not torch.isfinite(out[0, 0, :4]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_shapes_of_the_channel_parallel_kernels(dtype):
    """dstate 16, per-token B/C, many rows: without seq_idx the wide forward (and with LLMKERNELS_SCAN_BWD=fast the
    fast backward) would run; those kernels do not take seq_idx, so the chunked ones must."""
    case = ScanCase(96, bc="group", ngroups=2, has_init=True, batch=2, dim=8192)
    kw = scan_inputs(case, dtype, "cuda")
    seq_idx = _seq_idx([[40, 1, 55], [96]], "cuda")
    out, last = _run("cuda", kw, seq_idx)
    ref_kw = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out, ref_last = selective_scan_ref(**ref_kw, return_last_state=True, seq_idx=seq_idx)
    assert_close_dtype(out, ref_out)
    assert_close_dtype(last, ref_last, dtype)


@needs_ext
def test_int64_seq_idx_values_do_not_alias():
    """int64 sequence numbers that agree in their low 32 bits are still different sequences."""
    kw = scan_inputs(ScanCase(10, bc="token"), torch.float32)
    big = torch.tensor([[0] * 5 + [2**32] * 5, [1] * 10], dtype=torch.int64)
    out, last = _run("cpu", kw, big)
    ref = _run("cpu", kw, _seq_idx([[5, 5], [10]]))
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(last, ref[1])


@needs_ext
@pytest.mark.parametrize(
    "seq_idx, match",
    [
        (torch.zeros(2, 9, dtype=torch.int32), r"seq_idx.*shape"),
        (torch.zeros(2, 10, dtype=torch.float32), r"seq_idx.*dtype"),
        (torch.zeros(10, dtype=torch.int32), r"seq_idx"),
        ([0] * 10, r"seq_idx.*Tensor"),
    ],
    ids=["shape", "dtype", "ndim", "list"],
)
def test_bad_seq_idx_is_named(seq_idx, match):
    kw = scan_inputs(ScanCase(10, bc="token"), torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        llmkernels.selective_scan_fn(**kw, seq_idx=seq_idx)


@needs_ext
def test_cpp_ops_opcheck_with_seq_idx():
    kw = scan_inputs(ScanCase(13, bc="group", has_init=True), torch.float32)
    seq_idx = _seq_idx([[6, 7], [1, 12]])
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    fwd_args = (*args, True, kw["initial_state"], seq_idx)
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_fwd.default, fwd_args)
    dout, dlast = torch.randn_like(kw["u"]), torch.randn_like(kw["initial_state"])
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_bwd.default, (dout, dlast, *fwd_args),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in args]
    grad_args = (*leaves, True, kw["initial_state"], seq_idx)
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_fwd.default, grad_args,
                          test_utils=("test_autograd_registration",))  # fmt: skip


@needs_ext
def test_compiles_with_seq_idx():
    kw = scan_inputs(ScanCase(16, bc="token", has_init=True), torch.float32)
    seq_idx = _seq_idx([[3, 13], [16]])
    fn = torch.compile(lambda **a: llmkernels.selective_scan_fn(**a, return_last_state=True), fullgraph=True)
    got = fn(**kw, seq_idx=seq_idx)
    want = _run("cpu", kw, seq_idx)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# mamba_chunk_scan_combined: seq_idx, cu_seqlens, return_varlen_states
# ---------------------------------------------------------------------------------------------------------------
def _ssd_inputs(seqlen, nheads=4, headdim=3, ngroups=2, dstate=6, batch=1, dtype=torch.float32, device="cpu"):
    def r(*shape):
        return torch.randn(*shape, device=device)

    return dict(
        x=r(batch, seqlen, nheads, headdim).to(dtype),
        dt=(r(batch, seqlen, nheads) * 0.5).to(dtype),
        A=-0.2 - torch.rand(nheads, device=device),
        B=r(batch, seqlen, ngroups, dstate).to(dtype),
        C=r(batch, seqlen, ngroups, dstate).to(dtype),
        D=r(nheads),
        z=r(batch, seqlen, nheads, headdim).to(dtype),
        dt_bias=r(nheads) * 0.3,
        initial_states=r(batch, nheads, headdim, dstate),
    )


def _ssd_each_sequence(inp, lengths):
    """Each sequence alone through the reference: (y, final state of each sequence)."""
    ys, states, start = [], [], 0
    for n in lengths:
        if n == 0:  # an empty sequence's state is 0; the initial state belongs to the sequence holding token 0
            states.append(torch.zeros_like(inp["initial_states"][0]))
            continue
        part = {name: (v[:, start : start + n] if name in ("x", "dt", "B", "C", "z") else v) for name, v in inp.items()}
        part["initial_states"] = inp["initial_states"] if start == 0 else None
        y, state = mamba_chunk_scan_ref(**part, dt_softplus=True, return_final_states=True)
        ys.append(y)
        states.append(state[0])
        start += n
    return torch.cat(ys, dim=1), torch.stack(states)


SSD_LENGTHS = [[4, 0, 1, 12, 12], [29], [1] * 7, [0, 7]]


@pytest.mark.parametrize("lengths", SSD_LENGTHS, ids=str)
def test_ssd_reference_equals_each_sequence_alone(lengths):
    inp = _ssd_inputs(sum(lengths), dtype=torch.float64)
    inp = {k: v.double() for k, v in inp.items()}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    y, final, varlen = mamba_chunk_scan_ref(**inp, dt_softplus=True, return_final_states=True, seq_idx=seq_idx,
                                            cu_seqlens=cu, return_varlen_states=True)  # fmt: skip
    want_y, want_states = _ssd_each_sequence(inp, lengths)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(varlen, want_states)
    torch.testing.assert_close(final[0], want_states[-1] if lengths[-1] else final[0])


@pytest.mark.parametrize("lengths", SSD_LENGTHS, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_ssd_packed_on_backends(backend, device, lengths):
    inp = _ssd_inputs(sum(lengths), device=device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))[None].int()  # fmt: skip
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    with llmkernels.use_backend(backend):
        y, final, varlen = llmkernels.mamba_chunk_scan_combined(
            **inp, chunk_size=64, seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
            return_varlen_states=True,
        )  # fmt: skip
    ref_inp = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    ry, rfinal, rvarlen = mamba_chunk_scan_ref(**ref_inp, dt_softplus=True, return_final_states=True,
                                               seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True)  # fmt: skip
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ry, **tol)
    torch.testing.assert_close(final, rfinal, **tol)
    torch.testing.assert_close(varlen, rvarlen, **tol)
    gy, gf, gv = torch.randn_like(y), torch.randn_like(final), torch.randn_like(varlen)
    grads = torch.autograd.grad([y, final, varlen], list(leaves.values()), [gy, gf, gv])
    ref_grads = torch.autograd.grad([ry, rfinal, rvarlen], list(ref_inp.values()), [gy, gf, gv])
    for name, g, rg in zip(leaves, grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=4e-4, atol=4e-4 * max(1.0, rg.abs().max().item()),
                                   msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip


@needs_ext
def test_ssd_packed_batch_equals_the_padded_batch():
    """Padding-free training's promise: two sequences packed in one row give the outputs of a batch of two."""
    a, b = _ssd_inputs(9), _ssd_inputs(14)
    for inp in (a, b):
        inp["initial_states"] = None
    packed = {k: (torch.cat([a[k], b[k]], dim=1) if k in ("x", "dt", "B", "C", "z") else a[k]) for k in a}
    packed.update(dt_bias=a["dt_bias"], D=a["D"], A=a["A"])
    for inp in (b,):
        inp.update(dt_bias=a["dt_bias"], D=a["D"], A=a["A"])
    seq_idx = torch.tensor([[0] * 9 + [1] * 14], dtype=torch.int32)
    y = llmkernels.mamba_chunk_scan_combined(**packed, chunk_size=256, seq_idx=seq_idx, dt_softplus=True)
    ya = llmkernels.mamba_chunk_scan_combined(**a, chunk_size=256, dt_softplus=True)
    yb = llmkernels.mamba_chunk_scan_combined(**b, chunk_size=256, dt_softplus=True)
    torch.testing.assert_close(y, torch.cat([ya, yb], dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens=None), "needs cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 4, 10])), "cu_seqlens must rise"),
        (dict(cu_seqlens=torch.tensor([0, 5, 9])), "cu_seqlens must rise"),
        (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "cu_seqlens.*dtype"),
        (dict(batch=2), "batch of 1"),
        (dict(seq_idx=torch.zeros(1, 9, dtype=torch.int32)), "seq_idx.*shape"),
        (dict(seq_idx=None), "needs seq_idx"),
    ],
    ids=["no-cu", "falling", "short", "float", "batch2", "seq-shape", "no-seq-idx"],
)
def test_ssd_packed_errors(change, match):
    inp = _ssd_inputs(10, batch=change.pop("batch", 1))
    kw = dict(cu_seqlens=torch.tensor([0, 4, 10]), seq_idx=torch.zeros(inp["x"].shape[0], 10, dtype=torch.int32))
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        llmkernels.mamba_chunk_scan_combined(**inp, chunk_size=64, return_varlen_states=True, **kw)
