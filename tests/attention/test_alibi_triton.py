"""ALiBi (alibi_slopes) in the Triton flash attention ops (llmkernels/triton/flash_attn.py) against the reference.

The semantics are llmkernels.reference.attention's: after the soft-cap, s_ij <- s_ij - slope[b, h] * |i + seqlen_k -
seqlen_q - j|, then the mask; lse is that of the biased scores. Covered: the dense forward and backward (the dQ
kernel and the atomic-dq variant of the dK/dV kernel), varlen (the distance within each sequence), decode against a
KV cache (each row's own key count, plain and paged), (nheads,) and (batch, nheads) slopes, argument checks and
opcheck. Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py): small shapes,
fp32 against the fp64 reference with test_triton_attention.py's bounds. The ops' float allocations are NaN-poisoned
(torch.empty & co. patched during the op) so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils import poisoned_allocations

from llmkernels.reference.attention import (
    flash_attn_fwd_ref,
    flash_attn_varlen_fwd_ref,
    flash_attn_varlen_ref,
    flash_attn_with_kvcache_ref,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.triton_interp,
    pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU"),
]

if HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    from llmkernels.triton import flash_attn as fa
else:
    fa = None

OUT_TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 kernels against the fp64 reference (test_triton_attention's bounds)
GRAD_TOL = dict(rtol=2e-4, atol=5e-5)
LSE_TOL = dict(rtol=1e-5, atol=1e-5)


def _slopes(kind: str, batch: int, nheads: int, scale: float = 1.0) -> torch.Tensor:
    """ALiBi-like slopes (a geometric sequence per head), jittered so that rows and heads differ."""
    base = 2.0 ** (-8.0 * torch.arange(1, nheads + 1) / nheads)
    if kind == "1d":
        return (base * scale * (0.5 + torch.rand(nheads))).float().contiguous()
    return (base * scale * (0.5 + torch.rand(batch, nheads))).float().contiguous()


def _assert_lse(lse, exact_lse):
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "lse must be -inf exactly where a row sees no key"
    torch.testing.assert_close(lse[seen].double(), exact_lse[seen].double(), **LSE_TOL)


def _assert_grads(grads, exact_grads):
    for name, g, e in zip(("dq", "dk", "dv"), grads, exact_grads):
        torch.testing.assert_close(g.double(), e, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# Dense: flash_attn_fwd_triton / flash_attn_bwd_triton through autograd
# --------------------------------------------------------------------------------------------------
# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, window_left, window_right, softcap, slopes); the interpreter's
# 16 x 16 tiles: 17 / 33 cross partial and full tiles.
DENSE_CASES = [
    (17, 17, 2, 2, 16, -1, -1, 0.0, "1d"),  # full attention, ragged last tile
    (33, 33, 4, 1, 16, -1, 0, 0.0, "2d"),  # causal, GQA 4
    (1, 33, 2, 2, 40, -1, 0, 0.0, "2d"),  # one query, padded head dim
    (17, 33, 2, 2, 40, 5, 3, 0.0, "1d"),  # two-sided window, seqlen_q < seqlen_k
    (33, 17, 2, 2, 16, -1, 0, 2.0, "2d"),  # seqlen_q > seqlen_k causal (rows that see no key), softcap
    (17, 33, 4, 2, 16, 7, 0, 5.0, "1d"),  # sliding window + softcap + GQA 2
]


def _dense_inputs(case, batch=2):
    sq, sk, h, hk, d = case[:5]
    q = torch.randn(batch, sq, h, d)
    k, v = torch.randn(batch, sk, hk, d), torch.randn(batch, sk, hk, d)
    return q, k, v, _slopes(case[8], batch, h)


def _dense_triton(q, k, v, args, slopes, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations():
        out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(*leaves, *args, False, slopes)
        out.backward(dout)
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _dense_reference(q, k, v, args, slopes, dout):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_fwd_ref(*leaves, *args, alibi_slopes=slopes)
    out.backward(dout.double())
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _check_dense(case, batch=2):
    q, k, v, slopes = _dense_inputs(case, batch)
    args = (q.shape[-1] ** -0.5, *case[5:8])
    dout = torch.randn(q.shape)
    out, lse, grads = _dense_triton(q, k, v, args, slopes, dout)
    exact, exact_lse, exact_grads = _dense_reference(q, k, v, args, slopes, dout)
    torch.testing.assert_close(out.double(), exact, **OUT_TOL)
    _assert_lse(lse, exact_lse)
    _assert_grads(grads, exact_grads)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_matches_reference(case):
    _check_dense(case)


@pytest.mark.parametrize("case", [DENSE_CASES[1], DENSE_CASES[5]])
def test_atomic_dq_matches_reference(case, monkeypatch):
    """The dK/dV kernel's atomic dq (DQ_ATOMIC 1; the interpreter has no TMA reduce) applies the bias too."""
    launched = []
    real = fa.launch
    monkeypatch.setattr(fa, "launch", lambda kernel, *a, **kw: (launched.append(kernel.fn.__name__), real(kernel, *a,
                                                                                                          **kw)))
    with fa.config_override(bwd_dkdv=(*fa._INTERPRET_CONFIG, 1)):
        _check_dense(case)
    assert "flash_attn_bwd_dq_kernel" not in launched and "flash_attn_bwd_dkdv_kernel" in launched


