"""mamba_split_conv1d_scan_combined (Mamba-2's mixer after in_proj, mamba_ssm's signature) against its reference,
and the reference against transformers' Mamba2Mixer (its PyTorch path computes the same block from in_proj's output).
"""

import inspect

import pytest
import torch

import llmkernels
from llmkernels import _ext
from llmkernels.reference.mamba_split_scan import mamba_split_conv1d_scan_ref
from llmkernels.reference.rmsnorm_gated import rmsnorm_gated_ref

needs_ext = pytest.mark.skipif(not _ext.has_kernel("selective_scan_fwd", "CPU"), reason="no C++ CPU scan kernel")
conv_takes_seq_idx = "seq_idx" in inspect.signature(llmkernels.causal_conv1d_fn).parameters
needs_conv_seq_idx = pytest.mark.skipif(not conv_takes_seq_idx, reason="causal_conv1d_fn has no seq_idx yet")


def _inputs(batch=2, seqlen=19, nheads=4, headdim=8, ngroups=2, dstate=6, width=4, d_mlp=0, out_dim=24,
            dtype=torch.float32, d_2d=True):  # fmt: skip
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    return dict(
        zxbcdt=torch.randn(batch, seqlen, 2 * d_mlp + dim + conv_dim + nheads).to(dtype),
        conv1d_weight=(torch.randn(conv_dim, width) / width**0.5).to(dtype),
        conv1d_bias=(0.1 * torch.randn(conv_dim)).to(dtype),
        dt_bias=0.3 * torch.randn(nheads),
        A=-0.2 - torch.rand(nheads),
        D=torch.randn(nheads, headdim) if d_2d else torch.randn(nheads),
        chunk_size=64,
        initial_states=torch.randn(batch, nheads, headdim, dstate),
        rmsnorm_weight=1 + 0.1 * torch.randn(dim),
        outproj_weight=(torch.randn(out_dim, d_mlp + dim) / dim**0.5).to(dtype),
        outproj_bias=torch.randn(out_dim).to(dtype),
        headdim=headdim,
        ngroups=ngroups,
    )


VARIANTS = {
    "full": {},
    "mlp-part": dict(d_mlp=5),
    "norm-after-gate": dict(norm_before_gate=False),
    "no-norm": dict(rmsnorm_weight=None),
    "no-outproj": dict(outproj_weight=None, outproj_bias=None),
    "D-1d": dict(d_2d=False),
    "seqlen-1": dict(seqlen=1),
    "no-init": dict(initial_states=None, conv1d_bias=None, activation=None),
}
SHAPE_KEYS = ("batch", "seqlen", "d_mlp", "d_2d")


def _case(name, dtype=torch.float32):
    variant = dict(VARIANTS[name])
    kw = _inputs(dtype=dtype, **{k: variant.pop(k) for k in SHAPE_KEYS if k in variant})
    kw.update(variant)
    return kw


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_with_gradients(variant, dtype):
    kw = _case(variant, dtype)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    out, final = llmkernels.mamba_split_conv1d_scan_combined(**kw, return_final_states=True)
    ref_kw = {k: (v.detach().float().requires_grad_() if k in leaves else v) for k, v in kw.items()}
    ref_out, ref_final = mamba_split_conv1d_scan_ref(**ref_kw, return_final_states=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=4e-2, atol=6e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(final, ref_final, **tol)
    gout, gfinal = torch.randn_like(ref_out), torch.randn_like(ref_final)
    grads = torch.autograd.grad([out, final], list(leaves.values()), [gout.to(dtype), gfinal])
    ref_grads = torch.autograd.grad([ref_out, ref_final], [ref_kw[k] for k in leaves], [gout, gfinal])
    for name, g, rg in zip(leaves, grads, ref_grads):
        scale = max(1.0, rg.abs().max().item())  # weight / bias gradients sum over batch x seqlen
        torch.testing.assert_close(g.float(), rg, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4 * scale,
                                   msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip


@needs_ext
@needs_conv_seq_idx
def test_packed_sequences_equal_each_sequence_alone():
    kw = _inputs(batch=1, seqlen=23)
    kw["initial_states"] = None
    lengths = [9, 1, 13]
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].int()
    packed = llmkernels.mamba_split_conv1d_scan_combined(**kw, seq_idx=seq_idx)
    pieces, start = [], 0
    for n in lengths:
        part = {**kw, "zxbcdt": kw["zxbcdt"][:, start : start + n]}
        pieces.append(llmkernels.mamba_split_conv1d_scan_combined(**part))
        start += n
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), rtol=1e-5, atol=1e-5)
    ref = mamba_split_conv1d_scan_ref(**kw, seq_idx=seq_idx)
    torch.testing.assert_close(packed, ref, rtol=2e-4, atol=2e-4)


