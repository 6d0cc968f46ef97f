"""llmkernels.mamba_inner_fn (mamba_ssm's signature): against MambaMixer (Hugging Face's MambaMixer math, which
tests/selective_scan/test_mamba_mixer.py checks) on the same weights, gradients included, and against the
reference composition in fp64 on each backend."""

from __future__ import annotations

import pytest
import torch

import llmkernels
from llmkernels import _ext
from llmkernels.nn import MambaMixer
from llmkernels.reference.mamba_inner import mamba_inner_ref

needs_ext = pytest.mark.skipif(
    not _ext.has_kernel("selective_scan_fwd", "CPU"), reason=f"no C++ CPU scan kernel ({_ext.load_error})"
)


def _mixer(seed=0, conv_bias=True):
    torch.manual_seed(seed)
    m = MambaMixer(hidden_size=32, state_size=8, conv_kernel=4, expand=2, time_step_rank=4, use_conv_bias=conv_bias)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _inner_args(m: MambaMixer, h: torch.Tensor) -> tuple:
    """mamba_inner_fn's arguments for the mixer's weights (xz from its in_proj, as mamba_ssm's Mamba does)."""
    xz = m.in_proj(h).transpose(1, 2)
    A = -torch.exp(m.A_log.float())
    return (xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight,
            m.out_proj.bias, A)  # fmt: skip


