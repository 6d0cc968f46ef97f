"""MultiheadFlashAttention against a plain PyTorch implementation of the same layer."""

import math

import pytest
import torch

from llmkernels.nn import MultiheadFlashAttention
from llmkernels.nn.attention import alibi_slopes, apply_rotary


def plain_rotary(x, positions, base=10000.0):
    """Rotary embedding written pair by pair with complex numbers: channel c pairs with c + d/2."""
    d = x.shape[-1]
    half = d // 2
    freqs = torch.tensor([base ** (-2 * c / d) for c in range(half)], dtype=torch.float64)
    angles = positions.double().unsqueeze(-1) * freqs
    rot = torch.polar(torch.ones_like(angles), angles)
    if rot.dim() == 2:
        rot = rot.unsqueeze(0)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot.unsqueeze(2)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def plain_layer(layer, x, positions=None, past=None):
    """The layer in plain PyTorch: projections, rotary, masked softmax(q k^T / sqrt(d)) v with repeated KV heads."""
    b, s, _ = x.shape
    h, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(b, s, h, d)
    k = layer.k_proj(x).view(b, s, hk, d)
    v = layer.v_proj(x).view(b, s, hk, d)
    positions = torch.arange(s) if positions is None else positions
    if layer.rotary:
        q, k = plain_rotary(q, positions), plain_rotary(k, positions)
    if past is not None:
        k, v = torch.cat((past[0], k), 1), torch.cat((past[1], v), 1)
    sk = k.shape[1]
    k, v = k.repeat_interleave(h // hk, 2), v.repeat_interleave(h // hk, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    i, j = torch.arange(s).unsqueeze(1) + sk - s, torch.arange(sk).unsqueeze(0)
    left, right = layer.window_size
    mask = torch.ones(s, sk, dtype=torch.bool)
    if layer.causal:
        mask &= j <= i
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    if layer.alibi_slopes is not None:  # -slope_h * (query position - key position), from the first key
        scores = scores - layer.alibi_slopes.view(h, 1, 1) * (i - j).abs()
    out = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, -math.inf).softmax(-1), v)
    return layer.o_proj(out.reshape(b, s, h * d))


