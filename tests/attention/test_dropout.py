"""Attention dropout (flash_attn_func / flash_attn_varlen_func dropout_p): the mask's definition
(llmkernels/reference/dropout.py, Philox4x32-10 keyed by a seed) against Random123's published vectors and a plain
Python oracle; the reference attention against an independent formulation; every backend against the reference with
the same seed (forward and gradients: the masks must be identical, so the tolerances are those without dropout); the
public functions' seed (torch.manual_seed repeats a call), the layers, argument errors, opcheck and torch.compile.
The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest) in fp32 / fp16 (the interpreter has no
bf16), their float allocations NaN-poisoned; cuda-marked cases run them on a GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from attn_cases import FP32_TOL, needs_cpu_kernel, random_qkv
from utils import assert_error_within_ratio, poisoned_allocations

import llmkernels
from llmkernels.reference.attention import flash_attn_fwd_ref, flash_attn_varlen_fwd_ref
from llmkernels.reference.dropout import (
    dropout_keep,
    dropout_scale,
    keep_scale,
    keep_threshold,
    new_dropout_seed,
    philox4x32_10,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs the Triton interpreter")


# ---------------------------------------------------------------------------------------------------
# The mask's definition
# ---------------------------------------------------------------------------------------------------
# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> the four words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize("counter,key,expect", PHILOX_KAT)
def test_philox_known_answers(counter, key, expect):
    assert tuple(int(w) for w in philox4x32_10(counter, key)) == expect


def _philox_python(counter, key):
    """Philox4x32-10 on Python ints: an oracle independent of the tensor code's 16-bit split multiplications."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def test_keep_mask_matches_a_python_oracle():
    seed = torch.tensor([0x8BADF00D, 0x1234567], dtype=torch.int64)
    bh, i, j = (torch.randint(0, n, (300,)) for n in (2**20, 2**16, 2**18))
    p = 0.37
    kept = dropout_keep(seed, p, bh, i, j)
    for b_, i_, j_, got in zip(bh.tolist(), i.tolist(), j.tolist(), kept.tolist()):
        word = _philox_python((j_ >> 3, i_, b_, 0), (0x8BADF00D, 0x1234567))[(j_ & 7) >> 1]
        draw = (word >> 16) if j_ & 1 else (word & 0xFFFF)
        assert got == (draw >= keep_threshold(p))


def test_keep_rate_and_dependence_on_every_index():
    seed = new_dropout_seed()
    scale = dropout_scale(seed, 0.3, 2, 3, 64, 256)
    kept = scale > 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 98k draws: sd 0.0015
    torch.testing.assert_close(scale[kept], torch.full_like(scale[kept], keep_scale(0.3)))
    # Each index moves the mask: batch rows, heads, query rows and keys all get their own draws.
    assert (kept[0] != kept[1]).float().mean() > 0.3
    assert (kept[:, 0] != kept[:, 1]).float().mean() > 0.3
    assert (kept[:, :, 0] != kept[:, :, 1]).float().mean() > 0.3
    assert (kept[..., 0::8] != kept[..., 1::8]).float().mean() > 0.3  # the two halves of one word
    assert (kept[..., 0::8] != kept[..., 2::8]).float().mean() > 0.3  # two words of one call
    other = dropout_scale(seed + torch.tensor([0, 1]), 0.3, 2, 3, 64, 256) > 0
    assert (kept != other).float().mean() > 0.3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99999, 1 - 2**-17])
def test_the_scale_is_exactly_unbiased_for_16_bit_draws(p):
    """P(kept) * scale = 1 for the 16-bit draws' P(kept) = 1 - threshold / 2^16 (1 / (1 - p) is not, near p = 1)."""
    assert (65536 - keep_threshold(p)) / 65536 * keep_scale(p) == pytest.approx(1.0, rel=1e-15)
    assert abs(keep_scale(p) * (1 - p) - 1) < 2**-16 / (1 - p) + 1e-12


def test_reference_attention_applies_the_mask_after_the_softmax():
    """An independent formulation: softmax over the visible scores, times the mask / P(kept), times V; lse unchanged."""
    q, k, v = random_qkv(2, 9, 14, 4, 2, 8, torch.float64, "cpu")
    seed, p = new_dropout_seed(), 0.4
    out, lse = flash_attn_fwd_ref(q, k, v, 0.3, -1, 0, 0.0, dropout_p=p, dropout_seed=seed)
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * 0.3
    causal = torch.ones(9, 14, dtype=torch.bool).tril(14 - 9)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    expect = torch.einsum("bhqk,bkhd->bqhd", probs * dropout_scale(seed, p, 2, 4, 9, 14).double(), vv)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, flash_attn_fwd_ref(q, k, v, 0.3, -1, 0, 0.0)[1], rtol=0, atol=0)


