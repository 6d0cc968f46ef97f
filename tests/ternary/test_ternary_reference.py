"""The ternary reference against Python-loop / float64 twins, and the packing format."""

import pytest
import torch

import llmkernels
from llmkernels.reference import ternary as ref

PACK_SHAPES = [(1, 1), (3, 17), (5, 255), (4, 256), (2, 257), (7, 1023), (1, 6912)]


@pytest.mark.parametrize("n,k", PACK_SHAPES)
def test_pack_unpack_round_trip(n, k):
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = llmkernels.ternary.pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == llmkernels.ternary.packed_shape(n, k)
    assert torch.equal(llmkernels.ternary.unpack_ternary(packed, k), t)


def test_pack_layout_is_the_documented_one():
    k = 300  # two blocks, the second padded
    t = torch.randint(-1, 2, (2, k), dtype=torch.int8)
    packed = llmkernels.ternary.pack_ternary(t)
    for kk in (0, 63, 64, 200, 255, 256, 299):
        b, s, j = kk // 256, (kk % 256) // 64, kk % 64
        assert ((packed[:, 64 * b + j].int() >> (2 * s)) & 3).tolist() == (t[:, kk].int() + 1).tolist()
    # padding (k >= 300) holds weight 0 = code 1: e.g. s = 3 of block 1 is k = 448..511
    assert ((packed[:, 64:].int() >> 6) & 3).eq(1).all()


@pytest.mark.parametrize("bad", [2, -2, 127])
def test_pack_rejects_non_ternary_values(bad):
    t = torch.zeros(3, 5, dtype=torch.int8)
    t[1, 4] = bad
    with pytest.raises(ValueError, match=r"t must hold only -1, 0, 1; t\[1, 4\]"):
        llmkernels.ternary.pack_ternary(t)


def test_pack_unpack_bad_arguments():
    with pytest.raises(TypeError, match="t must have dtype"):
        llmkernels.ternary.pack_ternary(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="t must have 2 dimensions"):
        llmkernels.ternary.pack_ternary(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed must have 64 columns"):
        llmkernels.ternary.unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 100)
    with pytest.raises(ValueError, match="code 3"):
        llmkernels.ternary.unpack_ternary(torch.full((1, 64), 0xFF, dtype=torch.uint8), 256)


def test_quantize_activation_matches_python_rounding():
    x = torch.randn(3, 2, 11) * torch.tensor([1e-7, 1.0, 300.0]).view(3, 1, 1)  # incl. s clamped to 1e-5
    x[0, 0, 3] = 0.5 * x[0, 0].abs().max()  # lands near a .5 tie after scaling
    x_q, s = ref.quantize_activation_ref(x)
    x_q_naive, s_naive = ref.quantize_activation_naive(x)
    assert torch.equal(x_q, x_q_naive) and torch.equal(s, s_naive)
    assert s.shape == (3, 2) and s.dtype == torch.float32


def test_round_half_to_even():
    # s = 127 makes x * 127 / s == x exactly: the ties 0.5, 1.5, 2.5, -0.5 go to 0, 2, 2, -0
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    x_q, _ = ref.quantize_activation_ref(x)
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("act_bits", [8, None])
@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (4, 7, 19), (2, 5, 260)])
def test_linear_reference_matches_naive(m, n, k, act_bits):
    w = torch.randn(n, k)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    w_packed, w_scale = llmkernels.ternary.quantize_weight(w)
    fn = ref.ternary_linear_a8_ref if act_bits == 8 else ref.ternary_linear_w2_ref
    y = fn(x, w_packed, w_scale, bias, k)
    naive = ref.ternary_linear_naive(x, w, bias, act_bits)
    torch.testing.assert_close(y.double(), naive, rtol=1e-5, atol=1e-5)


def test_quantize_weight_is_absmean_ternary():
    w = torch.randn(9, 31)
    w_packed, w_scale = llmkernels.ternary.quantize_weight(w)
    gamma = w.abs().mean()
    assert w_scale.dtype == torch.float32 and w_scale.dim() == 0
    torch.testing.assert_close(w_scale, gamma)
    expected = torch.round(w / gamma).clamp(-1, 1).to(torch.int8)
    assert torch.equal(llmkernels.ternary.unpack_ternary(w_packed, 31), expected)
