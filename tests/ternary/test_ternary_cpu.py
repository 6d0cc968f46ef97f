"""C++ CPU kernels against the reference: exact integer arithmetic, the epilogue within rounding; opcheck,
torch.compile, bad arguments, and the AVX2 and portable paths (LLMKERNELS_CPU_ISA=avx2 / scalar, in a subprocess)."""


import pytest
import torch
from ternary_cases import DTYPES, MODEL_SHAPES, ODD_SHAPES, check_backend_matches_reference, random_layer
from utils import cpu_has_flag, run_with_cpu_isa, saved_with_amx_on_and_off

import llmkernels
import llmkernels.reference.ternary
from llmkernels import _ext

needs_ext = pytest.mark.skipif(not _ext.has_kernel("ternary_linear_a8", "CPU"), reason="no C++ CPU ternary kernels")
pytestmark = needs_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", ODD_SHAPES)
def test_cpu_matches_reference_odd_shapes(m, n, k, dtype):
    check_backend_matches_reference("cpu", "cpu", m, n, k, dtype)


@pytest.mark.parametrize("m,n,k", MODEL_SHAPES)
def test_cpu_matches_reference_model_shapes(m, n, k):
    check_backend_matches_reference("cpu", "cpu", m, n, k, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_weight_only_prefill_spans_weight_panels(dtype):
    """Weight-only with >= 32 tokens runs one BLAS GEMM per 2 MB panel of unpacked weights: with in_features
    1100 (padded to 1280) a panel holds 409 rows, so 600 outputs take a full panel and a partial one."""
    check_backend_matches_reference("cpu", "cpu", 40, 600, 1100, dtype)  # with a bias
    w_packed, w_scale, _ = random_layer(600, 1100, "cpu")
    x = torch.randn(40, 1100, dtype=dtype)
    y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=None)  # no bias: beta = 0 in the GEMM
    y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x.float(), w_packed, w_scale, None, 1100)
    rtol, atol = (1.3e-6, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-5)
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol * y_ref.abs().max().item())