def test_reference_is_unbiased():
    """E[out] over seeds is the attention without dropout: the 1 / P(kept) scaling."""
    q, k, v = random_qkv(1, 3, 6, 1, 1, 4, torch.float64, "cpu")
    plain = flash_attn_fwd_ref(q, k, v, 0.5)[0]
    torch.manual_seed(0)
    mean = sum(flash_attn_fwd_ref(q, k, v, 0.5, dropout_p=0.5, dropout_seed=new_dropout_seed())[0]
               for _ in range(4000)) / 4000  # fmt: skip
    torch.testing.assert_close(mean, plain, rtol=0, atol=0.08)  # sd of one draw <~ 1.5: 4000 draws, ~3.5 sigma


# ---------------------------------------------------------------------------------------------------
# Backends against the reference, through the public functions with a repeated seed
# ---------------------------------------------------------------------------------------------------
# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap, dropout_p)
CASES = [
    (2, 17, 33, 4, 2, 16, True, (-1, -1), 0.0, 0.3),  # ragged tiles, GQA 2
    (1, 1, 40, 2, 1, 32, False, (-1, -1), 0.0, 0.5),  # one query (the CPU's few-row path), MQA
    (2, 33, 17, 2, 2, 40, True, (-1, -1), 2.0, 0.1),  # rows that see no key, softcap, padded head dim
    (1, 17, 70, 4, 4, 16, False, (5, 3), 0.0, 0.9),  # two-sided window, most probabilities dropped
]
BIG_CASES = [  # the CPU kernels' query-lane blocks and head dims of the bf16 dot products
    (2, 130, 200, 8, 2, 64, True, (-1, -1), 0.0, 0.2),
    (1, 64, 64, 2, 2, 128, False, (-1, -1), 0.0, 0.5),
]


def _id(case):
    b, sq, sk, h, hk, d, causal, window, softcap, p = case
    return (f"b{b}-q{sq}-k{sk}-h{h}/{hk}-d{d}" + ("-causal" if causal else "")
            + (f"-w{window[0]},{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "")
            + f"-p{p:g}")  # fmt: skip


def _ours(backend, inputs, dout, kw, seed_state):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed_state)
    with llmkernels.use_backend(backend), poisoned_allocations():
        out = llmkernels.flash_attn_func(*leaves, **kw)
        out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _reference(inputs, dout, kw, seed, upcast):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    scale = inputs[0].shape[-1] ** -0.5
    left, right = kw["window_size"][0], 0 if kw["causal"] else kw["window_size"][1]
    out, _ = flash_attn_fwd_ref(*leaves, scale, left, right, kw["softcap"], upcast, dropout_p=kw["dropout_p"],
                                dropout_seed=seed)  # fmt: skip
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check_dropout_case(backend, device, dtype, case):
    b, sq, sk, h, hk, d, causal, window, softcap, p = case
    inputs = random_qkv(b, sq, sk, h, hk, d, dtype, device)
    dout = torch.randn(inputs[0].shape, device=device)
    kw = dict(dropout_p=p, causal=causal, window_size=window, softcap=softcap)
    state = int(torch.randint(0, 2**31, ()))
    out, grads = _ours(backend, inputs, dout, kw, state)
    torch.manual_seed(state)
    seed = new_dropout_seed()  # the seed the public function drew
    if dtype == torch.float32:
        exact, exact_grads = _reference([t.double().cpu() for t in inputs], dout.double().cpu(), kw, seed, True)
        torch.testing.assert_close(out.double().cpu(), exact, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for name, g, e in zip(("dq", "dk", "dv"), grads, exact_grads):
            torch.testing.assert_close(g.double().cpu(), e, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip
    else:
        exact, exact_grads = _reference([t.float() for t in inputs], dout, kw, seed, True)
        same, same_grads = _reference(inputs, dout, kw, seed, False)
        assert_error_within_ratio(out, exact, same, ratio=2.0)
        for name, g, e, s in zip(("dq", "dk", "dv"), grads, exact_grads, same_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)
    # The same call with another seed must differ (a mask ignored, or drawn from the wrong indices, fails above;
    # this fails if dropout is not applied at all). Near p = 1 both usually keep nothing.
    if p < 0.99:
        other, _ = _ours(backend, inputs, dout, kw, state + 1)
        assert (other.float() - out.float()).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_backend(case):
    check_dropout_case("reference", "cpu", torch.float32, case)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES + BIG_CASES, ids=_id)
def test_cpu(dtype, case):
    check_dropout_case("cpu", "cpu", dtype, case)


@pytest.mark.triton_interp
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_interpreter(dtype, case):
    check_dropout_case("triton", "cpu", dtype, case)


@pytest.mark.triton_interp
@needs_interpreter
def test_triton_dropout_keeps_the_dq_kernel(monkeypatch):
    """Tiles that ask for the atomic-dq backward (which spills with dropout) still get the dQ kernel with dropout."""
    from llmkernels.triton import flash_attn as fa

    launched = []
    real = fa.launch
    monkeypatch.setattr(fa, "launch", lambda kernel, *a, **kw: (launched.append(kernel.fn.__name__),
                                                                real(kernel, *a, **kw)))  # fmt: skip
    with fa.config_override(bwd_dkdv=(*fa._INTERPRET_CONFIG, 1)):
        check_dropout_case("triton", "cpu", torch.float32, CASES[0])
    assert "flash_attn_bwd_dq_kernel" in launched and "flash_attn_bwd_dkdv_kernel" in launched


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES + BIG_CASES, ids=_id)
def test_cuda(dtype, case):
    """On a GPU the dispatch sends dropout to Triton (the CUDA C++ kernels refuse it)."""
    b, sq, sk, h, hk, d = case[:6]
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype, "cuda")
    assert llmkernels.ops.attention.flash_attn.choose(q, k, v, 0.1, -1, -1, 0.0, dropout_p=0.1,
                                                      dropout_seed=new_dropout_seed()) == "triton"  # fmt: skip
    check_dropout_case("triton", "cuda", dtype, case)


