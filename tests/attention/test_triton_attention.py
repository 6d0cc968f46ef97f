"""The Triton flash attention ops (llmkernels/triton/flash_attn.py) against the reference.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py before this module
is imported, so the @triton.jit kernels are defined as interpreted ones): small shapes, fp32 against the fp64
reference and fp16 within 2x (output) / 3x (gradients) the error of the fp16 PyTorch reference. bf16 is left
to the GPU cases: the interpreter's bf16 tl.dot is not faithful. The `cuda` cases run the larger grid.
Covers flash_attn_fwd_triton / flash_attn_bwd_triton (through autograd) and flash_attn_with_kvcache_triton.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils import assert_error_within_ratio

from llmkernels.reference.attention import flash_attn_fwd_ref, flash_attn_with_kvcache_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    from llmkernels.triton import flash_attn as fa
else:
    fa = None

interp = pytest.mark.triton_interp

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, window_left, window_right, softcap); window -1 = unbounded,
# window_right 0 = causal. With the interpreter's 16 x 16 tiles, 17 / 33 / 64 cross partial and full tiles.
INTERP_CASES = [
    (17, 17, 2, 2, 32, -1, -1, 0.0),  # full attention, ragged tile
    (33, 33, 4, 1, 16, -1, 0, 0.0),  # causal, GQA 4
    (1, 33, 2, 2, 40, -1, 0, 0.0),  # one query (decode), head dim not a power of two
    (64, 17, 2, 2, 16, -1, 0, 0.0),  # seqlen_q > seqlen_k causal: the first 47 rows see no key
    (17, 64, 4, 1, 64, -1, 0, 0.0),  # seqlen_q < seqlen_k causal, GQA 4, unmasked middle tiles
    (64, 64, 2, 2, 16, 0, 0, 0.0),  # window (0, 0): the diagonal only
    (33, 64, 2, 2, 32, 5, 3, 0.0),  # small two-sided window
    (17, 33, 2, 2, 16, 100, 2**31 - 1, 0.0),  # windows wider than the sequences (no int32 overflow)
    (33, 33, 4, 4, 40, -1, -1, 5.0),  # softcap
    (64, 64, 4, 1, 16, 7, 0, 2.0),  # sliding window + softcap + GQA
]
FP16_CASES = [INTERP_CASES[i] for i in (1, 3, 6, 9)]
# fp32 kernels against the fp64 reference (the attention family's bounds): reordered fp32 sums, up to 2k keys.
FP32_TOL = {"out": (1e-4, 1e-5), "grad": (2e-4, 5e-5)}


def _inputs(case, dtype, device, batch=2, layout="contiguous"):
    sq, sk, h, hk, d = case[:5]
    q = torch.randn(batch, sq, h, d, device=device).to(dtype)
    if layout == "packed":  # q, k, v as views of one (b, s, 3, h, d) tensor: strides that are not the shape's
        qkv = torch.randn(batch, sq, 3, h, d, device=device).to(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    k = torch.randn(batch, sk, hk, d, device=device).to(dtype)
    v = torch.randn(batch, sk, hk, d, device=device).to(dtype)
    return q, k, v


def _fwd_bwd(fn, inputs, dout):
    """(out, lse, [dq, dk, dv]) of fn(*fresh leaf copies) -> (out, lse), backpropagating dout through out."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _check_against_reference(case, dtype, device, layout="contiguous"):
    window_left, window_right, softcap = case[5:]
    inputs = _inputs(case, dtype, device, layout=layout)
    scale = inputs[0].shape[-1] ** -0.5
    args = (scale, window_left, window_right, softcap)
    dout = torch.randn(inputs[0].shape, device=device)

    out, lse, grads = _fwd_bwd(lambda q, k, v: torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, *args), inputs,
                               dout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    exact_in = [t.detach().to(exact_dtype) for t in inputs]
    exact, exact_lse, exact_grads = _fwd_bwd(lambda *t: flash_attn_fwd_ref(*t, *args), exact_in, dout)

    # Every element is compared (the ops allocate their outputs, so unwritten ones would show as garbage/NaN).
    if dtype == torch.float32:  # tight absolute bounds: the fp32 reference can be exact (one key per row)
        torch.testing.assert_close(out.double(), exact, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
        for name, g, e in zip(("dq", "dk", "dv"), grads, exact_grads):
            torch.testing.assert_close(g.double(), e, rtol=FP32_TOL["grad"][0], atol=FP32_TOL["grad"][1],
                                       msg=lambda m, name=name: f"{name}: {m}")
    else:
        same, _, same_grads = _fwd_bwd(lambda *t: flash_attn_fwd_ref(*t, *args, upcast=False), inputs, dout)
        assert_error_within_ratio(out, exact, same, ratio=2.0)
        for name, g, e, s in zip(("dq", "dk", "dv"), grads, exact_grads, same_grads):
            assert_error_within_ratio(g, e, s, ratio=3.0, name=name)
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "lse must be -inf exactly where a row sees no key"
    torch.testing.assert_close(lse[seen].double(), exact_lse[seen].double(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Interpreter (CPU tensors)
# --------------------------------------------------------------------------------------------------
@interp
def test_kernels_run_in_the_interpreter():
    if HAS_CUDA:
        pytest.skip("a GPU is present: the kernels are compiled, not interpreted")
    assert fa is not None and fa._INTERPRET, "conftest must set TRITON_INTERPRET=1 before the module is imported"
    assert type(fa.flash_attn_fwd_kernel).__name__ == "InterpretedFunction"
    q = torch.randn(1, 3, 1, 16, requires_grad=True)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, q, q, 0.25, -1, -1, 0.0)
    # softmax_lse is differentiable (return_attn_probs; tests/attention/test_softmax_lse.py checks its gradient)
    assert out.requires_grad and lse.requires_grad


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("case", INTERP_CASES)
def test_fp32_matches_fp64_reference(case):
    _check_against_reference(case, torch.float32, "cpu")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_within_ratio_of_fp16_reference(case):
    _check_against_reference(case, torch.float16, "cpu")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("softcap", [1e5, 1e29])
def test_large_softcap_keeps_the_scores(softcap):
    """A cap far above the scores: tanh(s / cap) cap must stay s. tanh as (1 - t) / (1 + t), t = 2^(-2|x| log2 e),
    cancels as x -> 0 (every score 0 at 1e29, in the interpreter too); the kernels take the series there."""
    _check_against_reference((17, 33, 2, 1, 16, -1, 0, softcap), torch.float32, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("softcap", [1e3, 1e5, 1e7])
def test_gpu_large_softcap_keeps_the_scores(softcap):
    """On the GPU (exp2 is an approximation there): the cancellation cost ~cap * 6e-8 of each score before."""
    _check_against_reference((129, 200, 4, 2, 64, -1, 0, softcap), torch.float32, "cuda")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
def test_strided_inputs():
    _check_against_reference((17, 17, 2, 2, 16, -1, 0, 0.0), torch.float32, "cpu", layout="packed")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
def test_empty_key_sequence_gives_zero_and_lse_minus_inf():
    q = torch.randn(1, 3, 2, 16)
    k = v = torch.randn(1, 0, 2, 16)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, -1, 0.0)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_opcheck(op):
    q, k, v = _inputs((17, 17, 2, 1, 16), torch.float32, "cpu", batch=1)
    args = (0.25, 3, 0, 1.5)
    if op == "fwd":
        torch.library.opcheck(
            torch.ops.llmkernels.flash_attn_fwd_triton.default,
            (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *args),
        )
    else:
        out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, *args)
        torch.library.opcheck(
            torch.ops.llmkernels.flash_attn_bwd_triton.default, (torch.randn_like(out), q, k, v, out, lse, *args)
        )


@interp
def test_public_function_compiles_on_its_first_call():
    """torch.compile(fullgraph=True) of flash_attn_func when Triton is the backend and the compiled call is the
    process's first: the dispatcher's Triton check imports llmkernels.triton.flash_attn inside the trace, which
    dynamo refused when done through importlib (what a GPU, where auto-dispatch picks Triton, hit). A fresh process:
    this test run has imported the module long before."""
    import subprocess
    import sys

    code = (
        "import torch, llmkernels\n"
        "q = torch.randn(1, 17, 2, 16)\n"
        "with llmkernels.use_backend('triton'):\n"
        "    out = torch.compile(llmkernels.flash_attn_func, fullgraph=True, backend='eager')(q, q, q, causal=True)\n"
        "print(tuple(out.shape))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not HAS_CUDA else dict(os.environ)
    device_code = code if not HAS_CUDA else code.replace("torch.randn(1, 17, 2, 16)", "torch.randn(1, 17, 2, 16, "
                                                          "device='cuda', dtype=torch.bfloat16)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", device_code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1, 17, 2, 16)" in done.stdout


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
def test_torch_compile_fullgraph():
    q, k, v = _inputs((17, 17, 2, 2, 16), torch.float32, "cpu", batch=1)
    # aot_eager: traces the op through the fake kernel and autograd formula without compiling C++ (cheap).
    compiled = torch.compile(fa.flash_attn_triton, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, 0.25, -1, 0, 0.0)
    torch.testing.assert_close(out, fa.flash_attn_triton(q, k, v, 0.25, -1, 0, 0.0))


BAD_INPUTS = [
    # (what to change, the argument the error must name)
    (lambda q, k, v: (q[0], k, v), "q must have 4 dimensions"),
    (lambda q, k, v: (q.int(), k, v), "q must have dtype"),
    (lambda q, k, v: (q, k.double(), v), "k must have dtype"),
    (lambda q, k, v: (q, k.half(), v), "k must have the dtype of q"),
    (lambda q, k, v: (q, k, v[..., :8]), "v must have shape"),
    (lambda q, k, v: (q, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)), "nheads_k"),
    (lambda q, k, v: (q.transpose(1, 3), k, v), "q must be contiguous in its last dimension"),
    (lambda q, k, v: (q, k.to("meta"), v), "k must be on cpu"),
    (lambda q, k, v: (torch.randn(1, 5, 2, 300), k, v), "head dim must be <= 256"),
]


@interp
@pytest.mark.parametrize("change,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(change, message):
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v = _inputs((5, 5, 2, 2, 16), torch.float32, "cpu", batch=1)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.llmkernels.flash_attn_fwd_triton(*change(q, k, v), 0.25, -1, -1, 0.0)


def test_bwd_rejects_bad_lse():
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v = _inputs((5, 5, 2, 2, 16), torch.float32, "cpu", batch=1)
    with pytest.raises(ValueError, match="softmax_lse must have shape"):
        torch.ops.llmkernels.flash_attn_bwd_triton(q, q, k, v, q, torch.zeros(1, 2, 4), 0.25, -1, -1, 0.0)


# --------------------------------------------------------------------------------------------------
# GPU (compiled kernels): the attention grid at realistic sizes
# --------------------------------------------------------------------------------------------------
GPU_SEQLENS = [(1, 1), (113, 113), (128, 2048), (1023, 1024), (2048, 2048), (2048, 113)]
GPU_HEADDIMS = [32, 40, 64, 96, 128, 256]
GPU_MASKS = [(-1, -1, 0.0), (-1, 0, 0.0), (256, 0, 0.0), (64, 64, 0.0), (-1, 0, 30.0)]
GPU_HEADS = [(8, 8), (8, 2), (16, 2)]  # GQA 1, 4, 8
# Every (seqlens, head dim, dtype) once, the masks and GQA ratios cycled through them: 72 cases, every value of
# every axis covered, instead of a 1080-case product.
GPU_CASES = [
    pytest.param((*s, *GPU_HEADS[i // len(GPU_MASKS) % len(GPU_HEADS)], d, *GPU_MASKS[i % len(GPU_MASKS)]), dtype,
                 id=f"s{s[0]}x{s[1]}-d{d}-{str(dtype)[6:]}-m{i % len(GPU_MASKS)}-g{i // len(GPU_MASKS) % 3}")
    for i, (s, d, dtype) in enumerate(
        (s, d, dtype) for s in GPU_SEQLENS for d in GPU_HEADDIMS for dtype in (torch.float16, torch.bfloat16)
    )
]


@pytest.mark.cuda
@pytest.mark.parametrize("case,dtype", GPU_CASES)
def test_gpu_grid(case, dtype):
    _check_against_reference(case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("headdim", [64, 256])
def test_gpu_fp32_and_strided(headdim):
    _check_against_reference((257, 300, 4, 2, headdim, -1, 0, 0.0), torch.float32, "cuda")
    _check_against_reference((200, 200, 4, 4, headdim, 32, 0, 0.0), torch.float16, "cuda", layout="packed")


# --------------------------------------------------------------------------------------------------
# The forward's TMA variant (a 5th config field 1): opt-in, only tuned files / config_override select it
# --------------------------------------------------------------------------------------------------
TMA = "flash_attn_fwd_tma_kernel"
# Head dims powers of two (the variant's condition); batch 2 and several KV heads, so a descriptor row or column
# off by a batch or a head shows; each case has unmasked middle tiles (the ones read through the descriptors).
TMA_INTERP_CASES = [
    (17, 17, 2, 2, 32, -1, -1, 0.0),  # full, ragged last tile (masked, pointer loads) after an unmasked one
    (33, 48, 4, 2, 16, -1, 0, 0.0),  # causal, GQA 2, seqlen_q < seqlen_k
    (64, 40, 2, 2, 16, -1, 0, 0.0),  # rows 0-23 see no key: m stays -inf through the folded max
    (64, 64, 4, 2, 16, 40, 0, 2.0),  # sliding window + softcap (no fold: the softcap has its own scale)
]


def _kernels_launched(monkeypatch) -> list[str]:
    names: list[str] = []
    real = fa.launch

    def spy(kernel, grid, *args, **kwargs):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fa, "launch", spy)
    return names


def _tma_config(interp: bool, headdim: int = 128, variant: int = 1) -> tuple[int, ...]:
    """Variant 1: TMA loads of the unmasked tiles; 2: of every tile."""
    if interp:
        return (*fa._INTERPRET_CONFIG, variant)
    return (64, 32, 4, 2, variant) if headdim > 128 else (128, 64, 8, 3, variant)


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("case", TMA_INTERP_CASES)
def test_tma_variant_fp16_within_ratio_of_fp16_reference(case, variant, monkeypatch):
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(fwd=_tma_config(True, variant=variant)):
        _check_against_reference(case, torch.float16, "cpu")
    assert launched[0] == TMA


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("variant", [1, 2])
def test_tma_variant_strided_rows(variant, monkeypatch):
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(fwd=_tma_config(True, variant=variant)):  # k, v rows 3 * h * d apart (one qkv tensor)
        _check_against_reference((33, 33, 2, 2, 32, -1, 0, 0.0), torch.float16, "cpu", layout="packed")
    assert launched[0] == TMA


@interp
@pytest.mark.parametrize("variant", [1, 2])
def test_tma_variant_keeps_batches_apart(variant, monkeypatch):
    """A ragged last key tile read through a descriptor holds the next batch's first rows: NaN there (the next
    batch's own business) must not reach this batch's output."""
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = "cuda" if HAS_CUDA else "cpu"
    sk = 40 if not HAS_CUDA else 1000  # not a multiple of the key tile
    q, k, v = _inputs((33, sk, 4, 2, 32 if not HAS_CUDA else 128), torch.float16, device)
    k[1], v[1] = float("nan"), float("nan")
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(fwd=_tma_config(not HAS_CUDA, variant=variant)):
        out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.2, -1, -1, 0.0)
    exact, exact_lse = flash_attn_fwd_ref(q[:1].float(), k[:1].float(), v[:1].float(), 0.2)
    same, _ = flash_attn_fwd_ref(q[:1], k[:1], v[:1], 0.2, upcast=False)
    assert launched == [TMA]
    assert_error_within_ratio(out[:1], exact, same, ratio=2.0)
    torch.testing.assert_close(lse[:1], exact_lse, rtol=1e-5, atol=1e-5)


def _transposed_kv(q, k, v):  # (b, hk, s, d) storage: heads are not adjacent in a row, no 2-D view
    return q, k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)


TMA_FALLBACKS = [
    # (why the variant cannot run, dtype, head dim, softmax_scale, inputs)
    ("head dim not a power of two", torch.float16, 40, 0.2, lambda q, k, v: (q, k, v)),
    ("negative scale: max(c x) != c max(x)", torch.float16, 32, -0.2, lambda q, k, v: (q, k, v)),
    ("fp32", torch.float32, 32, 0.2, lambda q, k, v: (q, k, v)),
    ("heads not adjacent", torch.float16, 32, 0.2, _transposed_kv),
]


@interp
@pytest.mark.parametrize("why,dtype,headdim,scale,change", TMA_FALLBACKS, ids=[f[0] for f in TMA_FALLBACKS])
def test_tma_variant_falls_back_to_the_pointer_kernel(why, dtype, headdim, scale, change, monkeypatch):
    """Shapes the TMA kernel cannot take run flash_attn_fwd_kernel with the same tiles: the same bits."""
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = "cuda" if HAS_CUDA else "cpu"
    q, k, v = change(*_inputs((33, 40, 4, 2, headdim), dtype, device))
    launched = _kernels_launched(monkeypatch)
    cfg = _tma_config(not HAS_CUDA, headdim)
    with fa.config_override(fwd=cfg):
        out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, scale, -1, 0, 0.0)
    with fa.config_override(fwd=cfg[:4]):
        ref_out, ref_lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, scale, -1, 0, 0.0)
    assert launched == ["flash_attn_fwd_kernel"] * 2
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# seqlens cross full 64 / 128-key tiles and a ragged end; every head-dim bucket; GQA; the masks cycled through
# them (each of the 5 on 3 cases) and fp16 / bf16 alternating.
GPU_TMA_CASES = [
    pytest.param((sq, sk, h, hk, d, *GPU_MASKS[i % len(GPU_MASKS)]), (torch.float16, torch.bfloat16)[i % 2],
                 id=f"s{sq}x{sk}-d{d}-m{i % len(GPU_MASKS)}-{('fp16', 'bf16')[i % 2]}")
    for i, ((sq, sk), d, (h, hk)) in enumerate(
        ((s, d, g) for s in [(113, 113), (1023, 1024), (2048, 2048), (128, 2048), (2048, 113)]
         for d, g in [(64, (8, 8)), (128, (8, 2)), (256, (16, 2))])
    )
]  # fmt: skip