def test_reference_equals_transformers_mamba2_mixer():
    """transformers' Mamba2Mixer (its PyTorch path, no cache) is this block after its in_proj: an independent
    formulation (chunked SSD in PyTorch, its own gated RMSNorm with norm_before_gate=False)."""
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from transformers import Mamba2Config

    cfg = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=2, expand=2, conv_kernel=4,
                       chunk_size=8, num_hidden_layers=1, vocab_size=16, use_conv_bias=True)  # fmt: skip
    torch.manual_seed(0)
    mixer = modeling.Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        mixer.dt_bias.normal_(0, 0.3)
        mixer.D.normal_()
        mixer.norm.weight.add_(0.1 * torch.randn_like(mixer.norm.weight))
    h = torch.randn(2, 21, 32)
    with torch.no_grad():
        want = mixer(h)
        got = mamba_split_conv1d_scan_ref(
            mixer.in_proj(h), mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, -torch.exp(mixer.A_log),
            mixer.D, cfg.chunk_size, rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.variance_epsilon,
            outproj_weight=mixer.out_proj.weight, outproj_bias=mixer.out_proj.bias, headdim=cfg.head_dim,
            ngroups=cfg.n_groups, norm_before_gate=False,
        )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gated_rmsnorm_gate_order():
    x, z, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8) + 0.5
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    silu = torch.nn.functional.silu
    torch.testing.assert_close(rmsnorm_gated_ref(x, w, None, z, 1e-6, 8, True), rms(x) * w * silu(z))
    torch.testing.assert_close(rmsnorm_gated_ref(x, w, None, z, 1e-6, 8, False), rms(x * silu(z)) * w)
    grouped = rmsnorm_gated_ref(x, w, None, None, 1e-6, 4, True)
    torch.testing.assert_close(grouped, torch.cat([rms(x[:, :4]), rms(x[:, 4:])], -1) * w)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(D=torch.randn(4), headdim=None), "D must be"),
        (dict(ngroups=3), "ngroups"),
        (dict(conv1d_weight=torch.randn(50, 4)), "conv1d_weight"),
        (dict(zxbcdt=torch.randn(2, 19, 101)), "zxbcdt's last dim"),
        (dict(A=torch.randn(5)), "A must have shape"),
        (dict(rmsnorm_weight=torch.randn(7)), "rmsnorm_weight must have shape"),
        (dict(outproj_weight=torch.randn(24, 31)), "outproj_weight must have shape"),
        (dict(outproj_weight=torch.randn(24, 32, dtype=torch.float64)), "outproj_weight"),
        (dict(activation="relu"), "activation"),
        (dict(outproj_weight=None), "outproj_bias without outproj_weight"),
    ],
    ids=["D", "ngroups", "conv", "zxbcdt", "A", "norm", "outproj", "outproj-dtype", "activation", "bias-alone"],
)
def test_bad_input_is_named(change, match):
    kw = {**_inputs(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        llmkernels.mamba_split_conv1d_scan_combined(**kw)
