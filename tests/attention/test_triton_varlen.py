"""The Triton varlen (packed) flash attention ops (llmkernels/triton/flash_attn.py) against the reference.

flash_attn_varlen_fwd_triton / flash_attn_varlen_bwd_triton (through autograd) against flash_attn_varlen_fwd_ref and
autograd of flash_attn_varlen_ref. Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py): small shapes, fp32 against the fp64 reference with test_triton_attention.py's bounds. The ops allocate
their outputs, so comparing every element (rows outside every sequence included) also catches unwritten ones.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils import assert_error_within_ratio

from llmkernels.reference.attention import flash_attn_varlen_fwd_ref, flash_attn_varlen_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    from llmkernels.triton import flash_attn as fa
else:
    fa = None

interp = pytest.mark.triton_interp
interp_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
FP32_TOL = {"out": (1e-4, 1e-5), "grad": (2e-4, 5e-5)}

# (seqlen_q, seqlen_k) per sequence. With the interpreter's 16 x 16 tiles, 17 / 33 / 40 cross partial and full
# tiles; empty sequences in q, in k and in both; q longer than k (rows that see no key under a causal mask).
MIXED = [(17, 17), (0, 5), (1, 33), (33, 17), (5, 0), (0, 0), (17, 40)]
SKEWED = [(33, 1), (17, 0), (1, 17), (40, 33)]
SINGLE = [(33, 33)]

# (sequences, nheads, nheads_k, headdim, window_left, window_right, softcap, max_seqlen, extra q rows, extra k rows)
# window -1 = unbounded, right 0 = causal; max_seqlen: "exact", "small" (1: every program loops over its
# sequence's blocks) or "huge" (bounded by the packed length).
CASES = [
    (MIXED, 4, 2, 16, -1, 0, 0.0, "exact", 0, 0),  # causal, GQA 2
    (MIXED, 2, 2, 40, -1, 0, 0.0, "small", 3, 2),  # causal, head dim not a power of 2, rows past cu[-1]
    (MIXED, 4, 2, 40, 5, 0, 0.0, "exact", 0, 0),  # sliding window (left, 0)
    (MIXED, 2, 2, 16, 3, 2, 0.0, "small", 2, 0),  # two-sided window
    (MIXED, 4, 2, 16, -1, -1, 0.0, "huge", 0, 3),  # no mask
    (MIXED, 2, 2, 40, -1, -1, 2.0, "exact", 1, 0),  # softcap
    (MIXED, 4, 2, 40, 3, 2, 5.0, "small", 0, 0),  # window + softcap + GQA
    (SKEWED, 4, 2, 16, -1, 0, 2.0, "small", 0, 0),  # causal with q longer than k: rows that see nothing
    (SKEWED, 2, 2, 40, 100, 2**31 - 1, 0.0, "exact", 0, 0),  # windows wider than every sequence (no overflow)
    (SINGLE, 4, 2, 16, 7, 0, 0.0, "small", 0, 0),  # one sequence, several query blocks per program
]


def _ids(case):
    seqs, h, hk, d, left, right, cap, max_mode, tail_q, tail_k = case
    name = {id(MIXED): "mixed", id(SKEWED): "skewed", id(SINGLE): "single"}[id(seqs)]
    return f"{name}-h{h}/{hk}-d{d}-w{left},{right}-cap{cap}-{max_mode}-tail{tail_q},{tail_k}"


def _cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _inputs(case, dtype, device):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    seqs, h, hk, d, _, _, _, max_mode, tail_q, tail_k = case
    cu_q, cu_k = _cu([s for s, _ in seqs], device), _cu([s for _, s in seqs], device)
    total_q, total_k = int(cu_q[-1]) + tail_q, int(cu_k[-1]) + tail_k
    q = torch.randn(total_q, h, d, device=device).to(dtype)
    k = torch.randn(total_k, hk, d, device=device).to(dtype)
    v = torch.randn(total_k, hk, d, device=device).to(dtype)
    max_q, max_k = max(s for s, _ in seqs), max(s for _, s in seqs)
    if max_mode == "small":
        max_q, max_k = 1, 1
    elif max_mode == "huge":
        max_q, max_k = 10**9, 10**9
    return q, k, v, cu_q, cu_k, max_q, max_k


def _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, args, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd_triton(*leaves, cu_q, cu_k, max_q, max_k, *args)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, [t.grad for t in leaves]


def _run_reference(q, k, v, cu_q, cu_k, args, dout, dtype, upcast=True):
    scale, left, right, cap = args
    inputs = [t.detach().to(dtype) for t in (q, k, v)]
    out, lse = flash_attn_varlen_fwd_ref(*inputs, cu_q, cu_k, scale, left, right, cap, upcast=upcast)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = flash_attn_varlen_ref(*leaves, cu_q, cu_k, scale, False, (left, right), cap, upcast=upcast)
    ref.backward(dout.to(ref.dtype))
    # Rows of k / v that no sequence reads get no gradient at all: their gradient is 0.
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return out, lse, grads


def _check_against_reference(case, dtype, device):
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(case, dtype, device)
    args = (q.shape[-1] ** -0.5, *case[4:7])
    dout = torch.randn(q.shape, device=device)
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, args, dout)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    exact_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    exact, exact_lse, exact_grads = _run_reference(q, k, v, cu_q, cu_k, args, dout, exact_dtype)

    names = ("dq", "dk", "dv")
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for name, g, e in zip(names, grads, exact_grads):
            torch.testing.assert_close(g.double(), e, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                       msg=lambda m, name=name: f"{name}: {m}")
    else:
        same, _, same_grads = _run_reference(q, k, v, cu_q, cu_k, args, dout, dtype, upcast=False)
        assert_error_within_ratio(out, exact, same, ratio=2.0)
        for name, g, e, s in zip(names, grads, exact_grads, same_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "lse must be -inf exactly where a row sees no key"
    torch.testing.assert_close(lse[seen].double(), exact_lse[seen].double(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Interpreter (CPU tensors)
# --------------------------------------------------------------------------------------------------
@interp
@interp_only
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_fp32_matches_fp64_reference(case):
    _check_against_reference(case, torch.float32, "cpu")


@interp
@interp_only
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_atomic_dq_matches_reference(case):
    """The dK/dV kernel adding dq atomically (a 5th config field 1): rows past cu_seqlens_q[-1] stay 0 and each
    sequence's dq rows get only its own keys' shares."""
    with fa.config_override(bwd_dkdv=(*fa._INTERPRET_CONFIG, 1)):
        _check_against_reference(case, torch.float32, "cpu")


@interp
@interp_only
def test_matches_dense_op_bit_for_bit():
    """One sequence, no padding: the varlen kernels are the dense ones with other row offsets."""
    case = ([(40, 33)], 4, 2, 16, 3, 2, 2.0, "small", 0, 0)
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(case, torch.float32, "cpu")
    args = (0.3, 3, 2, 2.0)
    dout = torch.randn(q.shape)
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, args, dout)
    leaves = [t[None].clone().requires_grad_() for t in (q, k, v)]
    dense, dense_lse = torch.ops.llmkernels.flash_attn_fwd_triton(*leaves, *args)
    dense.backward(dout[None])
    assert torch.equal(out, dense[0].detach()) and torch.equal(lse, dense_lse[0])
    for g, leaf in zip(grads, leaves):
        assert torch.equal(g, leaf.grad[0])


@interp
@interp_only
def test_nonsense_cu_seqlens_stay_in_bounds():
    """Offsets past the tensors, decreasing or negative are not checked on the host (that would sync); the kernels
    clamp them, so they must run, and write nothing but finite values, rather than read or write out of bounds."""
    q, k, v = torch.randn(20, 2, 16), torch.randn(12, 1, 16), torch.randn(12, 1, 16)
    cu_q = torch.tensor([0, 15, 5, 1000, -7], dtype=torch.int32)
    cu_k = torch.tensor([-3, 40, 2, 7, 12], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd_triton(*leaves, cu_q, cu_k, 16, 16, 0.25, -1, 0, 0.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@interp
@interp_only
def test_no_sequences_or_no_keys():
    q, k = torch.randn(4, 2, 16, requires_grad=True), torch.randn(0, 2, 16, requires_grad=True)
    for cu_q, cu_k, kk in [
        (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.randn(3, 2, 16)),  # batch 0
        (torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32), k),  # total_k 0
    ]:
        kk = kk.detach().requires_grad_()
        out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd_triton(q, kk, kk, cu_q, cu_k, 4, 0, 0.25, -1, -1, 0.0)
        assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(kk.grad, torch.zeros_like(kk))
        q.grad = None


@interp
@interp_only
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_opcheck(op):
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(([(5, 7), (3, 0), (9, 4)], 2, 1, 16, 0, 0, 0.0, "exact", 1, 0),
                                                torch.float32, "cpu")
    rest = (cu_q, cu_k, max_q, max_k, 0.25, 3, 0, 1.5)
    if op == "fwd":
        torch.library.opcheck(
            torch.ops.llmkernels.flash_attn_varlen_fwd_triton.default,
            (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *rest),
        )
    else:
        out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd_triton(q, k, v, *rest)
        torch.library.opcheck(
            torch.ops.llmkernels.flash_attn_varlen_bwd_triton.default, (torch.randn_like(out), q, k, v, out, lse, *rest)
        )


@interp
@interp_only
def test_torch_compile_fullgraph():
    q, k, v, cu_q, cu_k, max_q, max_k = _inputs(([(5, 7), (9, 4)], 2, 2, 16, 0, 0, 0.0, "exact", 0, 0),
                                                torch.float32, "cpu")
    # aot_eager: traces the op through the fake kernel and autograd formula without compiling C++ (cheap).
    compiled = torch.compile(fa.flash_attn_varlen_triton, fullgraph=True, backend="aot_eager")
    args = (q, k, v, cu_q, cu_k, max_q, max_k, 0.25, -1, 0, 0.0)
    torch.testing.assert_close(compiled(*args), fa.flash_attn_varlen_triton(*args))


def _cu2(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_INPUTS = [
    # (what to change in (q, k, v, cu_seqlens_q, cu_seqlens_k), the message the error must hold)
    (lambda q, k, v, cq, ck: (q[None], k, v, cq, ck), "q must have 3 dimensions"),
    (lambda q, k, v, cq, ck: (q, k.double(), v, cq, ck), "k must have dtype"),
    (lambda q, k, v, cq, ck: (q, k, v.half(), cq, ck), "v must have the dtype of q"),
    (lambda q, k, v, cq, ck: (q, k, v[..., :8], cq, ck), "v must have shape"),
    (lambda q, k, v, cq, ck: (q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1), cq, ck), "nheads_k"),
    (lambda q, k, v, cq, ck: (q, k.to("meta"), v, cq, ck), "k must be on cpu"),
    (lambda q, k, v, cq, ck: (q, k, v, cq.long(), ck), "cu_seqlens_q must have dtype"),
    (lambda q, k, v, cq, ck: (q, k, v, cq, ck[None]), "cu_seqlens_k must have 1 dimensions"),
    (lambda q, k, v, cq, ck: (q, k, v, cq.to("meta"), ck), "cu_seqlens_q must be on cpu"),
    (lambda q, k, v, cq, ck: (q, k, v, cq[:0], ck[:0]), "cu_seqlens_q must hold batch"),
    (lambda q, k, v, cq, ck: (q, k, v, cq, _cu2(0, 2)), "cu_seqlens_k must have cu_seqlens_q's shape"),
    (lambda q, k, v, cq, ck: (q, k, v, _cu2(0, 2, 4, 6)[::2], ck), "cu_seqlens_q must be contiguous"),
]


@interp
@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_name_the_argument(change, message):
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v = torch.randn(6, 2, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cu_q, cu_k = _cu2(0, 2, 6), _cu2(0, 3, 5)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.llmkernels.flash_attn_varlen_fwd_triton(*change(q, k, v, cu_q, cu_k), 4, 3, 0.25, -1, -1, 0.0)


def test_bwd_rejects_bad_lse():
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k = torch.randn(6, 2, 16), torch.randn(5, 2, 16)
    cu_q, cu_k = _cu2(0, 2, 6), _cu2(0, 3, 5)
    with pytest.raises(ValueError, match="softmax_lse must have shape"):
        torch.ops.llmkernels.flash_attn_varlen_bwd_triton(q, q, k, k, q, torch.zeros(1, 2, 6), cu_q, cu_k, 4, 3, 0.25,
                                                          -1, -1, 0.0)


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7]], ids=_ids)
def test_gpu_matches_reference(case, dtype):
    if fa is None:
        pytest.skip("triton is not usable here")
    _check_against_reference(case, dtype, "cuda")

@pytest.mark.cuda
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7]], ids=_ids)
def test_gpu_atomic_dq_matches_reference(case):
    if fa is None:
        pytest.skip("triton is not usable here")
    with fa.config_override(bwd_dkdv=(64, 64, 4, 2, 1)):
        _check_against_reference(case, torch.bfloat16, "cuda")