def test_cpu_int8_gemm_tails():
    """From 12 tokens the int8 product takes the register-tiled VNNI GEMM (tiles of 6 tokens x 64 features, the
    weights unpacked a block at a time): every token-tile tail, feature tails around 16 and 64, several blocks,
    against the reference's int32 accumulator exactly, and the linear op within the epilogue's rounding."""
    torch.manual_seed(0)
    ops = torch.ops.llmkernels
    for m, n, k in [
        (24, 1, 1),
        (25, 15, 257),
        (26, 16, 300),
        (27, 17, 1023),
        (28, 63, 512),
        (29, 65, 1100),
        (30, 130, 256),
        (47, 7, 2560),
    ]:
        w_packed, w_scale, bias = random_layer(n, k, "cpu", bias_dtype=torch.float32)
        x = torch.randn(m, k) * torch.rand(m, 1).mul(4).exp2()
        x_q, _ = llmkernels.reference.ternary.quantize_activation_ref(x)
        acc = ops.ternary_matmul_int8(x_q, w_packed, k)
        expected = llmkernels.reference.ternary.ternary_matmul_int8_ref(x_q, w_packed, k)
        assert torch.equal(acc, expected), (m, n, k)
        y = llmkernels.ternary_linear(x, w_packed, w_scale, bias)
        y_ref = llmkernels.reference.ternary.ternary_linear_a8_ref(x, w_packed, w_scale, bias, k)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6 * y_ref.abs().max().item(), msg=f"{m, n, k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_int8_amx_gemm_tails(dtype):
    """From 8 tokens, on CPUs with AMX-INT8, the int8 product runs on tiles (cpu/ternary_cpu_amx.cpp: strips of 64
    or 256 output features, panels of 32 tokens in 16-token tiles, K in chunks of 512 with the sums carried over,
    the epilogue fused in). Token tails in and across panels, feature tails around the tiles and strips, K over 1,
    2 and 3 chunks with a partial one; the int32 accumulator exactly, the linear op within one rounding of the
    dtype (it applies the reference's epilogue in the same order). Elsewhere the same cases check the VNNI GEMM."""
    torch.manual_seed(1)
    ops = torch.ops.llmkernels
    for m, n, k in [(8, 1, 1), (15, 17, 300), (16, 33, 512), (33, 65, 700), (47, 100, 1300), (300, 600, 1100)]:
        w_packed, w_scale, bias = random_layer(n, k, "cpu", bias_dtype=dtype)
        x = (torch.randn(m, k) * torch.rand(m, 1).mul(4).exp2()).to(dtype)
        x_q, _ = llmkernels.reference.ternary.quantize_activation_ref(x)
        acc = ops.ternary_matmul_int8(x_q, w_packed, k)
        assert torch.equal(acc, llmkernels.reference.ternary.ternary_matmul_int8_ref(x_q, w_packed, k)), (m, n, k)
        for b in (None, bias):
            y = llmkernels.ternary_linear(x, w_packed, w_scale, b)
            y_ref = llmkernels.reference.ternary.ternary_linear_a8_ref(x, w_packed, w_scale, b, k)
            assert y.dtype == dtype
            ulp = {torch.float32: 2e-7, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
            torch.testing.assert_close(y.float(), y_ref.float(), rtol=ulp, atol=ulp * 1e-3 * y_ref.abs().max().item(),
                                       msg=lambda msg, m=m, n=n, k=k: f"{m, n, k}: {msg}")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_weight_only_amx_tails(dtype, bias):
    """Weight-only with 8 to 512 tokens runs on AMX-BF16 tiles where the CPU has them (the int8 GEMM's structure
    with bf16 weight rows and token pairs; fp16 / fp32 x as 2 / 3 bf16 planes summing to it exactly; gamma and the
    bias applied as outputs leave the tiles): token and feature tails, K over several chunks with a partial one,
    against the fp32 reference within one rounding of the dtype (fp32: the fp32 GEMM's summation-order error).
    Elsewhere the same cases check the vdpbf16ps / GEMV / BLAS paths."""
    torch.manual_seed(2)
    for m, n, k in [(8, 1, 1), (40, 70, 1), (17, 33, 300), (40, 65, 1100), (300, 130, 700), (512, 31, 257)]:
        w_packed, w_scale, b = random_layer(n, k, "cpu", bias_dtype=dtype)
        b = b if bias else None
        x = torch.randn(m, k, dtype=dtype) * 3.0  # (fp32: mantissas using all 24 bits, so all three planes count)
        y = llmkernels.ternary_linear(x, w_packed, w_scale, b, act_bits=None)
        y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x.float(), w_packed, w_scale, b, k)
        assert y.dtype == dtype
        if k == 1:  # one product per output, exact in every plane split: the reference's value bit for bit
            assert torch.equal(y, y_ref.to(dtype)), (m, n, k)
        rtol = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 1.3e-6}[dtype]
        torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=1e-5 * y_ref.abs().max().item(),
                                   msg=lambda msg, m=m, n=n, k=k: f"{m, n, k}: {msg}")  # fmt: skip


def test_cpu_weight_only_extreme_magnitudes():
    """fp32 activations go to the bf16 tiles as planes of x scaled per token by a power of two: rows of tiny
    (1e-36: unscaled, the lower planes would be bf16 subnormals, which the tiles read as zero) and huge (an
    element of 3.39e38: bf16(x) would overflow) magnitudes, beside ordinary ones, match the fp32 reference as
    ordinary rows do."""
    torch.manual_seed(4)
    m, n, k = 24, 40, 300
    w_packed, w_scale, _ = random_layer(n, k, "cpu")
    x = torch.randn(m, k) / 4
    x[0::3] *= 1e-36
    x[1::3, 0] = 3.39e38  # above bf16's largest finite value (3.3895e38), below fp32's
    y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=None)
    y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x, w_packed, w_scale, None, k)
    for i in range(3):  # tolerance per group of rows, relative to that group's size
        rows, ref = y[i::3], y_ref[i::3]
        assert torch.equal(torch.isfinite(rows), torch.isfinite(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(rows[finite], ref[finite], rtol=1.3e-6, atol=1e-5 * ref[finite].abs().max().item())


def test_cpu_invalid_code_decodes_to_two():
    """A packed byte holding code 3 (never written by pack_ternary) decodes to 2, as the reference documents, on
    every path: the int8 GEMV / GEMMs, the weight-only GEMVs (1-7 tokens), vdpbf16ps and BLAS-panel GEMMs, and the
    AMX tiles where present (each path's table had to agree; the fp32 GEMVs' read it as 0)."""
    k = 256
    w_packed, w_scale, _ = random_layer(8, k, "cpu")
    w_packed = w_packed.clone()
    w_packed[3, 5] = 0xFF  # four weights of row 3 set to code 3
    for m in (1, 4, 16, 40, 600):
        x = torch.randn(m, k)
        y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=8)
        assert torch.equal(y, llmkernels.reference.ternary.ternary_linear_a8_ref(x, w_packed, w_scale, None, k))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(m, k, dtype=dtype)
            y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=None)
            y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x.float(), w_packed, w_scale, None, k)
            torch.testing.assert_close(y.float(), y_ref, rtol=2**-8, atol=1e-5 * y_ref.abs().max().item())