# ---------------------------------------------------------------------------------------------------
# flash_attn_varlen_func: sequence b's mask is batch row b's, rows and keys counted within the sequence
# ---------------------------------------------------------------------------------------------------
def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


VARLEN_BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=needs_cpu_kernel),
    pytest.param("triton", id="triton-interp", marks=[pytest.mark.triton_interp, needs_interpreter]),
]


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_varlen(backend):
    lens_q, lens_k, h, hk, d, p = [5, 0, 17, 33], [9, 4, 17, 20], 4, 2, 16, 0.3
    q = torch.randn(sum(lens_q), h, d)
    k, v = torch.randn(sum(lens_k), hk, d), torch.randn(sum(lens_k), hk, d)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    dout = torch.randn(q.shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    with llmkernels.use_backend(backend), poisoned_allocations():
        out = llmkernels.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p,
                                                causal=True)  # fmt: skip
        out.backward(dout)
    torch.manual_seed(7)
    seed = new_dropout_seed()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = flash_attn_varlen_fwd_ref(*exact, cu_q, cu_k, d**-0.5, -1, 0, dropout_p=p, dropout_seed=seed)
    ref.backward(dout.double())
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
    for name, g, e in zip(("dq", "dk", "dv"), (t.grad for t in leaves), (t.grad for t in exact)):
        torch.testing.assert_close(g.double(), e, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip
    # Sequence 2 alone, as batch row 2 of a dense call with the same seed, gives the same rows.
    s0, s1, k0, k1 = int(cu_q[2]), int(cu_q[3]), int(cu_k[2]), int(cu_k[3])
    alone, _ = flash_attn_fwd_ref(q[s0:s1][None].double(), k[k0:k1][None].double(), v[k0:k1][None].double(),
                                  d**-0.5, -1, 0, dropout_p=p, dropout_seed=seed, first_b=2)  # fmt: skip
    torch.testing.assert_close(out.detach()[s0:s1].double(), alone[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The public functions' seed, layers, errors, opcheck, compile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_manual_seed_repeats_a_call_and_the_next_call_differs(backend):
    q, k, v = random_qkv(1, 16, 16, 2, 2, 16, torch.float32, "cpu")
    with llmkernels.use_backend(backend):
        torch.manual_seed(3)
        first, second = llmkernels.flash_attn_func(q, k, v, 0.5), llmkernels.flash_attn_func(q, k, v, 0.5)
        torch.manual_seed(3)
        again = llmkernels.flash_attn_func(q, k, v, 0.5)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - second).abs().max() > 1e-2


def test_zero_dropout_draws_nothing():
    """dropout_p = 0 must not touch the generator (a model in eval mode keeps its random stream)."""
    q, k, v = random_qkv(1, 8, 8, 2, 2, 16, torch.float32, "cpu")
    torch.manual_seed(5)
    with llmkernels.use_backend("reference"):
        llmkernels.flash_attn_func(q, k, v, 0.0)
    after = torch.rand(())
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(()))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.1", True])
def test_bad_dropout_p_is_named(bad):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        llmkernels.flash_attn_func(q, k, v, bad)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p"):
        llmkernels.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, bad)