@pytest.mark.cuda
def test_gpu_tma_variant_under_torch_compile(monkeypatch):
    """The descriptors must survive torch.compile's tracing of the op (wrap_triton), or the variant cannot become a
    default."""
    launched = _kernels_launched(monkeypatch)
    q, k, v = _inputs((1024, 1024, 8, 2, 128), torch.bfloat16, "cuda")
    with fa.config_override(fwd=_tma_config(False)):
        eager = fa.flash_attn_triton(q, k, v, 0.1, -1, 0)
        torch._dynamo.reset()
        compiled = torch.compile(fa.flash_attn_triton, fullgraph=True)(q, k, v, 0.1, -1, 0)
    assert launched and set(launched) == {TMA}
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-2)  # a wrong descriptor moves rows by O(1)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("case,dtype", GPU_TMA_CASES)
def test_gpu_tma_variant(case, dtype, variant, monkeypatch):
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(fwd=_tma_config(False, case[4], variant)):
        _check_against_reference(case, dtype, "cuda")
    assert launched[0] == TMA


# --------------------------------------------------------------------------------------------------
# The backward's atomic-dq variant (a 5th dK/dV config field 1): dq added by the dK/dV kernel, no dQ kernel
# --------------------------------------------------------------------------------------------------
DKDV, DQ_KERNEL = "flash_attn_bwd_dkdv_kernel", "flash_attn_bwd_dq_kernel"


