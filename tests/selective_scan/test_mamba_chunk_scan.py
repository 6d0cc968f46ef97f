"""mamba_chunk_scan_combined (Mamba-2's scan, mamba_ssm's signature).

The reference (a step-by-step recurrence) is checked against SSD's quadratic form, the "attention" side of the
duality in the Mamba-2 paper: y_i = sum_{j <= i} C_i . B_j exp(sum_{k = j+1..i} dt_k A) dt_j x_j, an independent
formulation. Then every selective-scan backend (the op is the scan over flattened heads) against the reference,
forward and gradients; splitting a sequence through initial_states / final states; stepping Mamba-2's decode
(selective_state_update on 4-D states) token by token equals the scan; argument errors; torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scan_cases import UPDATE_BACKEND_DEVICES, needs_update_kernel
from utils import assert_close_dtype

import llmkernels
from llmkernels.reference.mamba_chunk_scan import mamba_chunk_scan_ref

BACKEND_DEVICES = UPDATE_BACKEND_DEVICES


def _inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=torch.float32, device="cpu", d_per_channel=False):
    act = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    return dict(
        x=act(batch, seqlen, nheads, headdim), dt=act(batch, seqlen, nheads),
        A=-0.5 - torch.rand(nheads, device=device),
        B=act(batch, seqlen, ngroups, dstate), C=act(batch, seqlen, ngroups, dstate),
        D=torch.randn(nheads, headdim, device=device) if d_per_channel else torch.randn(nheads, device=device),
        z=act(batch, seqlen, nheads, headdim), dt_bias=torch.rand(nheads, device=device) - 0.5,
        initial_states=torch.randn(batch, nheads, headdim, dstate, device=device),
    )  # fmt: skip


def _quadratic_form(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit=(0.0, float("inf"))):
    """SSD's matrix form in fp64 (no recurrence): a (seqlen x seqlen) decay-weighted C B^T per head."""
    x, B, C = x.double(), B.double(), C.double()
    dt = dt.double() + (0 if dt_bias is None else dt_bias.double())
    dt = F.softplus(dt) if dt_softplus else dt
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    nheads, ngroups = x.shape[2], B.shape[2]
    B, C = (t.repeat_interleave(nheads // ngroups, dim=2) for t in (B, C))
    log_decay = dt * A.double()  # (b, L, h)
    cum = log_decay.cumsum(1)  # sum_{k <= i}
    seqlen = x.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    # segment sums sum_{k = j+1..i} = cum_i - cum_j, masked above the diagonal
    seg = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
    weights = torch.einsum("bihn,bjhn->bijh", C, B) * seg.exp() * dt[:, None, :, :]  # (b, i, j, h)
    y = torch.einsum("bijh,bjhp->bihp", weights, x)
    final = torch.einsum("bjh,bjhp,bjhn->bhpn", (cum[:, -1:, :] - cum).exp() * dt, x, B)
    if initial_states is not None:
        init = initial_states.double()
        y = y + torch.einsum("bihn,bhpn->bihp", C * cum.exp()[..., None], init)
        final = final + cum[:, -1, :, None, None].exp() * init
    y = y + x * (D.double() if D.dim() == 2 else D.double()[:, None])
    y = y * F.silu(z.double())
    return y, final


@pytest.mark.parametrize("ngroups,d_per_channel,dt_softplus,dt_limit", [
    (1, False, True, (0.0, float("inf"))),
    (2, True, True, (0.05, 0.6)),
    (4, False, False, (0.0, float("inf"))),  # raw dt, some negative: clamped to 0 as mamba_ssm does
])  # fmt: skip
def test_reference_matches_the_quadratic_form(ngroups, d_per_channel, dt_softplus, dt_limit):
    kw = _inputs(2, 23, 4, 5, ngroups, 7, torch.float64, d_per_channel=d_per_channel)
    y, final = mamba_chunk_scan_ref(**kw, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True)
    want_y, want_final = _quadratic_form(**kw, dt_softplus=dt_softplus, dt_limit=dt_limit)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)


CASES = [  # (batch, seqlen, nheads, headdim, ngroups, dstate)
    (2, 17, 4, 8, 2, 16),
    (1, 1, 3, 5, 1, 7),  # one token, odd sizes
    (2, 130, 8, 16, 1, 64),  # past the kernels' chunk, Mamba-2-like dstate
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-L{}-h{}-p{}-g{}-n{}".format(*c))
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_forward_matches_the_reference(backend, device, case):
    for dtype in (torch.float32, torch.bfloat16):
        kw = _inputs(*case, dtype=dtype, device=device, d_per_channel=case[1] == 17)
        with llmkernels.use_backend(backend):
            y, final = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True,
                                                            return_final_states=True)  # fmt: skip
        want_y, want_final = mamba_chunk_scan_ref(**{k: v.float() for k, v in kw.items()}, dt_softplus=True,
                                                  return_final_states=True)  # fmt: skip
        assert y.shape == kw["x"].shape and y.dtype == dtype and final.dtype == torch.float32
        assert_close_dtype(y, want_y, dtype)
        assert_close_dtype(final, want_final, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradients_match_the_reference(backend, device):
    kw = _inputs(2, 19, 4, 6, 2, 16, device=device, d_per_channel=True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
    exact = {k: v.detach().double().cpu().requires_grad_() for k, v in kw.items()}
    dy, dfinal = torch.randn_like(kw["x"]), torch.randn_like(kw["initial_states"])
    with llmkernels.use_backend(backend):
        y, final = llmkernels.mamba_chunk_scan_combined(**leaves, chunk_size=32, dt_softplus=True,
                                                        return_final_states=True)  # fmt: skip
    ((y * dy).sum() + (final * dfinal).sum()).backward()
    ry, rfinal = mamba_chunk_scan_ref(**exact, dt_softplus=True, return_final_states=True)
    ((ry * dy.double().cpu()).sum() + (rfinal * dfinal.double().cpu()).sum()).backward()
    for name in kw:  # fp32 against fp64: sums over the sequence and the state reorder
        torch.testing.assert_close(leaves[name].grad.double().cpu(), exact[name].grad, rtol=1e-3, atol=1e-3,
                                   msg=lambda m, name=name: f"d{name}: {m}")  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_a_sequence_split_in_two_continues_from_its_final_states(backend, device):
    kw = _inputs(2, 40, 4, 8, 2, 16, device=device)
    kw["initial_states"] = None
    with llmkernels.use_backend(backend):
        whole = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=16, dt_softplus=True)
        first = {k: (v[:, :25] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        second = {k: (v[:, 25:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        y1, state = llmkernels.mamba_chunk_scan_combined(**first, chunk_size=16, dt_softplus=True,
                                                         return_final_states=True)  # fmt: skip
        y2 = llmkernels.mamba_chunk_scan_combined(**{**second, "initial_states": state}, chunk_size=16,
                                                  dt_softplus=True)  # fmt: skip
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), whole, rtol=1e-4, atol=1e-4)


@needs_update_kernel
def test_decode_steps_equal_the_scan():
    """Prefill with the scan, or step Mamba-2's decode (selective_state_update on the 4-D state, per-head A / dt /
    D / dt_bias expanded as mamba_ssm's Mamba2.step passes them) token by token: the same outputs and state."""
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, 9, 4, 8, 2, 16
    kw = _inputs(batch, seqlen, nheads, headdim, ngroups, dstate)
    y, final = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=8, dt_softplus=True, return_final_states=True)
    state = kw["initial_states"].clone()
    steps = []
    for t in range(seqlen):
        steps.append(llmkernels.selective_state_update(
            state, kw["x"][:, t], kw["dt"][:, t, :, None].expand(batch, nheads, headdim),
            kw["A"][:, None, None].expand(nheads, headdim, dstate), kw["B"][:, t], kw["C"][:, t],
            kw["D"][:, None].expand(nheads, headdim), kw["z"][:, t], kw["dt_bias"][:, None].expand(nheads, headdim),
            dt_softplus=True,
        ))  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, dim=1), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,error,match", [
    (lambda kw: {"seq_idx": torch.zeros(2, 4, dtype=torch.int32)}, ValueError, "seq_idx must have shape"),
    (lambda kw: {"return_varlen_states": True}, ValueError, "return_varlen_states needs cu_seqlens"),
    (lambda kw: {"x": kw["x"][..., :3, :]}, ValueError, "dt must have shape"),
    (lambda kw: {"A": kw["A"][:, None]}, ValueError, "A must have 1 dimensions"),
    (lambda kw: {"B": kw["B"][:, :, :1].expand(2, 5, 3, 16)}, ValueError, "B must be"),
    (lambda kw: {"C": kw["C"][..., :8]}, ValueError, "C must have shape"),
    (lambda kw: {"D": torch.randn(3)}, ValueError, "D must be"),
    (lambda kw: {"chunk_size": 0}, ValueError, "chunk_size"),
    (lambda kw: {"dt_limit": (1.0, 0.5)}, ValueError, "dt_limit"),
    (lambda kw: {"dt_limit": (0.0, float("nan"))}, ValueError, "dt_limit"),
    (lambda kw: {"x": kw["x"].double()}, TypeError, "x must have dtype"),
])  # fmt: skip
def test_bad_input_is_named(change, error, match):
    kw = {**_inputs(2, 5, 4, 8, 2, 16), "chunk_size": 4}
    with pytest.raises(error, match=match):
        llmkernels.mamba_chunk_scan_combined(**{**kw, **change(kw)})


@needs_update_kernel
def test_torch_compile_fullgraph():
    kw = _inputs(2, 17, 4, 8, 2, 16)
    want = mamba_chunk_scan_ref(**kw, dt_softplus=True)

    def fn(kw):
        return llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_update_kernel
@pytest.mark.parametrize("dt_limit", [None, (0.0, 4.0)])
def test_torch_compile_dynamic_shapes(dt_limit):
    """dynamic=True: one graph over several seqlens. dt_limit from the defaults or from a variable (a module's
    attribute, as in Mamba2) reaches the checks as a symbolic float there, which must trace."""
    extra = {} if dt_limit is None else {"dt_limit": dt_limit}
    compiled = torch.compile(
        lambda kw: llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=64, dt_softplus=True, **extra),
        fullgraph=True, dynamic=True, backend="aot_eager",
    )  # fmt: skip
    for seqlen in (17, 40):
        kw = _inputs(2, seqlen, 4, 8, 2, 16)
        want = mamba_chunk_scan_ref(**kw, dt_softplus=True, **extra)
        torch.testing.assert_close(compiled(kw), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_scan_with_some_rows_of_A_constant(backend, device):
    """selective_scan_fn with A whose rows are partly one value (the C++ CPU kernels take one exp per step for
    those, ScanRow::a_const) and partly not, forward and gradients against the fp64 reference; seqlens past and
    below the kernels' W-step blocks."""
    from llmkernels.reference.selective_scan import selective_scan_ref

    for seqlen in (1, 21, 70):
        batch, dim, dstate = 2, 12, 24
        A = -0.5 - torch.rand(dim, dstate, device=device)
        A[::2] = A[::2, :1]  # even rows constant
        u, delta = torch.randn(batch, dim, seqlen, device=device), 0.5 * torch.rand(batch, dim, seqlen, device=device)
        B, C = (
            torch.randn(batch, 2, dstate, seqlen, device=device),
            torch.randn(batch, 2, dstate, seqlen, device=device),
        )
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
        exact = [t.double().cpu().requires_grad_() for t in (u, delta, A, B, C)]
        with llmkernels.use_backend(backend):
            out, last = llmkernels.selective_scan_fn(*leaves, return_last_state=True)
        ref, ref_last = selective_scan_ref(*exact, return_last_state=True)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(last.double().cpu(), ref_last, rtol=1e-4, atol=1e-4)
        dout = torch.randn(out.shape, device=device)
        (out * dout).sum().backward()
        (ref * dout.double().cpu()).sum().backward()
        for name, g, e in zip(("du", "ddelta", "dA", "dB", "dC"), (t.grad for t in leaves), (t.grad for t in exact)):
            torch.testing.assert_close(g.double().cpu(), e, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_numpy_chunk_size_and_dt_limit_are_numbers():
    np = pytest.importorskip("numpy")
    kw = _inputs(1, 6, 2, 4, 1, 8)
    with llmkernels.use_backend("reference"):
        got = llmkernels.mamba_chunk_scan_combined(
            **kw, chunk_size=np.int64(4), dt_limit=(np.float32(0), np.float32(2))
        )
        want = llmkernels.mamba_chunk_scan_combined(**kw, chunk_size=4, dt_limit=(0.0, 2.0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_update_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_ops_take_delta_per_head(dtype):
    """The C++ CPU ops with delta (batch, groups, seqlen) spread row d / (dim / groups) over channel d
    (mamba_chunk_scan_combined's CPU path): the same output as the delta spread by hand, and through the registered
    autograd the same gradients, delta's summed over each group (fp32 inside); strided x-layout u, a per-channel
    delta_bias with softplus; a group count that does not divide dim is refused by name."""
    batch, seqlen, nheads, headdim, dstate = 2, 37, 3, 16, 8
    dim = nheads * headdim
    u = torch.randn(batch, seqlen, dim).to(dtype).transpose(1, 2)  # time-strided, as Mamba-2's channels view
    A = (-0.5 - torch.rand(nheads, 1, 1)).expand(nheads, headdim, dstate).reshape(dim, dstate)
    B, C = torch.randn(batch, 1, dstate, seqlen).to(dtype), torch.randn(batch, 1, dstate, seqlen).to(dtype)
    D, bias = torch.randn(dim), 0.5 * torch.rand(dim) - 0.25
    delta = (0.5 * torch.rand(batch, nheads, seqlen) - 0.2).to(dtype)

    def run(spread):
        leaves = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, bias)]
        d = leaves[1]
        if spread:
            d = d[:, :, None, :].expand(batch, nheads, headdim, seqlen).reshape(batch, dim, seqlen)
        out, last = torch.ops.llmkernels.selective_scan_fwd(leaves[0], d, *leaves[2:6], None, leaves[6], True, None)
        torch.manual_seed(1)
        (out.float() * torch.randn(out.shape)).sum().backward()
        return out, last, [t.grad for t in leaves]

    got_out, got_last, got_grads = run(spread=False)
    want_out, want_last, want_grads = run(spread=True)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(got_last, want_last, rtol=0, atol=0)
    for name, g, w in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dbias"), got_grads, want_grads):
        tol = dict(rtol=0, atol=0)  # the same arithmetic
        if name == "ddelta":  # the group's sum in another order; in bf16 summed in fp32 then rounded once, where
            # the spread delta's gradient rounds each channel's row to bf16 before autograd sums them
            scale = 1e-6 if dtype == torch.float32 else 2e-2
            tol = dict(rtol=scale, atol=scale * w.float().abs().max().item())
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # the fake kernels agree (shapes, strides, dtypes), a strided per-head delta included
    args = (u, delta.transpose(1, 2).contiguous().transpose(1, 2), A, B, C, D, None, bias, True, None)
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_fwd.default, args)
    dout = torch.randn(batch, dim, seqlen).to(dtype)
    torch.library.opcheck(torch.ops.llmkernels.selective_scan_bwd.default, (dout, None, *args))
    with pytest.raises((ValueError, RuntimeError), match="delta"):
        torch.ops.llmkernels.selective_scan_fwd(u, torch.rand(batch, 5, seqlen), A, B, C, None, None, None, True, None)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_heads_of_zero_channels_backward(backend):
    """headdim 0 (a degenerate shape): the CPU backward divided by the channels per head (0) and killed the process
    with SIGFPE; now every gradient is empty or zero, as the reference's."""
    if backend == "cpu" and not llmkernels._ext.has_kernel("selective_scan_bwd", "CPU"):
        pytest.skip("no C++ CPU kernel for llmkernels::selective_scan_bwd")
    x = torch.randn(1, 4, 2, 0, requires_grad=True)
    dt, A = torch.randn(1, 4, 2, requires_grad=True), (-torch.rand(2)).requires_grad_()
    B, C = torch.randn(1, 4, 1, 3, requires_grad=True), torch.randn(1, 4, 1, 3, requires_grad=True)
    with llmkernels.use_backend(backend):
        y = llmkernels.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=4)
        grads = torch.autograd.grad(y.sum(), [x, dt, A, B, C], allow_unused=True)
    assert y.shape == x.shape
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and not g.any())