def test_large_slopes_pick_the_diagonal_key():
    """Fails if the bias is ignored: with slopes of 30 each query sees only its bottom-right-aligned diagonal key
    (weight ~1 - 2e-13), so out ~ v of that key, far from the unbiased attention."""
    sq, sk, h, d = 17, 33, 2, 16
    q, k, v = torch.randn(1, sq, h, d), torch.randn(1, sk, h, d), torch.randn(1, sk, h, d)
    slopes = torch.full((h,), 30.0)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, -1, 0.0, False, slopes)
    diagonal = v[:, sk - sq :]  # query i's key: j = i + sk - sq
    torch.testing.assert_close(out, diagonal, rtol=0, atol=1e-4)
    plain = flash_attn_fwd_ref(q, k, v, 0.25)[0]
    assert (out - plain).abs().max() > 0.5
    exact, exact_lse = flash_attn_fwd_ref(q.double(), k.double(), v.double(), 0.25, alibi_slopes=slopes)
    _assert_lse(lse, exact_lse)


def test_slopes_differ_per_batch_row():
    """(batch, nheads) slopes: row 0 without bias (slopes 0) equals plain attention, row 1's large slopes do not,
    and each row equals a one-row call with its own (nheads,) slopes."""
    q, k, v, _ = _dense_inputs((17, 33, 2, 2, 16, -1, 0, 0.0, "1d"), batch=2)
    slopes = torch.tensor([[0.0, 0.0], [2.0, 0.5]])
    args = (0.25, -1, 0, 0.0)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, *args, False, slopes)
    plain, plain_lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, *args)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(lse[0], plain_lse[0], rtol=0, atol=0)
    assert (out[1] - plain[1]).abs().max() > 0.1
    for b in range(2):
        one, one_lse = torch.ops.llmkernels.flash_attn_fwd_triton(q[b:b + 1], k[b:b + 1], v[b:b + 1], *args, False,
                                                                   slopes[b].contiguous())  # fmt: skip
        torch.testing.assert_close(out[b : b + 1], one, rtol=0, atol=0)
        torch.testing.assert_close(lse[b : b + 1], one_lse, rtol=0, atol=0)
    exact, exact_lse = flash_attn_fwd_ref(q.double(), k.double(), v.double(), *args, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), exact, **OUT_TOL)
    _assert_lse(lse, exact_lse)