def _atomic_config(interp: bool, headdim: int = 128, variant: int = 1) -> tuple[int, ...]:
    """Variant 1: pointer atomics; 2: TMA reduce (the interpreter has none: it runs 1 there)."""
    if interp:
        return (*fa._INTERPRET_CONFIG, variant)
    return (32, 64, 8, 2, variant) if headdim > 128 else (64, 64, 8, 2, variant)


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES)
def test_atomic_dq_matches_reference(case, dtype, monkeypatch):
    """Every mask, GQA, softcap and ragged case of the grid: the dK/dV kernel's dq must equal the dQ kernel's
    within the same bounds, so every key block's share lands in the right rows exactly once."""
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(bwd_dkdv=_atomic_config(True, variant=1 + (dtype == torch.float16))):
        _check_against_reference(case, dtype, "cpu")
    assert DKDV in launched and DQ_KERNEL not in launched, launched


def _dq_arg_of_backward(monkeypatch, q, k, v, cfg):
    """What the backward hands the dK/dV kernel as DQ (a tensor or a TMA descriptor), with compiled kernels' host
    logic (not the interpreter's) and no kernel run."""
    seen = []
    monkeypatch.setattr(fa, "_INTERPRET", False)
    monkeypatch.setattr(fa, "launch", lambda kernel, grid, *args, **kw: seen.append((kernel.fn.__name__, args)))
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
    with fa.config_override(bwd_dkdv=cfg):
        fa.flash_attn_bwd_triton._init_fn(q, q, k, v, q, lse, 0.25, -1, 0, 0.0)
    return next(args for name, args in seen if name == DKDV)[8]  # (q, k, v, dout, lse, delta, dk, dv, DQ, ...)


