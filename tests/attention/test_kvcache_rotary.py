"""flash_attn_with_kvcache's rotary_cos / rotary_sin (flash_attn's semantics): the rotation itself against a
complex-number formulation, and decoding token by token with rotary equal to flash_attn_func on the rotated
sequence; plus the arguments it refuses."""

import pytest
import torch

import llmkernels
from llmkernels._backend import triton_unavailable_reason
from llmkernels.reference.attention import flash_attn_ref, rotary_embedding


def _tables(seqlen_ro, rotary_dim, base=10000.0):
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def _rotate_complex(x, cos, sin, positions, interleaved):
    """Pairs as complex numbers times e^{i angle}: an independent formulation of rotary_embedding."""
    half = cos.shape[1]
    x = x.double()
    rot = x[..., : 2 * half]
    if interleaved:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        z = torch.complex(rot[..., :half], rot[..., half:])
    angle = torch.atan2(sin.double(), cos.double())[positions].unsqueeze(2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out, x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # the whole head (32) or part of it
def test_rotary_embedding_against_complex_rotation(interleaved, rotary_dim):
    x = torch.randn(2, 5, 3, 32)
    cos, sin = _tables(40, rotary_dim)
    positions = torch.randint(0, 40, (2, 5))
    got = rotary_embedding(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(got.double(), _rotate_complex(x, cos, sin, positions, interleaved), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


_NO_TRITON = triton_unavailable_reason("cpu")  # under TRITON_INTERPRET=1 the kernels run on CPU tensors


# cpu: the C++ op rotates; reference and triton: the Python wrapper rotates first
@pytest.mark.parametrize(
    "backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.skipif(_NO_TRITON is not None,
                                                                                    reason="no triton"))]
)
@pytest.mark.parametrize("interleaved", [True, False])
def test_decoding_with_rotary_equals_attention_over_the_rotated_sequence(backend, interleaved):
    """Prefill 5 tokens, then decode one at a time, with rotary applied inside the call: every output equals
    causal flash_attn_func over q and k rotated at their absolute positions, and the cache holds rotated keys."""
    batch, total, h, hk, d, rotary_dim = 2, 12, 4, 2, 32, 24
    q, k, v = torch.randn(batch, total, h, d), torch.randn(batch, total, hk, d), torch.randn(batch, total, hk, d)
    cos, sin = _tables(64, rotary_dim)
    positions = torch.arange(total).expand(batch, total)
    q_rot = rotary_embedding(q, cos, sin, positions, interleaved)
    k_rot = rotary_embedding(k, cos, sin, positions, interleaved)
    want = flash_attn_ref(q_rot, k_rot, v, causal=True)

    k_cache, v_cache = torch.zeros(batch, 32, hk, d), torch.zeros(batch, 32, hk, d)
    lens = torch.zeros(batch, dtype=torch.int32)
    kw = dict(causal=True, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    outs = []
    with llmkernels.use_backend(backend):
        for lo, hi in [(0, 5)] + [(t, t + 1) for t in range(5, total)]:
            outs.append(llmkernels.flash_attn_with_kvcache(
                q[:, lo:hi], k_cache, v_cache, k[:, lo:hi], v[:, lo:hi], cache_seqlens=lens, **kw))
            lens += hi - lo
    torch.testing.assert_close(torch.cat(outs, dim=1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[:, :total], k_rot, rtol=1e-6, atol=1e-6)


def test_non_causal_queries_sit_at_the_first_new_position():
    """Neither causal nor windowed: flash_attn rotates every query at cache_seqlens (not cache_seqlens + t)."""
    q, k_cache, v_cache = torch.randn(1, 3, 2, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    cos, sin = _tables(16, 16)
    lens = torch.tensor([6], dtype=torch.int32)
    out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin)
    q_rot = rotary_embedding(q, cos, sin, torch.full((1, 3), 6), True)
    torch.testing.assert_close(out, flash_attn_ref(q_rot, k_cache[:, :6], v_cache[:, :6]), rtol=1e-5, atol=1e-5)


def test_rotary_and_unsupported_arguments_are_refused():
    q, k_cache, v_cache = torch.randn(1, 1, 2, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    cos, sin = _tables(8, 16)
    call = llmkernels.flash_attn_with_kvcache
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
        call(q, k_cache, v_cache, cache_seqlens=3, rotary_cos=cos)
    with pytest.raises(ValueError, match="rotary_dim <= the head dim"):
        call(q, k_cache, v_cache, cache_seqlens=3, rotary_cos=torch.ones(8, 9), rotary_sin=torch.ones(8, 9))
    with pytest.raises((ValueError, RuntimeError), match="rotary_cos has 8 positions"):  # (the C++ op's check)
        call(q, k_cache, v_cache, cache_seqlens=9, rotary_cos=cos, rotary_sin=sin)


def test_compile_with_rotary():
    q, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    cos, sin = _tables(32, 16)
    lens = torch.tensor([4, 9], dtype=torch.int32)
    k2, v2 = k_cache.clone(), v_cache.clone()
    kw = dict(cache_seqlens=lens, causal=True, rotary_cos=cos, rotary_sin=sin)
    fn = torch.compile(llmkernels.flash_attn_with_kvcache, fullgraph=True, backend="aot_eager")
    out = fn(q, k_cache, v_cache, k_new, v_new, **kw)
    ref = llmkernels.flash_attn_with_kvcache(q, k2, v2, k_new, v_new, **kw)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(k_cache, k2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_table_long_enough_for_the_positions_used_is_enough(backend):
    """Without a window or causal mask every query sits at cache_seqlens: a table reaching cache_seqlens + the new
    tokens is enough whatever seqlen_q (the Python backends had asked for seqlen_q more rows than the CPU op)."""
    q, k_new, v_new = torch.randn(1, 8, 2, 32), torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    k_cache, v_cache = torch.randn(1, 40, 2, 32), torch.randn(1, 40, 2, 32)
    cos, sin = _tables(21, 32)  # positions 0..20: q and the new key at 20
    lens = torch.tensor([20], dtype=torch.int32)
    with llmkernels.use_backend(backend):
        out = llmkernels.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, lens, rotary_cos=cos,
                                                 rotary_sin=sin)  # fmt: skip
    assert out.shape == q.shape and not out.isnan().any()