def test_entry_point_has_no_slope_gradient_and_keeps_the_pointer_kernel(monkeypatch):
    """flash_attn_triton hands the slopes to the backward; they get no gradient (as flash_attn's); a config that
    asks for the TMA forward (scale folded into the max, which a bias breaks) runs the pointer kernel."""
    launched = []
    real = fa.launch
    monkeypatch.setattr(fa, "launch", lambda kernel, *a, **kw: (launched.append(kernel.fn.__name__), real(kernel, *a,
                                                                                                          **kw)))
    case = (17, 33, 2, 2, 16, -1, 0, 0.0, "2d")
    q, k, v, slopes = _dense_inputs(case)
    q, k, v = (t.half() for t in (q, k, v))
    slopes.requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fa.config_override(fwd=(*fa._INTERPRET_CONFIG, 1)):
        out = fa.flash_attn_triton(*leaves, 0.25, -1, 0, 0.0, False, slopes)
    assert launched == ["flash_attn_fwd_kernel"]
    dout = torch.randn(out.shape).half()
    out.backward(dout)
    assert slopes.grad is None
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact = flash_attn_fwd_ref(*exact_leaves, 0.25, -1, 0, alibi_slopes=slopes.detach())[0]
    exact.backward(dout.double())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-3)
    for g, e in zip(leaves, exact_leaves):
        torch.testing.assert_close(g.grad.double(), e.grad, rtol=0, atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Varlen: distances within each packed sequence
# --------------------------------------------------------------------------------------------------
# (seqlen_q, seqlen_k) per sequence: ragged, empty in q / k / both, q longer than k.
SEQS = [(17, 17), (0, 5), (1, 33), (33, 17), (5, 0), (17, 40)]
# (nheads, nheads_k, headdim, window_left, window_right, softcap, slopes, extra q rows past cu_seqlens_q[-1])
VARLEN_CASES = [
    (4, 2, 16, -1, 0, 0.0, "2d", 3),  # causal, GQA 2, (sequences, nheads) slopes, rows outside every sequence
    (2, 2, 40, 5, 3, 2.0, "1d", 0),  # window + softcap, padded head dim
]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("case,atomic", [(VARLEN_CASES[0], False), (VARLEN_CASES[1], False), (VARLEN_CASES[0], True)])
def test_varlen_matches_reference(case, atomic):
    """atomic: the dK/dV kernel adds dq (DQ_ATOMIC 1) instead of the dQ kernel."""
    with fa.config_override(bwd_dkdv=(*fa._INTERPRET_CONFIG, int(atomic))):
        _check_varlen(case)


def _check_varlen(case):
    h, hk, d, left, right, cap, kind, tail = case
    cu_q, cu_k = _cu([s for s, _ in SEQS]), _cu([s for _, s in SEQS])
    q = torch.randn(int(cu_q[-1]) + tail, h, d)
    k, v = torch.randn(int(cu_k[-1]), hk, d), torch.randn(int(cu_k[-1]), hk, d)
    slopes = _slopes(kind, len(SEQS), h)
    args = (d**-0.5, left, right, cap)
    dout = torch.randn(q.shape)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations():
        out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd_triton(*leaves, cu_q, cu_k, 40, 40, *args, False, slopes)
        out.backward(dout)
    exact, exact_lse = flash_attn_varlen_fwd_ref(*(t.double() for t in (q, k, v)), cu_q, cu_k, *args,
                                                 alibi_slopes=slopes)  # fmt: skip
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = flash_attn_varlen_ref(*exact_leaves, cu_q, cu_k, args[0], False, (left, right), cap, alibi_slopes=slopes)
    ref.backward(dout.double())
    torch.testing.assert_close(out.detach().double(), exact, **OUT_TOL)
    _assert_lse(lse.detach(), exact_lse)
    _assert_grads([t.grad for t in leaves], [t.grad for t in exact_leaves])


# --------------------------------------------------------------------------------------------------
# Decode against a KV cache: each row's distances count from its own key count
# --------------------------------------------------------------------------------------------------
# (batch, seqlen_q, nheads, nheads_k, headdim, capacity, seqlen_new, window_left, window_right, softcap, lens,
#  slopes, page size or 0)
KV_CASES = [
    (3, 1, 4, 1, 32, 40, 1, -1, 0, 0.0, [5, 39, 0], "2d", 0),  # one new token, GQA 4, ragged rows, one empty
    (2, 3, 4, 2, 40, 64, 3, 7, 0, 2.0, [0, 50], "1d", 0),  # 3 new tokens, window, softcap, padded head dim
    (2, 2, 2, 2, 16, 48, 2, -1, -1, 0.0, [30, 9], "2d", 16),  # paged (3 pages of 16 per row), no mask
]


def _kv_inputs(case):
    b, sq, h, hk, d, cap, s_new = case[:7]
    q = torch.randn(b, sq, h, d)
    k_cache, v_cache = torch.randn(b, cap, hk, d), torch.randn(b, cap, hk, d)
    k_new, v_new = torch.randn(b, s_new, hk, d), torch.randn(b, s_new, hk, d)
    lens = torch.tensor(case[10], dtype=torch.int32)
    return q, k_cache, v_cache, k_new, v_new, lens, _slopes(case[11], b, h)


def _paged(k_cache, v_cache, page):
    """The plain (b, cap, hk, d) caches as shuffled pages of (pages, page, hk, d) caches, and the block table."""
    b, cap = k_cache.shape[:2]
    per_row = cap // page
    table = torch.randperm(b * per_row).view(b, per_row).to(torch.int32)
    at = table.flatten().long()
    pages = []
    for plain in (k_cache, v_cache):
        paged = torch.full((b * per_row, page, *plain.shape[2:]), float("nan"))
        paged[at] = plain.reshape(b * per_row, page, *plain.shape[2:])
        pages.append(paged)
    return *pages, table


@pytest.mark.parametrize("case", KV_CASES)
def test_kvcache_matches_reference(case):
    q, k_cache, v_cache, k_new, v_new, lens, slopes = _kv_inputs(case)
    left, right, cap, page = *case[7:10], case[12]
    scale = q.shape[-1] ** -0.5
    table = None
    if page:
        k_run, v_run, table = _paged(k_cache, v_cache, page)
    else:
        k_run, v_run = k_cache.clone(), v_cache.clone()
    exact, exact_lse = flash_attn_with_kvcache_ref(
        q.double(), k_cache.double(), v_cache.double(), k_new.double(), v_new.double(), lens, scale,
        window_size=(left, right), softcap=cap, return_softmax_lse=True, alibi_slopes=slopes,
    )  # fmt: skip
    with poisoned_allocations():
        out, lse = torch.ops.llmkernels.flash_attn_with_kvcache_lse_triton(
            q, k_run, v_run, k_new, v_new, lens, scale, left, right, cap, table, None, slopes
        )
    torch.testing.assert_close(out.double(), exact, **OUT_TOL)
    _assert_lse(lse, exact_lse)
    plain = flash_attn_with_kvcache_ref(q.double(), k_cache.double(), v_cache.double(), k_new.double(),
                                        v_new.double(), lens, scale, window_size=(left, right), softcap=cap)
    assert (out.double() - plain).abs().max() > 1e-2, "the bias must change the result"


def test_kvcache_slopes_differ_per_batch_row():
    """Row 0 with zero slopes equals the plain decode; row 1 with large ones sees only its last key."""
    q, k_cache, v_cache, _, _, lens, _ = _kv_inputs((2, 1, 2, 2, 16, 40, 0, -1, 0, 0.0, [40, 23], "1d", 0))
    slopes = torch.tensor([[0.0, 0.0], [30.0, 30.0]])
    out = torch.ops.llmkernels.flash_attn_with_kvcache_triton(q, k_cache, v_cache, None, None, lens, 0.25, -1, 0,
                                                              0.0, None, None, slopes)  # fmt: skip
    plain = torch.ops.llmkernels.flash_attn_with_kvcache_triton(q, k_cache, v_cache, None, None, lens, 0.25, -1, 0,
                                                                0.0)  # fmt: skip
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 0], v_cache[1, 22], rtol=0, atol=1e-4)  # key lens[1] - 1: distance 0