@needs_ext
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("seqlen", [1, 17, 64])
def test_equals_the_mixer_with_gradients(conv_bias, seqlen):
    m = _mixer(conv_bias=conv_bias)
    h = torch.randn(2, seqlen, 32, requires_grad=True)
    ref = m(h)
    ref_grads = torch.autograd.grad(ref.square().sum(), [h, *m.parameters()])
    args = _inner_args(m, h)
    out = llmkernels.mamba_inner_fn(*args, D=m.D.float(), delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [h, *m.parameters()], allow_unused=True)
    for (name, _), g, r in zip([("h", None), *m.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("given", ["none", "B", "C", "biases"])
def test_matches_the_fp64_reference(backend, given):
    """B or C given instead of taken from x (x_proj then has fewer rows), or per-token projection biases."""
    torch.manual_seed(1)
    batch, d_inner, dstate, rank, seqlen, d_model = 2, 16, 4, 3, 19, 12
    rows = rank + dstate * ((given != "B") + (given != "C"))
    xz = torch.randn(batch, 2 * d_inner, seqlen)
    weights = dict(
        conv1d_weight=0.5 * torch.randn(d_inner, 1, 3), conv1d_bias=0.1 * torch.randn(d_inner),
        x_proj_weight=0.3 * torch.randn(rows, d_inner), delta_proj_weight=0.5 * torch.randn(d_inner, rank),
        out_proj_weight=0.2 * torch.randn(d_model, d_inner), out_proj_bias=0.1 * torch.randn(d_model),
        A=-torch.rand(d_inner, dstate) - 0.5,
    )  # fmt: skip
    extra = dict(D=torch.randn(d_inner), delta_bias=0.1 * torch.randn(d_inner))
    if given == "B":
        extra["B"] = torch.randn(d_inner, dstate)
    elif given == "C":
        extra["C"] = torch.randn(batch, dstate, seqlen)
    elif given == "biases":
        extra.update(B_proj_bias=0.1 * torch.randn(dstate), C_proj_bias=0.1 * torch.randn(dstate))
    leaves = {k: v.clone().requires_grad_() for k, v in {"xz": xz, **weights}.items()}
    with llmkernels.use_backend(backend):
        out = llmkernels.mamba_inner_fn(**leaves, **extra)
    grads = torch.autograd.grad(out.square().sum(), list(leaves.values()))
    exact_leaves = {k: v.double().requires_grad_() for k, v in {"xz": xz, **weights}.items()}
    exact_leaves["A"] = exact_leaves["A"].detach().float().requires_grad_()  # A stays fp32 (the scan's contract)
    exact_extra = {k: (v.double() if k not in ("D", "delta_bias") else v) for k, v in extra.items()}
    exact = mamba_inner_ref(**exact_leaves, **exact_extra)
    exact_grads = torch.autograd.grad(exact.square().sum(), list(exact_leaves.values()))
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    for name, g, e in zip(leaves, grads, exact_grads):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")


def _by_hand(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B=None,
    C=None,
    D=None,
    delta_bias=None,
    B_proj_bias=None,
    C_proj_bias=None,
):
    """mamba_ssm's inner block written out step by step (fp64), independently of mamba_inner_ref's code."""
    from llmkernels.reference.selective_scan import selective_scan_ref  # (the scan itself is tested elsewhere)

    d_inner, width = xz.shape[1] // 2, conv1d_weight.shape[-1]
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    x = torch.nn.functional.conv1d(x, conv1d_weight, conv1d_bias, padding=width - 1, groups=d_inner)
    x = torch.nn.functional.silu(x[..., : xz.shape[-1]])
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    proj = torch.einsum("bdl,rd->blr", x, x_proj_weight)
    delta = torch.einsum("blr,dr->bdl", proj[..., :rank], delta_proj_weight)
    col = rank
    if B is None:
        B = (proj[..., col : col + n] + (0 if B_proj_bias is None else B_proj_bias)).transpose(1, 2)
        col += n
    if C is None:
        C = (proj[..., col : col + n] + (0 if C_proj_bias is None else C_proj_bias)).transpose(1, 2)
    y = selective_scan_ref(x, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    return torch.einsum("bdl,md->blm", y, out_proj_weight) + out_proj_bias


@pytest.mark.parametrize("given", ["none", "B", "C", "biases"])
def test_definition_by_hand(given):
    """The reference composition against the steps written out (so the slicing of x_proj's output into dt, B
    and C, and where the projection biases go, are checked by other code than their definition)."""
    torch.manual_seed(2)
    batch, d_inner, dstate, rank, seqlen = 2, 6, 3, 2, 7
    rows = rank + dstate * ((given != "B") + (given != "C"))
    w = dict(conv1d_weight=0.5 * torch.randn(d_inner, 1, 4), conv1d_bias=0.1 * torch.randn(d_inner),
             x_proj_weight=0.3 * torch.randn(rows, d_inner), delta_proj_weight=0.5 * torch.randn(d_inner, rank),
             out_proj_weight=0.2 * torch.randn(5, d_inner), out_proj_bias=0.1 * torch.randn(5))  # fmt: skip
    w = {k: v.double() for k, v in w.items()}
    A = -torch.rand(d_inner, dstate) - 0.5
    extra = dict(D=torch.randn(d_inner), delta_bias=0.1 * torch.randn(d_inner))
    if given == "B":
        extra["B"] = torch.randn(d_inner, dstate).double()
    elif given == "C":
        extra["C"] = torch.randn(batch, dstate, seqlen).double()
    elif given == "biases":
        extra.update(B_proj_bias=torch.randn(dstate).double(), C_proj_bias=torch.randn(dstate).double())
    xz = torch.randn(batch, 2 * d_inner, seqlen).double()
    ours = mamba_inner_ref(xz, *w.values(), A, **extra)
    torch.testing.assert_close(ours, _by_hand(xz, *w.values(), A, **extra), rtol=1e-9, atol=1e-9)


@needs_ext
def test_autocast_with_fp32_weights():
    """mamba_ssm's Mamba layer keeps fp32 parameters and runs under autocast: xz comes out of in_proj in bf16 and
    the projections run in bf16 too."""
    m = _mixer()
    h = torch.randn(2, 9, 32)
    args = _inner_args(m, h)
    kw = dict(D=m.D.float(), delta_bias=m.dt_proj.bias.float())
    ref = llmkernels.mamba_inner_fn(*args, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = llmkernels.mamba_inner_fn(args[0].bfloat16(), *args[1:], **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@needs_ext
def test_compiles_fullgraph():
    m = _mixer()
    h = torch.randn(2, 9, 32)
    args = _inner_args(m, h)
    kw = dict(D=m.D.float(), delta_bias=m.dt_proj.bias.float())
    fn = torch.compile(llmkernels.mamba_inner_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*args, **kw), llmkernels.mamba_inner_fn(*args, **kw))


def test_bad_arguments_name_them():
    m = _mixer()
    args = list(_inner_args(m, torch.randn(1, 5, 32)))
    call = llmkernels.mamba_inner_fn
    with pytest.raises(ValueError, match="xz must be"):
        call(args[0][:, 1:], *args[1:])
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        call(*args[:3], args[3][1:], *args[4:])
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):  # B given: x_proj has no B rows then
        call(*args, B=torch.randn(64, 8))
    with pytest.raises(TypeError, match="out_proj_weight must have the dtype of xz"):
        call(*args[:5], args[5].double(), *args[6:])
    with pytest.raises(NotImplementedError, match="dt_rms_weight"):
        call(*args, dt_rms_weight=torch.ones(64))
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        call(*args, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        call(*args, checkpoint_lvl=2)
    with pytest.raises(ValueError, match="out_proj_bias must have shape"):
        call(*args[:6], torch.zeros(args[5].shape[0] + 2), *args[7:])
    with pytest.raises(ValueError, match="B_proj_bias must have shape"):
        call(*args, B_proj_bias=torch.zeros(3))