@pytest.mark.skipif(fa is None, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_tma_reduce_descriptor_and_its_fallbacks(monkeypatch):
    """Variant 2's descriptor covers dq (b, sq, h, d) in boxes (1, BLOCK_M, 1, d); a padded head dim, and tracing
    by torch.compile (fake tensors: its write analysis does not see TMA reduces), take the pointer atomics."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.tools.tensor_descriptor import TensorDescriptor

    q, k, v = _inputs((33, 40, 4, 2, 32), torch.float16, "cpu")
    desc = _dq_arg_of_backward(monkeypatch, q, k, v, (16, 32, 1, 1, 2))
    assert isinstance(desc, TensorDescriptor) and desc.base.dtype == torch.float32
    assert list(desc.shape) == list(q.shape) and list(desc.block_shape) == [1, 16, 1, 32]
    q40, k40, v40 = _inputs((33, 40, 4, 2, 40), torch.float16, "cpu")  # BLOCK_D 64
    assert isinstance(_dq_arg_of_backward(monkeypatch, q40, k40, v40, (16, 32, 1, 1, 2)), torch.Tensor)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert isinstance(_dq_arg_of_backward(monkeypatch, fq, fk, fv, (16, 32, 1, 1, 2)), torch.Tensor)


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow in the padding keys' dS is the point
@pytest.mark.parametrize("dtype,magnitude", [(torch.float16, 2.0), (torch.float32, 4.8)])
def test_atomic_dq_ignores_keys_past_the_end(dtype, magnitude):
    """Every real score very negative (lse far below 0) and seqlen_k not a tile multiple: the padding keys, loaded
    as 0, score 0, so their unmasked P and dS are huge (inf once cast); dq must still be finite and right."""
    q = torch.full((1, 32, 1, 16), magnitude).to(dtype)
    k = torch.full((1, 40, 1, 16), -magnitude).to(dtype)
    v, dout = torch.randn(1, 40, 1, 16).to(dtype), torch.randn(1, 32, 1, 16).to(dtype)
    out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 0.25, -1, -1, 0.0)
    grads = {}
    for cfg in (fa._INTERPRET_CONFIG, _atomic_config(True)):
        with fa.config_override(bwd_dkdv=cfg):
            grads[len(cfg)] = torch.ops.llmkernels.flash_attn_bwd_triton(dout, q, k, v, out, lse, 0.25, -1, -1, 0.0)
    assert bool(grads[5][0].isfinite().all()), "NaN / inf in dq from keys past seqlen_k"
    torch.testing.assert_close(grads[5][0], grads[4][0], rtol=2e-3, atol=2e-3)


@interp
@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_keeps_the_dq_kernel(deterministic, monkeypatch):
    """flash_attn_func(deterministic=True) reaches the Triton backward, which then keeps the dQ kernel (fixed
    summation order) even where the tuned tiles ask for atomics; both give dq within rounding of each other."""
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    import llmkernels

    device = "cuda" if HAS_CUDA else "cpu"
    q, k, v = (t.requires_grad_() for t in _inputs((33, 40, 4, 2, 32), torch.float16, device))
    dout = torch.randn_like(q)
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(bwd_dkdv=_atomic_config(not HAS_CUDA, 32)), llmkernels.use_backend("triton"):
        out = llmkernels.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert (DQ_KERNEL in launched) == deterministic, launched
    with fa.config_override(bwd_dkdv=_atomic_config(not HAS_CUDA, 32)[:4]):
        ref_out, lse = torch.ops.llmkernels.flash_attn_fwd_triton(q, k, v, 32**-0.5, -1, 0, 0.0)
        ref = torch.ops.llmkernels.flash_attn_bwd_triton(dout, q, k, v, ref_out, lse, 32**-0.5, -1, 0, 0.0)
    assert torch.equal(dk, ref[1]) and torch.equal(dv, ref[2])  # dK / dV do not change with the variant
    if deterministic:
        assert torch.equal(dq, ref[0])
    else:
        torch.testing.assert_close(dq, ref[0], rtol=2e-3, atol=2e-3)  # fp32 sums in another order, one rounding


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("case,dtype", GPU_CASES[::7])  # every seqlen pair, head dim, mask and dtype once
def test_gpu_atomic_dq(case, dtype, variant, monkeypatch):
    """Head dims 40 / 96 (padded tiles) take variant 1 when 2 is asked: the same answers."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dq_args = []
    real = fa.launch

    def spy(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "fn", kernel).__name__
        if name == DKDV:
            dq_args.append(args[8])  # (q, k, v, dout, lse, delta, dk, dv, DQ, ...)
        assert name != DQ_KERNEL, "the dK/dV kernel adds dq: the dQ kernel must not run"
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fa, "launch", spy)
    with fa.config_override(bwd_dkdv=_atomic_config(False, case[4], variant)):
        _check_against_reference(case, dtype, "cuda")
    tma = variant == 2 and case[4] in (32, 64, 128, 256)  # head dims that fill BLOCK_D take the TMA reduce
    assert dq_args and all(isinstance(a, TensorDescriptor) == tma for a in dq_args), [type(a) for a in dq_args]


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 2])
def test_gpu_atomic_dq_under_torch_compile_and_deterministic(variant, monkeypatch):
    import llmkernels

    q, k, v = (t.requires_grad_() for t in _inputs((1023, 1024, 8, 2, 128), torch.bfloat16, "cuda"))
    dout = torch.randn_like(q)
    launched = _kernels_launched(monkeypatch)
    with fa.config_override(bwd_dkdv=_atomic_config(False, 128, variant)), llmkernels.use_backend("triton"):
        eager = torch.autograd.grad(llmkernels.flash_attn_func(q, k, v, causal=True), q, dout)[0]
        torch._dynamo.reset()
        compiled_fn = torch.compile(lambda *t: llmkernels.flash_attn_func(*t, causal=True), fullgraph=True)
        compiled = torch.autograd.grad(compiled_fn(q, k, v), q, dout)[0]
        assert DQ_KERNEL not in launched
        runs = [torch.autograd.grad(llmkernels.flash_attn_func(q, k, v, causal=True, deterministic=True), q, dout)[0]
                for _ in range(2)]  # fmt: skip
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-2)  # a misplaced tile moves rows by O(1)
    assert torch.equal(runs[0], runs[1]) and DQ_KERNEL in launched
    torch.testing.assert_close(runs[0], eager, rtol=0, atol=2e-2)


