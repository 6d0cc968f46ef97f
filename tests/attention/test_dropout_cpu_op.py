"""Attention dropout in the C++ CPU kernels, through the ops themselves (torch.ops.llmkernels.flash_attn_fwd / _bwd and
the varlen pair, dropout_p and dropout_seed as their last arguments): outputs and gradients against the reference with
the same seed (llmkernels/reference/dropout.py draws the mask), within the tolerances of no dropout since the masks
must be identical: fp32 against fp64, bf16 within a few times the error of the bf16 reference. Covers GQA (every
query head of a group draws its own mask), causal and windowed bands (windows start key blocks at any key), the
few-row decode path, the bf16 vdpbf16ps paths, the AMX tile kernels (on AMX CPUs: shown to have run by results that
differ from those with LLMKERNELS_CPU_AMX=0), packed sequences (each draws as its own batch row), that a mask drawn for
another seed, head or sequence fails, and the argument checks."""

from __future__ import annotations

import pytest
import torch
from attn_cases import needs_cpu_kernel, random_qkv
from utils import assert_error_within_ratio, cpu_has_flag, saved_with_amx_on_and_off

import llmkernels  # noqa: F401  (loads the ops)
from llmkernels.reference.attention import flash_attn_fwd_ref, flash_attn_varlen_fwd_ref

pytestmark = needs_cpu_kernel

ops = torch.ops.llmkernels
NHEADS, NHEADS_K = 8, 2
# (window_left, window_right): full, causal, a window whose first key is rarely a multiple of 8.
MASKS = {"full": (-1, -1), "causal": (-1, 0), "window": (13, 7)}


def new_seed() -> torch.Tensor:
    return torch.randint(0, 2**32, (2,), dtype=torch.int64)


def run_op(q, k, v, window, p, seed, dout):
    scale = q.shape[-1] ** -0.5
    out, lse = ops.flash_attn_fwd(q, k, v, scale, *window, 0.0, None, p, seed)
    grads = ops.flash_attn_bwd(dout, q, k, v, out, lse, scale, *window, 0.0, None, None, p, seed)
    return out, lse, grads


def reference(q, k, v, window, p, seed, dout, upcast=True, **kw):
    """(out, lse, [dq, dk, dv]) of the reference (fp64 for fp32 inputs when upcast, else in the inputs' dtype)."""
    dtype = torch.float64 if upcast and q.dtype == torch.float32 else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_fwd_ref(*leaves, q.shape[-1] ** -0.5, *window, 0.0, upcast, None, p, seed, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), lse, grads


