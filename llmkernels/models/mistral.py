"""A Mistral-style decoder: GQA, rotary embedding, sliding-window attention over a rolling KV cache.

Attention is llmkernels.nn.SlidingWindowAttention; every call, prefill included, goes through its rolling
cache, so a prompt of any length is processed as a chunk against the ring buffer and memory stays at
`window` tokens per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import RollingKVCache
from ..nn import SlidingWindowAttention
from .common import RMSNorm, SwiGLU, check_cache_count


@dataclass
class MistralConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 256
    window: int = 64
    rope_base: float = 10000.0


class MistralBlock(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = SlidingWindowAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.window, rope_theta=cfg.rope_base)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class MistralLM(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MistralBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int) -> list[RollingKVCache]:
        p = self.embed.weight  # after quantize_ the projections are ternary: the cache takes the activations' dtype
        return [layer.attn.new_cache(batch, dtype=p.dtype, device=p.device) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, cache: list[RollingKVCache]) -> torch.Tensor:
        """tokens: (batch, seqlen) continuing what `cache` has seen -> logits (batch, seqlen, vocab)."""
        x = self.embed(tokens)
        check_cache_count(self, cache)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache)
        return self.lm_head(self.norm(x))
