"""flash_attn_varlen_func (packed variable-length batches) and the packed-qkv entry points, on the C++ CPU
backend against the reference: forward and gradients, empty and one-token sequences, rows outside every sequence,
max_seqlen hints that are too small, argument errors, opcheck and torch.compile. The Triton backend's varlen
kernels are tested under the interpreter in test_triton_varlen.py."""

import pytest
import torch
from attn_cases import FP32_TOL, needs_cpu_kernel
from utils import assert_error_within_ratio

import llmkernels
from llmkernels.reference.attention import flash_attn_ref, flash_attn_varlen_ref


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lens_q, lens_k, nheads, nheads_k, headdim, dtype, extra_q=0, extra_k=0):
    """Random packed q, k, v for the given sequence lengths, with extra rows after the last sequence."""
    total_q, total_k = sum(lens_q) + extra_q, sum(lens_k) + extra_k
    q = torch.randn(total_q, nheads, headdim, dtype=dtype)
    k = torch.randn(total_k, nheads_k, headdim, dtype=dtype)
    v = torch.randn(total_k, nheads_k, headdim, dtype=dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


# (lens_q, lens_k, nheads, nheads_k, headdim, causal, window, softcap)
CASES = [
    ([5, 17, 1], [5, 17, 1], 4, 2, 32, True, (-1, -1), 0.0),
    ([3, 0, 17, 1, 70], [5, 4, 17, 0, 90], 4, 4, 64, False, (-1, -1), 0.0),  # empty q / k sequences
    ([64, 113], [130, 64], 8, 1, 128, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k in one: rows that see no key
    ([33, 9, 65], [33, 40, 65], 4, 2, 17, False, (7, 0), 5.0),  # odd head dim, window, softcap
    ([1, 1, 1, 1], [300, 2, 1, 77], 8, 2, 96, True, (16, 3), 0.0),  # decode-like rows of a ragged batch
    ([200], [200], 2, 2, 256, False, (0, 0), 0.0),  # one sequence, window 0
]


def _case_id(case):
    lens_q, lens_k, h, hk, d, causal, window, softcap = case
    return f"q{lens_q}-k{lens_k}-h{h}/{hk}-d{d}" + ("-causal" if causal else "") + (
        f"-w{window[0]},{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_varlen_cpu_against_reference(case, dtype):
    lens_q, lens_k, h, hk, d, causal, window, softcap = case
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, h, hk, d, dtype)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    dout = torch.randn(q.shape)

    def ours(q, k, v):
        with llmkernels.use_backend("cpu"):
            return llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)

    def reference(upcast):
        return lambda q, k, v: flash_attn_varlen_ref(q, k, v, cu_q, cu_k, upcast=upcast, **kw)

    out, grads = _grads(ours, (q, k, v), dout)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        ref, ref_grads = _grads(reference(True), [t.double() for t in (q, k, v)], dout.double())
        torch.testing.assert_close(out.double(), ref, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                       msg=lambda m, name=name: f"{name}: {m}")
    else:
        exact, exact_grads = _grads(reference(True), [t.float() for t in (q, k, v)], dout)
        same, same_grads = _grads(reference(False), (q, k, v), dout)
        assert_error_within_ratio(out, exact, same, ratio=2.0)
        for name, g, e, s in zip(("dq", "dk", "dv"), grads, exact_grads, same_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)


@needs_cpu_kernel
def test_varlen_equals_flash_attn_func_per_sequence():
    """Each sequence of a packed call gives what flash_attn_func gives it alone (the dense kernel's path)."""
    lens_q, lens_k = [7, 50, 1, 19], [7, 64, 30, 19]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, 64, torch.float32)
    with llmkernels.use_backend("cpu"):
        out = llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 50, 64, causal=True, window_size=(20, 0))
        for b in range(len(lens_q)):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            alone = llmkernels.flash_attn_func(
                q[qs][None], k[ks][None], v[ks][None], causal=True, window_size=(20, 0)
            )[0]
            torch.testing.assert_close(out[qs], alone, rtol=1e-6, atol=1e-6)