def check_against_reference(out, lse, grads, q, k, v, window, p, seed, dout):
    ref_out, ref_lse, ref_grads = reference(q, k, v, window, p, seed, dout)
    # lse is that of the scores, untouched by dropout (bf16 on AMX: its exp2 is a degree-3 fit, amx_common.h)
    lse_tol = 1e-5 if q.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse, ref_lse.float(), rtol=lse_tol, atol=lse_tol)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:  # reordered fp32 sums, scaled by up to 1 / (1 - p)
        mag = 1.0 / (1.0 - p)
        for name, x, r in zip(names, (out, *grads), (ref_out, *ref_grads)):
            atol = 2e-5 * mag * max(1.0, r.abs().max().item())
            torch.testing.assert_close(x.double(), r, rtol=2e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    else:
        same_out, _, same_grads = reference(q, k, v, window, p, seed, dout, upcast=False)
        exact_out, _, exact_grads = reference(q.float(), k.float(), v.float(), window, p, seed, dout.float())
        for name, x, r, s in zip(names, (out, *grads), (exact_out, *exact_grads), (same_out, *same_grads)):
            assert_error_within_ratio(x, r.float(), s.float(), ratio=3.0, floor=bf16_floor(r, p), name=name)


def bf16_floor(ref, p):
    """The usual floor (4 bf16 roundings of the largest value) times 1 / (1 - p): the backward's D = rowsum(dO * O)
    reads the bf16-rounded output, whose rounding error grows with the kept probabilities' scale (with one key, say,
    the reference's dS is exactly 0, the kernel's that rounding error)."""
    return 4 * 7.8e-3 * max(1.0, ref.abs().max().item()) / (1.0 - p)


# seqlen_q x seqlen_k: decode rows (the few-row path), ragged tiles, more than one query / key block.
SHAPES = [(1, 1), (1, 200), (3, 5), (3, 200), (17, 17), (17, 64), (64, 64), (130, 5), (130, 200)]


@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("headdim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference(dtype, headdim, seqlen_q, seqlen_k):
    # the mask and p vary with the case, so that every combination of them is met across the grid
    index = SHAPES.index((seqlen_q, seqlen_k)) + headdim // 32
    window = list(MASKS.values())[index % 3]
    p = (0.1, 0.5, 0.9)[(index // 3 + (dtype == torch.bfloat16)) % 3]
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, NHEADS, NHEADS_K, headdim, dtype, "cpu")
    dout = torch.randn_like(q)
    seed = new_seed()
    out, lse, grads = run_op(q, k, v, window, p, seed, dout)
    check_against_reference(out, lse, grads, q, k, v, window, p, seed, dout)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_every_mask_and_rate(mask, p):
    q, k, v = random_qkv(1, 70, 150, NHEADS, NHEADS_K, 64, torch.float32, "cpu")
    dout = torch.randn_like(q)
    seed = new_seed()
    out, lse, grads = run_op(q, k, v, MASKS[mask], p, seed, dout)
    check_against_reference(out, lse, grads, q, k, v, MASKS[mask], p, seed, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrong_mask_is_caught(dtype):
    """The same call against references that draw the mask for another seed, other heads (the GQA group's heads in
    another order) or another batch row: each must miss by far more than the tolerance, so that a kernel drawing any
    of them would fail the tests above."""
    q, k, v = random_qkv(2, 33, 70, NHEADS, NHEADS_K, 64, dtype, "cpu")
    dout = torch.randn_like(q)
    seed, p, window = new_seed(), 0.5, (-1, -1)
    out, _, _ = run_op(q, k, v, window, p, seed, dout)
    ref_out, _, _ = reference(q, k, v, window, p, seed, dout)
    good = (out.double() - ref_out.double()).abs().max().item()
    assert good < 0.05

    other_seed = seed.clone()
    other_seed[1] ^= 1
    wrong = {"seed": reference(q, k, v, window, p, other_seed, dout)[0], "batch row": reference(
        q, k, v, window, p, seed, dout, first_b=1)[0]}  # fmt: skip
    perm = torch.arange(NHEADS).view(NHEADS_K, -1).flip(1).reshape(-1)  # heads reversed within each group
    qp = q[:, :, perm]
    wrong["head"] = reference(qp, k, v, window, p, seed, dout[:, :, perm])[0][:, :, perm.argsort()]
    for name, r in wrong.items():
        err = (out.double() - r.double()).abs().max().item()
        assert err > 20 * good + 0.1, f"the mask drawn for another {name} matches too ({err:.3e})"


def test_dropout_is_a_function_of_the_seed():
    q, k, v = random_qkv(1, 40, 90, NHEADS, NHEADS_K, 32, torch.float32, "cpu")
    scale = 32**-0.5
    seed = new_seed()
    a = ops.flash_attn_fwd(q, k, v, scale, -1, -1, 0.0, None, 0.3, seed)[0]
    b = ops.flash_attn_fwd(q, k, v, scale, -1, -1, 0.0, None, 0.3, seed.clone())[0]
    c = ops.flash_attn_fwd(q, k, v, scale, -1, -1, 0.0, None, 0.3, seed + 1)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zero_is_no_dropout(dtype):
    """dropout_p = 0 (with or without a seed) is bitwise the call without the arguments."""
    q, k, v = random_qkv(2, 80, 100, NHEADS, NHEADS_K, 64, dtype, "cpu")
    dout = torch.randn_like(q)
    scale = 0.125
    base_out, base_lse = ops.flash_attn_fwd(q, k, v, scale, -1, 0, 0.0)
    base_grads = ops.flash_attn_bwd(dout, q, k, v, base_out, base_lse, scale, -1, 0, 0.0)
    for seed in (None, new_seed()):
        out, lse, grads = run_op(q, k, v, (-1, 0), 0.0, seed, dout)
        assert torch.equal(out, base_out) and torch.equal(lse, base_lse)
        for g, b in zip(grads, base_grads):
            assert torch.equal(g, b)


def packed(lens_q, lens_k, q_start, q_end_pad, d, dtype, generator=None):
    """cu_seqlens_q / _k (the queries from row q_start, q_end_pad rows after the last), q, k, v, dout."""
    cu_q = torch.tensor([q_start] + [q_start + sum(lens_q[: i + 1]) for i in range(len(lens_q))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(lens_k[: i + 1]) for i in range(len(lens_k))], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]) + q_end_pad, NHEADS, d, generator=generator).to(dtype)
    k, v = (torch.randn(int(cu_k[-1]), NHEADS_K, d, generator=generator).to(dtype) for _ in range(2))
    return cu_q, cu_k, q, k, v, torch.randn(q.shape, generator=generator).to(dtype)


def run_varlen_op(q, k, v, cu_q, cu_k, window, p, seed, dout):
    lens_q, lens_k = (cu.diff().tolist() for cu in (cu_q, cu_k))
    args = (cu_q, cu_k, max(lens_q), max(lens_k), q.shape[-1] ** -0.5, *window, 0.0)
    out, lse = ops.flash_attn_varlen_fwd(q, k, v, *args, None, p, seed)
    grads = ops.flash_attn_varlen_bwd(dout, q, k, v, out, lse, *args, None, None, p, seed)
    return out, lse, grads


def check_varlen_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, window, p, seed, dout):
    dtype, scale = q.dtype, q.shape[-1] ** -0.5

    def ref(dt, upcast=True):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, s = flash_attn_varlen_fwd_ref(*leaves, cu_q, cu_k, scale, *window, 0.0, upcast, None, p, seed)
        return o.detach(), s, torch.autograd.grad(o, leaves, dout.to(o.dtype))

    ref_out, ref_lse, ref_grads = ref(torch.float64 if dtype == torch.float32 else torch.float32)
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-3  # (bf16 on AMX: as check_against_reference)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=lse_tol, atol=lse_tol)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, x, r in zip(names, (out, *grads), (ref_out, *ref_grads)):
            atol = 4e-5 * max(1.0, r.abs().max().item())
            torch.testing.assert_close(x.double(), r, rtol=2e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    else:
        same_out, _, same_grads = ref(dtype, upcast=False)
        for name, x, r, s in zip(names, (out, *grads), (ref_out, *ref_grads), (same_out, *same_grads)):
            assert_error_within_ratio(x, r.float(), s.float(), ratio=3.0, floor=bf16_floor(r, p), name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_dropout(dtype):
    """Packed sequences (an empty one, rows outside every sequence) draw as batch rows 0, 1, ... with positions
    counted within the sequence."""
    cu_q, cu_k, q, k, v, dout = packed([5, 0, 70, 1, 33], [9, 4, 130, 17, 33], 2, 3, 64, dtype)
    seed, p, window = new_seed(), 0.4, (20, 0)
    out, lse, grads = run_varlen_op(q, k, v, cu_q, cu_k, window, p, seed, dout)
    check_varlen_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, window, p, seed, dout)


# bf16 calls that the AMX tile kernels take (head dims multiples of 32, 16 query rows or more in the forward; the
# backward takes any bf16 call): name -> (batch, seqlen_q, seqlen_k, headdim, window, dropout_p), all GQA (8 query
# heads on 2 KV heads). Lengths past one block of rows (128) and of keys (256 forward, 128 backward), and ragged.
AMX_CASES = {
    "d64-causal": (2, 300, 300, 64, (-1, 0), 0.1),
    "d128-full": (1, 200, 333, 128, (-1, -1), 0.5),
    "d128-causal-more-keys": (1, 64, 260, 128, (-1, 0), 0.3),
    "d64-window": (1, 130, 260, 64, (13, 7), 0.2),
}
# packed sequences (d 64, causal, p 0.25): the 5-row one takes the vdpbf16ps forward, the AMX backward
AMX_VARLEN = ([70, 5, 300], [70, 40, 300])


def amx_dropout_runs() -> dict:
    """Inputs and results of the AMX_CASES and of AMX_VARLEN ("varlen"), all drawn from fixed seeds: run in two
    processes, with the AMX tiles allowed and not (test_amx_applies_dropout)."""
    g = torch.Generator().manual_seed(0)
    runs = {}
    for name, (batch, sq, sk, d, window, p) in AMX_CASES.items():
        q, k, v, dout = (torch.randn(batch, s, h, d, generator=g).to(torch.bfloat16)
                         for s, h in ((sq, NHEADS), (sk, NHEADS_K), (sk, NHEADS_K), (sq, NHEADS)))  # fmt: skip
        seed = torch.randint(0, 2**32, (2,), dtype=torch.int64, generator=g)
        out, lse, grads = run_op(q, k, v, window, p, seed, dout)
        runs[name] = dict(q=q, k=k, v=v, dout=dout, seed=seed, out=out, lse=lse, grads=grads)
    cu_q, cu_k, q, k, v, dout = packed(*AMX_VARLEN, 0, 0, 64, torch.bfloat16, g)
    seed = torch.randint(0, 2**32, (2,), dtype=torch.int64, generator=g)
    out, lse, grads = run_varlen_op(q, k, v, cu_q, cu_k, (-1, 0), 0.25, seed, dout)
    runs["varlen"] = dict(q=q, k=k, v=v, dout=dout, seed=seed, out=out, lse=lse, grads=grads, cu_q=cu_q, cu_k=cu_k)
    return runs


@pytest.fixture(scope="module")
def amx_runs():
    """(runs with the AMX tiles, runs without): amx_dropout_runs in a process each (the flag is read once)."""
    code = ("sys.path[:0] = ['tests', 'tests/attention']; import torch; from test_dropout_cpu_op import "
            "amx_dropout_runs; torch.save(amx_dropout_runs(), sys.argv[1])")  # fmt: skip
    return saved_with_amx_on_and_off(code)


@pytest.mark.skipif(not cpu_has_flag("amx_bf16"), reason="no AMX on this CPU: the tile kernels are never taken")
@pytest.mark.parametrize("name", [*AMX_CASES, "varlen"])
def test_amx_applies_dropout(amx_runs, name):
    """The AMX tile kernels draw the mask: with them allowed, outputs and gradients differ from those of the
    vdpbf16ps kernels (other roundings: so the tiles ran), and both match the reference with the same seed."""
    on, off = (runs[name] for runs in amx_runs)
    for what, a, b in zip(("out", "dq", "dk", "dv"), (on["out"], *on["grads"]), (off["out"], *off["grads"])):
        assert not torch.equal(a, b), f"{what}: the same with and without the AMX tiles"
    for r in (on, off):
        if name == "varlen":
            args = (r["q"], r["k"], r["v"], r["cu_q"], r["cu_k"], (-1, 0), 0.25, r["seed"], r["dout"])
            check_varlen_against_reference(r["out"], r["lse"], r["grads"], *args)
        else:
            window, p = AMX_CASES[name][4:]
            args = (r["q"], r["k"], r["v"], window, p, r["seed"], r["dout"])
            check_against_reference(r["out"], r["lse"], r["grads"], *args)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_dropout_p_out_of_range(p):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="dropout_p"):
        ops.flash_attn_fwd(q, k, v, 0.1, -1, -1, 0.0, None, p, new_seed())


@pytest.mark.parametrize(
    "seed", [None, torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int64), torch.zeros(1, 2).long()]
)
def test_dropout_seed_checked(seed):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 32, torch.float32, "cpu")
    dout = torch.randn_like(q)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        ops.flash_attn_fwd(q, k, v, 0.1, -1, -1, 0.0, None, 0.2, seed)
    out, lse = ops.flash_attn_fwd(q, k, v, 0.1, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        ops.flash_attn_bwd(dout, q, k, v, out, lse, 0.1, -1, -1, 0.0, None, None, 0.2, seed)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dropout_seed"):
        ops.flash_attn_varlen_fwd(q[0], k[0], v[0], cu, cu, 4, 4, 0.1, -1, -1, 0.0, None, 0.2, seed)