# --------------------------------------------------------------------------------------------------
# Registration and argument checks
# --------------------------------------------------------------------------------------------------
def test_opcheck():
    q, k, v, slopes = _dense_inputs((17, 17, 2, 1, 16, -1, 0, 0.0, "2d"), batch=1)
    args = (0.25, -1, 0, 1.5, False)
    torch.library.opcheck(
        torch.ops.llmkernels.flash_attn_fwd_triton.default,
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *args, slopes),
    )
    q, k_cache, v_cache, k_new, v_new, lens, slopes = _kv_inputs(KV_CASES[0])
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache_triton.default,
                          (q, k_cache, v_cache, k_new, v_new, lens, 0.2, -1, 0, 0.0, None, None, slopes))


def test_torch_compile_fullgraph_with_gradients():
    """aot_eager traces the op and the autograd formula that saves the slopes for the backward."""
    q, k, v, slopes = _dense_inputs((17, 17, 2, 2, 16, -1, 0, 0.0, "2d"), batch=2)
    dout = torch.randn(q.shape)
    compiled = torch.compile(fa.flash_attn_triton, fullgraph=True, backend="aot_eager")
    runs = []
    for fn in (compiled, fa.flash_attn_triton):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, 0.25, -1, 0, 0.0, False, slopes)
        out.backward(dout)
        runs.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


BAD_SLOPES = [
    (lambda s: s.double(), TypeError, "alibi_slopes must have dtype"),
    (lambda s: s[:1], ValueError, "alibi_slopes must have shape"),
    (lambda s: torch.zeros(3, s.shape[-1]), ValueError, r"alibi_slopes must have shape \(2, 2\)"),
    (lambda s: torch.zeros(2, 4)[:, ::2], ValueError, "alibi_slopes must be contiguous"),
    (lambda s: s.to("meta"), ValueError, "alibi_slopes must be on cpu"),
]


@pytest.mark.parametrize("change,error,message", BAD_SLOPES)
def test_bad_slopes_name_the_argument(change, error, message):
    q, k, v, slopes = _dense_inputs((5, 5, 2, 2, 16, -1, -1, 0.0, "2d"))
    bad = change(slopes)
    with pytest.raises(error, match=message):
        torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, -1, 0.0, False, bad)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, -1, 0.0)
    with pytest.raises(error, match=message):
        torch.ops.llmkernels.flash_attn_bwd_triton(out, q, k, v, out, lse, 0.25, -1, -1, 0.0, False, None, bad)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(error, match=message):
        torch.ops.llmkernels.flash_attn_varlen_fwd_triton(q[0], k[0], v[0], cu, cu, 5, 5, 0.25, -1, -1, 0.0, False,
                                                          bad)  # fmt: skip
    lens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(error, match=message):
        torch.ops.llmkernels.flash_attn_with_kvcache_triton(q, k, v, None, None, lens, 0.25, -1, -1, 0.0, None, None,
                                                            bad)  # fmt: skip