def test_layer_drops_in_training_only():
    layer = llmkernels.nn.MultiheadFlashAttention(32, 4, 2, dropout=0.5)
    x = torch.randn(2, 9, 32)
    with llmkernels.use_backend("reference"):
        layer.train()
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        b = layer(x)
        layer.eval()
        c, d = layer(x), layer(x)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="dropout"):
            llmkernels.nn.MultiheadFlashAttention(32, 4, dropout=bad)


@needs_cpu_kernel
def test_cpu_op_refuses_a_missing_seed():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="dropout_seed"):
        torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.25, -1, -1, 0.0, None, 0.1, None)


@needs_cpu_kernel
def test_opcheck_cpu():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 9, 12, 4, 2, 16, torch.float32, "cpu"))
    seed = new_dropout_seed()
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_fwd.default, (q, k, v, 0.25, -1, 0, 0.0, None, 0.3, seed))
    out, lse = torch.ops.llmkernels.flash_attn_fwd(q, k, v, 0.25, -1, 0, 0.0, None, 0.3, seed)
    # (the backward op has no derivative: its inputs must not ask for one, or opcheck's autograd test raises)
    q, k, v = q.detach(), k.detach(), v.detach()
    args = (torch.randn_like(out), q, k, v, out.detach(), lse.detach(), 0.25, -1, 0, 0.0, None, None, 0.3, seed)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_bwd.default, args)


@needs_cpu_kernel
def test_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 9, 12, 4, 2, 16, torch.float32, "cpu"))

    def fn(q, k, v):
        return llmkernels.flash_attn_func(q, k, v, 0.3, causal=True)

    torch.manual_seed(11)
    eager = fn(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.triton_interp
@needs_interpreter
def test_triton_fp16_near_p_one_stays_finite():
    """A factor of up to 65536 (p near 1) must not meet fp16 P: the kernels scale the fp32 accumulators instead."""
    check_dropout_case("triton", "cpu", torch.float16, (1, 17, 40, 2, 2, 16, False, (-1, -1), 0.0, 0.99999))


@pytest.mark.triton_interp
@needs_interpreter
def test_triton_opcheck_with_dropout():
    """The Triton ops trace with fake tensors (the seed's values are read by the kernels, never on the host)."""
    import llmkernels.triton.flash_attn  # noqa: F401  (registers the Triton ops when this test runs alone)

    q, k, v = (t.requires_grad_() for t in random_qkv(1, 17, 17, 2, 1, 16, torch.float32, "cpu"))
    seed = new_dropout_seed()
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_fwd_triton.default,
                          (q, k, v, 0.25, -1, 0, 0.0, False, None, 0.3, seed))  # fmt: skip
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, 0, 0.0, False, None, 0.3, seed)
    q, k, v = q.detach(), k.detach(), v.detach()  # (the backward op has no backward of its own)
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_bwd_triton.default,
                          (torch.randn_like(out), q, k, v, out.detach(), lse.detach(), 0.25, -1, 0, 0.0, False, None,
                           None, 0.3, seed))  # fmt: skip


def test_seed_ignores_the_default_device():
    """The seed is drawn on the CPU even under torch.device(...): the kernels take it from there."""
    q, k, v = random_qkv(1, 8, 8, 2, 2, 16, torch.float32, "cpu")
    with torch.device("meta"):
        seed = new_dropout_seed()
    assert seed.device.type == "cpu"
    with torch.device("meta"), llmkernels.use_backend("reference"):
        out = llmkernels.flash_attn_func(q, k, v, 0.5)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_dropout_p_as_numpy_or_0d_tensor():
    np = pytest.importorskip("numpy")
    q, k, v = random_qkv(1, 8, 8, 2, 2, 16, torch.float32, "cpu")
    with llmkernels.use_backend("reference"):
        outs = []
        for p in (0.25, np.float32(0.25), torch.tensor(0.25)):
            torch.manual_seed(9)
            outs.append(llmkernels.flash_attn_func(q, k, v, p))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
