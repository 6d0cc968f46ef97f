"""SlidingWindowAttention: cached generation equals the uncached forward, and Hugging Face's Mistral agrees."""

import pytest
import torch
from torch import nn

import llmkernels
from llmkernels.nn import SlidingWindowAttention


def test_cached_chunks_match_uncached_forward():
    layer = SlidingWindowAttention(hidden_size=48, num_heads=4, num_kv_heads=2, window=5).eval()
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(batch_size=2)
        pieces, start = [], 0
        for chunk in (3, 7, 1, 1, 5):  # chunked prefill (one chunk longer than the window), then decode
            pieces.append(layer(x[:, start : start + chunk], cache=cache))
            start += chunk
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.seqlens.tolist() == [17, 17]


class _HFAttention(nn.Module):
    """Takes Hugging Face's self_attn call and runs our layer (with an optional rolling cache) instead."""

    def __init__(self, layer: SlidingWindowAttention):
        super().__init__()
        self.layer, self.cache = layer, None

    def forward(self, hidden_states, *args, **kwargs):
        return self.layer(hidden_states, cache=self.cache), None


@pytest.mark.hf
def test_matches_hugging_face_mistral():
    transformers = pytest.importorskip("transformers")
    window, seqlen = 8, 21  # longer than the window
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=window, max_position_embeddings=64, rope_theta=10000.0,
    )
    config._attn_implementation = "eager"
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, seqlen))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        ours = []
        for block in model.model.layers:
            hf = block.self_attn
            layer = SlidingWindowAttention(64, 4, 2, window, head_dim=16, rope_theta=10000.0)
            layer.load_state_dict({k: v for k, v in hf.state_dict().items() if k.split(".")[0].endswith("proj")})
            block.self_attn = _HFAttention(layer)
            ours.append(block.self_attn)
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)
        # Through the rolling caches: a prefill chunk, then token by token.
        for attn in ours:
            attn.cache = attn.layer.new_cache(batch_size=2)
        logits = [model(ids[:, :11], use_cache=False).logits]
        logits += [model(ids[:, t : t + 1], use_cache=False).logits for t in range(11, seqlen)]
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_bad_configurations_and_caches_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SlidingWindowAttention(32, 4, 0, 4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        SlidingWindowAttention(12, 4, 2, 4)  # head_dim 3: rotary rotates channel pairs
    layer = SlidingWindowAttention(32, 4, 2, 4)
    with pytest.raises(ValueError, match="cache holds 3 rows"):
        layer(torch.randn(2, 3, 32), layer.new_cache(3))


def test_backward_through_the_cache_raises():
    """The cached path is inference-only: a backward once left x and the projections silently without grad."""
    layer = SlidingWindowAttention(32, 4, 2, 4)
    y = layer(torch.randn(2, 3, 32, requires_grad=True), layer.new_cache(2))
    with pytest.raises(RuntimeError, match="not differentiable"):
        y.sum().backward()


def test_a_cache_of_another_window_or_a_flat_input_is_refused():
    layer = SlidingWindowAttention(hidden_size=32, num_heads=4, num_kv_heads=2, window=4)
    cache = llmkernels.RollingKVCache(1, 5, 2, 8)
    with pytest.raises(ValueError, match="cache has window 5, this layer 4"):
        layer(torch.randn(1, 1, 32), cache=cache)
    with pytest.raises(ValueError, match="x must be \\(batch, seqlen, hidden_size\\)"):
        layer(torch.randn(3, 32))