@needs_cpu_kernel
def test_rows_outside_every_sequence_are_zero_and_ignored():
    """Rows of q before cu_seqlens_q[0] or after its end get 0 and zero gradients; rows of k / v outside every
    sequence (NaN here) are never read. A too-small max_seqlen only sizes GPU launches: results stay right."""
    lens = [9, 30, 4]
    q, k, v, cu_q, cu_k = _packed(lens, lens, 4, 2, 32, torch.float32, extra_q=5, extra_k=3)
    cu_q, cu_k = cu_q + 2, cu_k + 1  # two rows of q and one of k before the first sequence
    q[:2] = float("nan")
    q[cu_q[-1] :] = float("nan")
    k[:1], v[:1] = float("nan"), float("nan")
    k[cu_k[-1] :], v[cu_k[-1] :] = float("nan"), float("nan")
    dout = torch.randn(q.shape)

    def ours(q, k, v):
        with llmkernels.use_backend("cpu"):
            return llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 1, causal=True)  # max_seqlen too small

    out, (dq, dk, dv) = _grads(ours, (q, k, v), dout)
    inside_q = torch.zeros(q.shape[0], dtype=torch.bool)
    inside_q[cu_q[0] : cu_q[-1]] = True
    inside_k = torch.zeros(k.shape[0], dtype=torch.bool)
    inside_k[cu_k[0] : cu_k[-1]] = True
    assert (out[~inside_q] == 0).all() and (dq[~inside_q] == 0).all()
    assert (dk[~inside_k] == 0).all() and (dv[~inside_k] == 0).all()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    clean = [t.clone() for t in (q, k, v)]
    clean[0][~inside_q], clean[1][~inside_k], clean[2][~inside_k] = 0.0, 0.0, 0.0
    ref, ref_grads = _grads(
        lambda q, k, v: flash_attn_varlen_ref(q, k, v, cu_q, cu_k, causal=True), [t.double() for t in clean],
        dout.double(),
    )
    torch.testing.assert_close(out[inside_q].double(), ref[inside_q], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk[inside_k].double(), ref_grads[1][inside_k], rtol=2e-4, atol=5e-5)


def test_packed_entry_points_match_the_unpacked_calls():
    """qkv / kv packed along their own axis give the same outputs, and gradients reach the packed tensor."""
    qkv = torch.randn(2, 13, 3, 4, 16, requires_grad=True)
    out = llmkernels.flash_attn_qkvpacked_func(qkv, causal=True)
    ref = flash_attn_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0

    q, kv = torch.randn(2, 5, 4, 16), torch.randn(2, 11, 2, 2, 16)
    out = llmkernels.flash_attn_kvpacked_func(q, kv, window_size=(3, 3))
    torch.testing.assert_close(out, flash_attn_ref(q, kv[:, :, 0], kv[:, :, 1], window_size=(3, 3)), rtol=1e-5,
                               atol=1e-5)

    cu = _cu([4, 9])
    qkv = torch.randn(13, 3, 4, 16)
    out = llmkernels.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, causal=True)
    torch.testing.assert_close(out, flash_attn_varlen_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True),
                               rtol=1e-5, atol=1e-5)
    q, kv, cu_k = torch.randn(13, 4, 16), torch.randn(20, 2, 2, 16), _cu([12, 8])
    out = llmkernels.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 9, 12)
    torch.testing.assert_close(out, flash_attn_varlen_ref(q, kv[:, 0], kv[:, 1], cu, cu_k), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Argument errors (every message names the argument)
# ---------------------------------------------------------------------------------------------------
def _good():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 6], 4, 2, 16, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.randn(1, 8, 4, 16)), ValueError, "q must have 3 dimensions"),
        (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), ValueError, "nheads_k"),
        (dict(v=torch.randn(10, 2, 8)), ValueError, "v must have shape"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens_q must have dtype"),
        (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "cu_seqlens_k must have"),
        (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
        (dict(max_seqlen_k=2.5), ValueError, "max_seqlen_k"),
    ],
)
def test_bad_arguments_name_the_argument(change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        llmkernels.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("kind", ["0-d tensor", "numpy"])
def test_max_seqlen_takes_integral_scalars(kind):
    """transformers passes max_seqlen as cu_seqlens.diff().max(), a 0-d int tensor (flash_attn's int arguments take
    it); NumPy ints too. Same result as Python ints; a 0-d float tensor and bools are still refused."""
    import numpy as np

    args = _good()
    expected = llmkernels.flash_attn_varlen_func(**args)
    convert = (lambda n: torch.tensor(n, dtype=torch.int32)) if kind == "0-d tensor" else np.int64
    args.update(max_seqlen_q=convert(5), max_seqlen_k=convert(6))
    torch.testing.assert_close(llmkernels.flash_attn_varlen_func(**args), expected, rtol=0, atol=0)
    for bad in (torch.tensor(5.0), True, torch.tensor(True), torch.tensor([5], dtype=torch.int32)):
        with pytest.raises(ValueError, match="max_seqlen_q must be an int"):
            llmkernels.flash_attn_varlen_func(**{**args, "max_seqlen_q": bad})


@needs_cpu_kernel
@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 5, 3], "be non-decreasing"),
        ([0, 3, 9], "end at or before"),
        ([-1, 3, 8], "start at a row >= 0"),
    ],
)
def test_bad_offsets_are_refused_on_the_cpu(cu, match):
    args = {**_good(), "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32)}
    with llmkernels.use_backend("cpu"), pytest.raises(RuntimeError, match=f"cu_seqlens_q must {match}"):
        llmkernels.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("cu", [[0, 5, 3], [0, 3, 9], [-1, 3, 8]])
def test_bad_offsets_are_refused_by_the_reference(cu):
    """The reference reads the offsets back anyway: it names them rather than slicing nonsense silently."""
    args = {**_good(), "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32)}
    with llmkernels.use_backend("reference"), pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        llmkernels.flash_attn_varlen_func(**args)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        llmkernels.flash_attn_varlen_func(**_good(), dropout_p=1.0)
    with pytest.raises(ValueError, match="qkv must have 3 at dimension 2"):
        llmkernels.flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 4, 16))


