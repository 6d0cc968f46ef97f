"""The C++ CPU kernels' SiLU gates at the edges of fp32 (the scan's and the decode step's z, the conv's activation,
the gated norm's z), forward and backward, against the reference's torch.nn.functional.silu: silu(-inf) is NaN there
(-inf / inf), silu of a huge negative input -0, silu(inf) inf, NaN stays NaN. The kernels' exp clamps its argument,
which once left sigmoid(-inf) at ~1e-38 and so silu(-inf) = -inf. Default instruction set, AVX2 and portable code."""

import pytest
import torch
from utils import run_with_cpu_isa

import llmkernels
from llmkernels import _ext

needs_ext = pytest.mark.skipif(
    not all(_ext.has_kernel(k, "CPU") for k in ("selective_scan_fwd", "causal_conv1d_fwd", "rmsnorm_gated_fwd")),
    reason=f"no C++ CPU scan / conv / norm kernels (extension: {_ext.load_error or 'built without them'})",
)
EDGES = [-float("inf"), float("inf"), float("nan"), -1e30, -90.0, -87.0, -20.0, 0.0, 3.0, 1e30]
DTYPES = [torch.float32, torch.bfloat16]


def _with_edges(shape, dtype, dim=-1):
    """Random values with EDGES laid along the last dimension's first entries (where `dim` is -1) or dim 1."""
    t = torch.randn(shape)
    edges = torch.tensor(EDGES)
    if dim == -1:
        t[..., : len(EDGES)] = edges
    else:
        t[:, : len(EDGES)] = edges.view(-1, *([1] * (t.dim() - 2)))
    return t.to(dtype)


def _both(fn, leaves):
    """fn's output and gradients on the C++ CPU kernels and on the reference, from the same leaves and dout."""
    results = []
    dout = None
    for backend in ("cpu", "reference"):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        with llmkernels.use_backend(backend):
            out = fn(*xs)
            dout = torch.randn_like(out) if dout is None else dout
            results.append((out, torch.autograd.grad(out, xs, dout)))
    return results


def _assert_same(got, want, dtype, what):
    """Outputs equal, NaN for NaN and inf for inf; gradients non-finite where the reference's are and close elsewhere
    (which non-finite value a gradient gets can depend on summation order once infinities of both signs meet, e.g.
    through the state after an infinite gate)."""
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, equal_nan=True, **tol, msg=lambda m: f"{what} output: {m}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(g), finite), f"{what} gradient {i}: non-finite elsewhere than torch's"
        torch.testing.assert_close(g[finite], r[finite], **tol, msg=lambda m, i=i: f"{what} gradient {i}: {m}")


def check_all(dtype):
    torch.manual_seed(0)
    # the scan: the edges in z (batch, dim, seqlen), one edge per channel at every step
    batch, dim, seqlen, dstate = 1, len(EDGES), 7, 4
    u = torch.randn(batch, dim, seqlen).to(dtype)
    delta = (0.5 * torch.rand(batch, dim, seqlen)).to(dtype)
    A, B, C = -torch.rand(dim, dstate), torch.randn(dim, dstate), torch.randn(dim, dstate)
    z = _with_edges((batch, dim, seqlen), dtype, dim=1)

    def scan(u, z):
        return llmkernels.selective_scan_fn(u, delta, A, B, C, z=z)

    _assert_same(*_both(scan, [u, z]), dtype, "selective_scan_fn z")
    # the decode step (no gradient): z (batch, dim)
    state = torch.randn(batch, dim, dstate)
    outs = []
    for backend in ("cpu", "reference"):
        with llmkernels.use_backend(backend):
            outs.append(llmkernels.selective_state_update(state.clone(), u[..., 0], delta[..., 0], A, B[:1], C[:1],
                                                          z=z[..., 0]))  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True, rtol=2e-2, atol=2e-2)
    # the conv: the edges in x at the last step, where they are the pre-activation (a tap of weight 1, no bias)
    x = torch.zeros(1, dim, 5)
    x[0, :, -1] = torch.tensor(EDGES)
    x = x.to(dtype)
    weight = torch.zeros(dim, 3)
    weight[:, -1] = 1.0
    weight = weight.to(dtype)

    def conv(x):
        return llmkernels.causal_conv1d_fn(x, weight, None, activation="silu")

    _assert_same(*_both(conv, [x]), dtype, "causal_conv1d_fn")
    x_time_major = x.transpose(1, 2).contiguous().transpose(1, 2)
    _assert_same(*_both(conv, [x_time_major]), dtype, "causal_conv1d_fn (time-major x)")
    # the norm: the edges in the gate, before and after the norm
    xs, gate = torch.randn(3, 32).to(dtype), _with_edges((3, 32), dtype)
    norm_weight = (1 + 0.3 * torch.randn(32)).to(dtype)
    for before in (True, False):

        def norm(xs, gate, before=before):
            return llmkernels.rmsnorm_fn(xs, norm_weight, None, z=gate, eps=1e-5, norm_before_gate=before)

        _assert_same(*_both(norm, [xs, gate]), dtype, f"rmsnorm_fn norm_before_gate={before}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_silu_gates_at_the_edges_match_torch(dtype):
    check_all(dtype)


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_silu_gates_at_the_edges_other_instruction_sets(isa):
    code = "import torch, test_silu_extremes as t\nfor d in t.DTYPES:\n    t.check_all(d)\n"
    run_with_cpu_isa(isa, code, "selective_scan")