def test_apply_rotary_matches_complex_rotation():
    x = torch.randn(2, 11, 3, 16)
    pos = torch.arange(11) + 5
    torch.testing.assert_close(apply_rotary(x, pos), plain_rotary(x, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,rotary,causal,window,alibi", [
    (4, 4, False, True, (-1, -1), False),
    (8, 2, True, True, (-1, -1), False),
    (4, 1, True, False, (5, 2), False),
    (8, 2, False, True, (-1, -1), True),
    (4, 4, False, False, (-1, -1), True),
])
def test_forward_matches_plain_layer(heads, kv_heads, rotary, causal, window, alibi):
    layer = MultiheadFlashAttention(128, heads, kv_heads, rotary=rotary, causal=causal, window_size=window, bias=True,
                                    alibi=alibi)  # fmt: skip
    x = torch.randn(2, 37, 128, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = plain_layer(layer, x2)
    grad_q = layer.q_proj.weight.grad.clone()
    layer.zero_grad()
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_q, layer.q_proj.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alibi", [False, True])
def test_incremental_decoding_matches_full_forward(alibi):
    torch.manual_seed(0)
    layer = MultiheadFlashAttention(64, 4, 2, rotary=not alibi, alibi=alibi)
    x = torch.randn(3, 20, 64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(batch_size=3, max_seqlen=32)
        steps = [layer(x[:, :12], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert cache.seqlens.tolist() == [20, 20, 20]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadFlashAttention(64, 4, 3)
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadFlashAttention(65, 4)


@pytest.mark.parametrize("rotary,alibi", [(False, False), (True, False), (False, True)])
def test_packed_batch_equals_each_sequence_alone(rotary, alibi):
    """x packed with cu_seqlens: each sequence's rows equal the layer on that sequence alone (rotary positions
    restart per sequence; attention does not cross sequences); gradients reach the projections."""
    torch.manual_seed(0)
    layer = MultiheadFlashAttention(64, 4, 2, rotary=rotary, window_size=(5, 0), alibi=alibi)
    lengths = [7, 1, 12, 3]
    xs = [torch.randn(n, 64) for n in lengths]
    cu = torch.tensor([0, 7, 8, 20, 23], dtype=torch.int32)
    packed = layer(torch.cat(xs), cu_seqlens=cu)
    for x, lo in zip(xs, cu[:-1].tolist()):
        alone = layer(x[None])[0]
        torch.testing.assert_close(packed[lo : lo + x.shape[0]], alone, rtol=1e-5, atol=1e-5)
    packed.square().sum().backward()
    assert layer.q_proj.weight.grad is not None and layer.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 23, 64), cu_seqlens=cu)


def test_alibi_slopes_follow_the_paper():
    """Powers of two: 2^(-8 i / n); other counts: the power of two below, then odd terms of the 2n sequence."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    twelve = alibi_slopes(12)
    torch.testing.assert_close(twelve[:8], alibi_slopes(8))
    torch.testing.assert_close(twelve[8:], torch.tensor([2.0 ** (-0.5 * i) for i in (1, 3, 5, 7)]))
    assert len(set(twelve.tolist())) == 12


def test_alibi_layer_survives_a_dtype_cast():
    """module.to(bf16) must leave the slopes exact fp32 (the kernels take fp32 slopes; 2^-0.5 is not a bf16)."""
    layer = MultiheadFlashAttention(96, 12, alibi=True).to(torch.bfloat16)
    assert layer.alibi_slopes.dtype == torch.float32 and torch.equal(layer.alibi_slopes, alibi_slopes(12))
    assert "alibi_slopes" not in layer.state_dict()
    x = torch.randn(2, 9, 96, dtype=torch.bfloat16)
    out = layer(x)
    ref = plain_layer(layer.float(), x.float())
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_alibi_layer_built_on_meta_then_materialised():
    """Meta init, to_empty, load_state_dict (the slopes are not in it): the slopes must still be the paper's."""
    torch.manual_seed(0)
    ref = MultiheadFlashAttention(64, 4, alibi=True)
    with torch.device("meta"):
        layer = MultiheadFlashAttention(64, 4, alibi=True)
    layer.to_empty(device="cpu")
    layer.load_state_dict(ref.state_dict())
    assert torch.equal(layer.alibi_slopes, alibi_slopes(4))
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_bad_shapes_and_caches_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadFlashAttention(32, 4, num_kv_heads=0)
    layer = MultiheadFlashAttention(32, 4, rotary=True)
    with pytest.raises(ValueError, match="cache holds 3 rows"):
        layer(torch.randn(2, 3, 32), layer.new_cache(3, 8))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(3, 32))


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_backward_through_the_cache_raises_on_every_backend(backend):
    """The cached path (flash_attn_with_kvcache) is inference-only: the default backend once dropped the grads
    silently (a warning only) while the reference computed them."""
    import contextlib

    import llmkernels

    layer = MultiheadFlashAttention(32, 4)
    with llmkernels.use_backend("reference") if backend == "reference" else contextlib.nullcontext():
        y = layer(torch.randn(2, 3, 32, requires_grad=True), layer.new_cache(2, 8))
    with pytest.raises(RuntimeError, match="flash_attn_with_kvcache is not differentiable"):
        y.sum().backward()
    with torch.no_grad():  # and decoding under no_grad is untouched
        layer(torch.randn(2, 1, 32), layer.new_cache(2, 8))


def test_cached_decode_in_grad_mode_compiles_and_takes_in_place_updates():
    """eval() without no_grad: the projections' weights require grad, so the kvcache output carries the
    raise-on-backward node; it must still compile with fullgraph and allow `out += residual`."""
    torch.manual_seed(0)
    layer = MultiheadFlashAttention(32, 4).eval()
    x = torch.randn(2, 1, 32)
    compiled = torch.compile(lambda x, cache: layer(x, cache), fullgraph=True, backend="aot_eager")
    got = compiled(x, layer.new_cache(2, 8))
    want = layer(x, layer.new_cache(2, 8))
    torch.testing.assert_close(got, want)
    import llmkernels

    q, kc, vc = torch.randn(2, 1, 4, 8, requires_grad=True), torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)
    out = llmkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3)
    out += 1.0  # in place on the output: allowed


def test_a_cache_of_another_layer_is_refused_by_name():
    """A cache built by a layer with other kv heads: the error names the cache (it named the new k)."""
    from llmkernels.nn import MultiheadFlashAttention, SlidingWindowAttention

    with pytest.raises(ValueError, match="MultiheadFlashAttention: cache holds .* a cache of another layer"):
        MultiheadFlashAttention(32, 4, 2)(torch.randn(2, 5, 32), MultiheadFlashAttention(32, 4, 4).new_cache(2, 8))
    with pytest.raises(ValueError, match="SlidingWindowAttention: cache holds .* a cache of another layer"):
        SlidingWindowAttention(32, 4, 2, window=4)(torch.randn(2, 5, 32),
                                                   SlidingWindowAttention(32, 4, 4, window=4).new_cache(2))  # fmt: skip


def test_cache_of_a_quantized_layer_follows_the_model_dtype():
    """After quantize_ the key projection holds packed weights: new_cache() takes the dtype the model was built in
    or cast to (TernaryLinear.activation_dtype), not the default fp32 the decode step then refused."""
    import llmkernels
    from llmkernels.nn import MultiheadFlashAttention, SlidingWindowAttention

    attn = MultiheadFlashAttention(32, 4, 2).to(torch.bfloat16)
    llmkernels.quantize_(attn)
    assert attn.new_cache(1, 8).k.dtype == torch.bfloat16
    attn.float()
    assert attn.new_cache(1, 8).k.dtype == torch.float32
    attn.to(torch.float16).to("cpu")  # (a move keeps the dtype)
    assert attn.new_cache(1, 8).k.dtype == torch.float16
    swa = SlidingWindowAttention(32, 4, 2, window=4)
    llmkernels.quantize_(swa)
    swa.to(torch.bfloat16)
    cache = swa.new_cache(1)
    assert cache.k.dtype == torch.bfloat16
    assert swa(torch.randn(1, 3, 32, dtype=torch.bfloat16), cache).dtype == torch.bfloat16