# --------------------------------------------------------------------------------------------------
# Decode against a KV cache (split-KV + combine)
# --------------------------------------------------------------------------------------------------
# (batch, seqlen_q, nheads, nheads_k, headdim, capacity, seqlen_new, window_left, window_right, softcap, lens)
KV_INTERP_CASES = [
    (2, 1, 4, 1, 32, 40, 1, -1, 0, 0.0, [5, 39]),  # one new token, GQA 4, one row filling the cache
    (2, 3, 4, 2, 40, 64, 3, 7, 0, 2.0, [0, 50]),  # 3 new tokens, window, softcap, an empty cache row
    (3, 1, 2, 2, 16, 33, 0, -1, -1, 0.0, [0, 17, 33]),  # no new tokens: row 0 sees nothing
]


def _kvcache_inputs(case, dtype, device):
    b, sq, h, hk, d, cap, s_new = case[:7]
    q = torch.randn(b, sq, h, d, device=device).to(dtype)
    k_cache = torch.randn(b, cap, hk, d, device=device).to(dtype)
    v_cache = torch.randn(b, cap, hk, d, device=device).to(dtype)
    k_new = torch.randn(b, s_new, hk, d, device=device).to(dtype) if s_new else None
    v_new = torch.randn(b, s_new, hk, d, device=device).to(dtype) if s_new else None
    lens = torch.tensor(case[10], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, k_new, v_new, lens


def _check_kvcache(case, dtype, device):
    q, k_cache, v_cache, k_new, v_new, lens = _kvcache_inputs(case, dtype, device)
    window_left, window_right, softcap = case[7:10]
    scale = q.shape[-1] ** -0.5
    exact_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    up = lambda t: None if t is None else t.to(exact_dtype)  # noqa: E731
    exact_k, exact_v = up(k_cache), up(v_cache)
    same_k, same_v = k_cache.clone(), v_cache.clone()
    kw = dict(window_size=(window_left, window_right), softcap=softcap)

    out = torch.ops.llmkernels.flash_attn_with_kvcache_triton(q, k_cache, v_cache, k_new, v_new, lens, scale,
                                                              window_left, window_right, softcap)
    exact = flash_attn_with_kvcache_ref(up(q), exact_k, exact_v, up(k_new), up(v_new), lens, scale, **kw)
    same = flash_attn_with_kvcache_ref(q, same_k, same_v, k_new, v_new, lens, scale, upcast=False, **kw)
    assert torch.equal(k_cache, same_k) and torch.equal(v_cache, same_v), "the caches must hold the new tokens"
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=FP32_TOL["out"][0], atol=FP32_TOL["out"][1])
    else:
        assert_error_within_ratio(out, exact, same, ratio=2.0)


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
@pytest.mark.parametrize("case", KV_INTERP_CASES)
def test_kvcache_fp32_matches_fp64_reference(case):
    _check_kvcache(case, torch.float32, "cpu")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