# ---------------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((3, 0), 2.0)])
def test_opcheck_varlen_fwd_and_bwd(window, softcap):
    a = _good()
    q, k, v = (a[n].requires_grad_() for n in "qkv")
    rest = (a["cu_seqlens_q"], a["cu_seqlens_k"], 5, 6, 0.25, *window, softcap)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_varlen_fwd.default, (q, k, v, *rest))
    out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd(q.detach(), k.detach(), v.detach(), *rest)
    assert lse.shape == (q.shape[1], q.shape[0])
    torch.library.opcheck(
        torch.ops.llmkernels.flash_attn_varlen_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *rest),
    )


@needs_cpu_kernel
def test_compile_flash_attn_varlen_func():
    a = _good()
    q, k, v = (a[n].requires_grad_() for n in "qkv")
    cu_q, cu_k = a["cu_seqlens_q"], a["cu_seqlens_k"]
    fn = torch.compile(
        lambda q, k, v: llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True),
        fullgraph=True,
        backend="aot_eager",
    )
    out = fn(q, k, v)
    out.sum().backward()
    ref = llmkernels.flash_attn_varlen_func(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 5, 6, causal=True)
    torch.testing.assert_close(out, ref)
    assert q.grad is not None and k.grad.shape == k.shape


@needs_cpu_kernel
@pytest.mark.parametrize("h,hk,d", [(0, 1, 8), (4, 2, 1), (2, 2, 256)])
@pytest.mark.parametrize("totals,cu_q,cu_k", [((0, 0), [0], [0]), ((0, 5), [0, 0], [0, 5]), ((5, 0), [0, 5], [0, 0]),
                                              ((7, 9), [2, 3, 5], [1, 4, 8])])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (2**62, 2**62)])
def test_raw_ops_on_edge_shapes(h, hk, d, totals, cu_q, cu_k, window):
    """The C++ ops straight through torch.ops on empty batches, empty totals, no heads, head dim 1 / 256 and
    windows near INT64_MAX: finite results of the right shapes, rows outside every sequence zero, no crash."""
    q = torch.randn(totals[0], h, d, dtype=torch.bfloat16)
    k, v = torch.randn(totals[1], hk, d, dtype=torch.bfloat16), torch.randn(totals[1], hk, d, dtype=torch.bfloat16)
    cq, ck = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    out, lse = torch.ops.llmkernels.flash_attn_varlen_fwd(q, k, v, cq, ck, 0, 0, 0.5, *window, 0.0)
    assert out.shape == q.shape and lse.shape == (h, totals[0]) and torch.isfinite(out).all()
    grads = torch.ops.llmkernels.flash_attn_varlen_bwd(torch.randn_like(q), q, k, v, out, lse, cq, ck, 0, 0, 0.5,
                                                       *window, 0.0, torch.randn_like(lse))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.isfinite(g).all()
    assert (out[: cu_q[0]] == 0).all() and (out[cu_q[-1] :] == 0).all()
    assert (grads[1][: cu_k[0]] == 0).all() and (grads[1][cu_k[-1] :] == 0).all()