@pytest.mark.skipif(not cpu_has_flag("amx_int8"), reason="the CPU has no AMX-INT8 tiles")
def test_cpu_int8_amx_and_vnni_paths_agree():
    """LLMKERNELS_CPU_AMX=0 (in a subprocess) gives the VNNI GEMM and the unfused epilogue: the same int32 sums,
    the same outputs (both compute the reference's epilogue)."""
    code = (
        "import torch, llmkernels; from llmkernels.ternary import quantize_weight; torch.manual_seed(0);"
        "wp, ws = quantize_weight(torch.randn(300, 1000)); x = torch.randn(40, 1000, dtype=torch.bfloat16);"
        "x_q, _ = llmkernels.ternary.quantize_activation(x);"
        "torch.save([torch.ops.llmkernels.ternary_matmul_int8(x_q, wp, 1000),"
        " llmkernels.ternary_linear(x, wp, ws)], sys.argv[1])"
    )
    results = saved_with_amx_on_and_off(code)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2**-8, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_weight_only_bf16_gemm_tails(bias):
    """bf16 x with >= 4 tokens takes the vdpbf16ps GEMM on CPUs with AVX512-BF16 (tiles of 6 tokens x 64
    features, weights as bf16 pairs): every token-tile tail (4..13 tokens), feature tails around 16 and 64, and
    odd in_features (a zero column pads x to whole pairs), against the fp32 reference within bf16 rounding."""
    torch.manual_seed(0)
    for m, n, k in [
        (4, 1, 1),
        (5, 15, 3),
        (6, 16, 257),
        (7, 17, 255),
        (8, 63, 512),
        (9, 64, 511),
        (10, 65, 2),
        (11, 130, 1023),
        (12, 7, 600),
        (13, 129, 1100),
    ]:
        w_packed, w_scale, b = random_layer(n, k, "cpu", bias_dtype=torch.bfloat16 if bias else None)
        x = (torch.randn(m, k) * torch.rand(m, 1).mul(4).exp2()).bfloat16()
        y = llmkernels.ternary_linear(x, w_packed, w_scale, b, act_bits=None)
        y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x.float(), w_packed, w_scale, b, k)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        # one bf16 rounding of each output (2^-8 relative) on sums whose fp32 order differs
        torch.testing.assert_close(y.float(), y_ref, rtol=2**-8, atol=1e-3 * y_ref.abs().max().item(), msg=f"{m, n, k}")


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpu_other_instruction_sets_match_reference(isa):
    """The AVX2 and portable kernels (this machine may pick AVX-512 VNNI), in a fresh process with the ISA capped."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/ternary');"
        "import torch, llmkernels; from llmkernels import _ext;"
        "from ternary_cases import check_backend_matches_reference as check;"
        f"assert _ext.cpu_isa == '{isa}', _ext.cpu_isa; torch.manual_seed(0);"
        "[check('cpu', 'cpu', m, n, k, torch.float32)"
        " for m, n, k in [(1, 17, 113), (7, 33, 300), (5, 64, 2560), (13, 20, 300)]]"
    )
    run_with_cpu_isa(isa, code)


def test_opcheck_cpu_ops():
    k, n = 300, 17
    w_packed, w_scale, bias = random_layer(n, k, "cpu", bias_dtype=torch.float32)
    x = torch.randn(3, k)
    x_q, _ = llmkernels.ternary.quantize_activation(x)
    ops = torch.ops.llmkernels
    torch.library.opcheck(ops.ternary_quantize_activation.default, (torch.randn(2, 3, k, dtype=torch.bfloat16),))
    # a transposed x: the kernel returns x_q contiguous, and so must the fake kernel (it kept x's strides)
    torch.library.opcheck(ops.ternary_quantize_activation.default, (torch.randn(k, 5).t(),))
    torch.library.opcheck(ops.ternary_matmul_int8.default, (x_q, w_packed, k))
    for op in (ops.ternary_linear_a8.default, ops.ternary_linear_w2.default):
        torch.library.opcheck(op, (x, w_packed, w_scale, bias, k))
        torch.library.opcheck(op, (x.half(), w_packed, w_scale, None, k))


def test_torch_compile_ternary_linear():
    w_packed, w_scale, bias = random_layer(9, 70, "cpu", bias_dtype=torch.float32)
    x = torch.randn(2, 3, 70)

    def f(x):
        return llmkernels.ternary_linear(x, w_packed, w_scale, bias) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # traces fakes, no C++ codegen: cheap
    torch.testing.assert_close(compiled(x), f(x))


def test_bad_arguments_are_named():
    w_packed, w_scale, bias = random_layer(8, 40, "cpu", bias_dtype=torch.float32)
    x = torch.randn(3, 40)
    lin = llmkernels.ternary_linear
    with pytest.raises(TypeError, match="ternary_linear: x must have dtype"):
        lin(x.double(), w_packed, w_scale)
    with pytest.raises(ValueError, match="w_packed must have 128 columns for in_features=300"):
        lin(torch.randn(3, 300), w_packed, w_scale)
    with pytest.raises(TypeError, match="w_packed must have dtype"):
        lin(x, w_packed.to(torch.int8), w_scale)
    with pytest.raises(ValueError, match="w_packed must be contiguous"):
        lin(x, torch.cat([w_packed, w_packed], 1)[:, ::2], w_scale)
    with pytest.raises(TypeError, match="w_scale must have dtype"):
        lin(x, w_packed, w_scale.double())
    with pytest.raises(ValueError, match="w_scale must have one element"):
        lin(x, w_packed, torch.ones(2))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        lin(x, w_packed, w_scale, torch.zeros(7))
    with pytest.raises(TypeError, match="bias must have dtype"):
        lin(x, w_packed, w_scale, bias.half())
    with pytest.raises(ValueError, match="act_bits must be 8 or None"):
        lin(x, w_packed, w_scale, act_bits=4)
    with pytest.raises(ValueError, match="x must have a non-empty last dimension"):
        lin(torch.randn(3, 0), w_packed, w_scale)


def test_cpp_ops_check_their_arguments():
    """The C++ ops check too (they are reachable through torch.ops without the Python checks)."""
    w_packed, w_scale, _ = random_layer(8, 40, "cpu")
    ops = torch.ops.llmkernels
    with pytest.raises(RuntimeError, match="ternary_linear_a8: x must have in_features = 40"):
        ops.ternary_linear_a8(torch.randn(2, 41), w_packed, w_scale, None, 40)
    with pytest.raises(RuntimeError, match="ternary_matmul_int8: x_q must have dtype"):
        ops.ternary_matmul_int8(torch.randn(2, 40), w_packed, 40)
    with pytest.raises(RuntimeError, match="ternary_linear_w2: w_packed must have 128 columns"):
        ops.ternary_linear_w2(torch.randn(2, 300), w_packed, w_scale, None, 300)
    with pytest.raises(RuntimeError, match="ternary_quantize_activation: x must be float16"):
        ops.ternary_quantize_activation(torch.zeros(2, 3, dtype=torch.int32))


def test_leading_dims_and_empty_batch():
    w_packed, w_scale, _ = random_layer(6, 50, "cpu")
    x = torch.randn(2, 3, 4, 50)
    y = llmkernels.ternary_linear(x, w_packed, w_scale)
    assert y.shape == (2, 3, 4, 6)
    torch.testing.assert_close(y, llmkernels.ternary_linear(x.reshape(-1, 50), w_packed, w_scale).reshape(2, 3, 4, 6))
    assert llmkernels.ternary_linear(torch.randn(0, 50), w_packed, w_scale).shape == (0, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_quantize_rounds_ties_to_even(dtype):
    """s = 127 makes (x * 127) / s == x: the .5 ties must round to even in the vector body and the tail."""
    ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5, 0.25, -126.5, 5.5, 6.5]  # 13: 8 + a tail of 5
    x = torch.tensor([ties, ties[::-1]], dtype=dtype)
    with llmkernels.use_backend("cpu"):
        x_q, s = llmkernels.ternary.quantize_activation(x)
    x_q_ref, s_ref = llmkernels.reference.ternary.quantize_activation_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(x_q, x_q_ref)
    assert x_q[0, :9].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16, 19])  # whole AVX2 vectors, and a scalar tail
def test_cpu_nonfinite_activations_give_nan_rows(dtype, k):
    """A row holding NaN or inf: s is NaN / inf as the reference's amax (the max instructions used to drop NaN, so
    the row came out finite), x_q all 0, and the row's outputs NaN on the 8-bit path; other rows untouched."""
    torch.manual_seed(5)
    w_packed, w_scale, _ = random_layer(6, k, "cpu")
    x = torch.randn(4, k).to(dtype)
    x[0, 3], x[1, k - 1], x[2, 5] = float("nan"), float("inf"), float("-inf")
    x_q, s = llmkernels.ternary.quantize_activation(x)
    ref_q, ref_s = llmkernels.reference.ternary.quantize_activation_ref(x)
    assert torch.equal(x_q, ref_q) and (x_q[:3] == 0).all()
    torch.testing.assert_close(s, ref_s, equal_nan=True)
    assert s[0].isnan() and s[1] == float("inf") and s[2] == float("inf")
    for m in (4, 9):  # the per-token dots and the GEMM
        xm = x.repeat(3, 1)[:m]
        y = llmkernels.ternary_linear(xm, w_packed, w_scale, None, act_bits=8)
        y_ref = llmkernels.reference.ternary.ternary_linear_a8_ref(xm, w_packed, w_scale, None, k)
        bad = torch.tensor([i % 4 < 3 for i in range(m)])
        assert y[bad].isnan().all()
        torch.testing.assert_close(y[~bad].float(), y_ref[~bad].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_weight_only_infinite_activation(dtype):
    """fp32 / fp16 x split into bf16 planes: an inf once left inf - inf = NaN in the next plane, so the token's
    every output was NaN from 5 tokens on (the GEMM path) where the reference gives inf * w summed: +-inf or NaN."""
    w = torch.tensor([[1] * 4, [0, 1, 1, 1], [-1] * 4], dtype=torch.int8)
    w_packed, w_scale = llmkernels.ternary.pack_ternary(w), torch.tensor(1.0)
    for m in (1, 8):
        x = torch.ones(m, 4, dtype=dtype)
        x[0, 0] = float("inf")
        y = llmkernels.ternary_linear(x, w_packed, w_scale, None, act_bits=None)
        y_ref = llmkernels.reference.ternary.ternary_linear_w2_ref(x, w_packed, w_scale, None, 4)
        torch.testing.assert_close(y, y_ref, equal_nan=True)
        assert y[0, 0] == float("inf") and y[0, 1].isnan() and y[0, 2] == float("-inf")


def test_cpu_nonfinite_activations_on_the_portable_path():
    """The scalar quantiser (LLMKERNELS_CPU_ISA=scalar) likewise: NaN / inf rows give s NaN / inf, x_q 0."""
    code = (
        "import torch, llmkernels, llmkernels.ternary as lt; from llmkernels import _ext;"
        "from llmkernels.reference.ternary import quantize_activation_ref as ref;"
        "assert _ext.cpu_isa == 'scalar', _ext.cpu_isa; x = torch.randn(3, 21);"
        "x[0, 3], x[1, 20] = float('nan'), float('inf'); q, s = lt.quantize_activation(x); rq, rs = ref(x);"
        "assert torch.equal(q, rq) and (q[:2] == 0).all(), q;"
        "assert s[0].isnan() and s[1].isinf() and torch.equal(s[2], rs[2]), s"
    )
    run_with_cpu_isa("scalar", code)