def test_kvcache_fp16_within_ratio_of_fp16_reference():
    _check_kvcache(KV_INTERP_CASES[1], torch.float16, "cpu")


@interp
@pytest.mark.skipif(HAS_CUDA, reason="interpreter cases run only without a GPU")
def test_kvcache_opcheck_and_compile():
    args = _kvcache_inputs(KV_INTERP_CASES[0], torch.float32, "cpu")
    torch.library.opcheck(torch.ops.llmkernels.flash_attn_with_kvcache_triton.default, (*args, 0.2, -1, 0, 0.0))
    q, k_cache, v_cache, k_new, v_new, lens = args
    eager = fa.flash_attn_with_kvcache_triton(q, k_cache.clone(), v_cache.clone(), k_new, v_new, lens, 0.2, -1, 0, 0.0)
    compiled = torch.compile(fa.flash_attn_with_kvcache_triton, fullgraph=True, backend="aot_eager")
    out = compiled(q, k_cache, v_cache, k_new, v_new, lens, 0.2, -1, 0, 0.0)
    torch.testing.assert_close(out, eager)


KV_BAD_INPUTS = [
    (lambda a: (a[0], a[1].half(), *a[2:]), "k_cache must have the dtype of q"),
    (lambda a: (*a[:3], a[3], None, a[5]), "k_new and v_new must be given together"),
    (lambda a: (*a[:5], a[5].long()), "cache_seqlens must have dtype"),
    (lambda a: (*a[:5], a[5][:1]), "cache_seqlens must have shape"),
    (lambda a: (a[0], a[1], a[2][:, :4], *a[3:]), "v_cache must have shape"),
]


@pytest.mark.parametrize("change,message", KV_BAD_INPUTS)
def test_kvcache_bad_inputs_name_the_argument(change, message):
    if fa is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    args = _kvcache_inputs(KV_INTERP_CASES[0], torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.llmkernels.flash_attn_with_kvcache_triton(*change(args), 0.2, -1, 0, 0.0)


GPU_KV_CASES = [
    (4, 1, 32, 8, 128, 4096, 1, -1, 0, 0.0, [1, 100, 2047, 4095]),  # decode, GQA 4
    (1, 1, 32, 4, 128, 8192, 1, -1, 0, 0.0, [8000]),  # batch 1, long cache: many splits
    (2, 4, 16, 2, 64, 1024, 4, 256, 0, 0.0, [17, 1000]),  # speculative 4 tokens, sliding window, GQA 8
    (3, 1, 8, 8, 256, 512, 1, -1, 0, 30.0, [0, 113, 511]),  # head dim 256, softcap
    (2, 2, 8, 1, 96, 300, 0, -1, -1, 0.0, [37, 300]),  # no new tokens, MQA
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_KV_CASES)
def test_gpu_kvcache(case, dtype):
    _check_kvcache(case, dtype, "cuda")