def test_reference_without_sequences_is_differentiable():
    """No query row in any sequence: every backend returns zeros that are still part of the graph."""
    q, k, v = (torch.randn(3, 2, 8, requires_grad=True) for _ in range(3))
    cu_q, cu_k = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    with llmkernels.use_backend("reference"):
        out = llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 0, 3)
    assert out.requires_grad and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_empty_query_sequence_with_many_keys(dtype):
    """A sequence with keys but no query rows, beside one too short to split, on 2 threads: the empty one must not
    ask for a split dq buffer (it has no rows; the call failed with an undefined tensor). Its keys get zero
    gradients; the other sequence's match the reference."""
    lens_q, lens_k = [16, 0], [16, 300]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 1, 64, dtype)
    dout = torch.randn(q.shape, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def ours(q, k, v):
            with llmkernels.use_backend("cpu"):
                return llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 300)

        _, grads = _grads(ours, (q, k, v), dout)
    finally:
        torch.set_num_threads(before)
    _, ref_grads = _grads(lambda q, k, v: flash_attn_varlen_ref(q, k, v, cu_q, cu_k),
                          [t.double() for t in (q, k, v)], dout.double())
    tol = FP32_TOL["grad"] if dtype == torch.float32 else (2e-2, 2e-2)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol[0], atol=tol[1], msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(grads[1][16:], torch.zeros_like(grads[1][16:]))


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_backward_splits_key_blocks_of_few_sequences(threads):
    """One long MQA sequence beside an empty one gives a single (sequence, KV head) task: the backward then splits
    the sequence's key blocks over the threads, each split with its own dq buffer; same gradients as the fp64
    reference, and the same on every run (the splits are summed in order)."""
    lens_q, lens_k = [200, 0], [260, 3]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 1, 64, torch.float32)
    dout = torch.randn(q.shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def ours(q, k, v):
            with llmkernels.use_backend("cpu"):
                return llmkernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 200, 260, causal=True)

        out, grads = _grads(ours, (q, k, v), dout)
        _, again = _grads(ours, (q, k, v), dout)
    finally:
        torch.set_num_threads(before)
    ref, ref_grads = _grads(lambda q, k, v: flash_attn_varlen_ref(q, k, v, cu_q, cu_k, causal=True),
                            [t.double() for t in (q, k, v)], dout.double())
    for name, g, r, g2 in zip(("dq", "dk", "dv"), grads, ref_grads, again):
        torch.testing.assert_close(g.double(), r, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert torch.equal(g, g2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_compile_does_not_specialise_on_max_seqlen(as_tensor):
    """Each packed batch has its own longest sequence: with dynamic shapes one graph serves them all (max_seqlen is
    a SymInt in the ops' schemas; a 0-d tensor, transformers' form, becomes the packed rows' count under
    tracing). The int schema made a graph per value, until fullgraph hit the recompile limit."""
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(llmkernels.flash_attn_varlen_func, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in range(3, 8):
            q = torch.randn(2 * n + 1, 2, 16, requires_grad=True)
            cu = torch.tensor([0, n, 2 * n + 1], dtype=torch.int32)
            longest = cu.diff().max() if as_tensor else n + 1
            out = fn(q, q, q, cu, cu, longest, longest, causal=True)
            out.sum().backward()
            with llmkernels.use_backend("reference"):
                expected = llmkernels.flash_attn_varlen_func(q.detach(), q.detach(), q.detach(), cu, cu, n + 1, n + 1,
                                                             causal=True)  # fmt: skip
            torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)


def test_compile_takes_max_seqlen_read_back_with_item():
    """max_seqlen from .item() in a trace (transformers' form under torch.compile) is an unbacked SymInt: the checks
    may not guard on its value."""
    import torch._dynamo

    torch._dynamo.reset()

    def fn(q, cu):
        longest = cu.diff().max().item()
        return llmkernels.flash_attn_varlen_func(q, q, q, cu, cu, longest, longest, causal=True)

    q, cu = torch.randn(9, 2, 16), torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, cu)
    expected = llmkernels.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
