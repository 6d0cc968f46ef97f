"""A Mistral-style decoder: GQA, rotary embedding, sliding-window attention over a rolling KV cache.

Every attention call, prefill included, goes through `sliding_window_attn_with_cache`, so a prompt of
any length is processed as a chunk against the ring buffer and memory stays at `window` tokens per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import RollingKVCache, sliding_window_attn_with_cache
from .common import RMSNorm, SwiGLU, rotary


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


class MistralAttention(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        b, s, _ = x.shape
        positions = cache.seqlens.to(x.device).long()[:, None] + torch.arange(s, device=x.device)
        q = rotary(self.q_proj(x).view(b, s, self.cfg.n_heads, self.head_dim), positions, self.cfg.rope_base)
        k = rotary(self.k_proj(x).view(b, s, self.cfg.n_kv_heads, self.head_dim), positions, self.cfg.rope_base)
        v = self.v_proj(x).view(b, s, self.cfg.n_kv_heads, self.head_dim)
        out = sliding_window_attn_with_cache(q, k, v, cache)
        return self.o_proj(out.reshape(b, s, -1))


class MistralBlock(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = MistralAttention(cfg)
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
        p = self.lm_head.weight
        head_dim = self.cfg.dim // self.cfg.n_heads
        return [
            RollingKVCache(batch, self.cfg.window, self.cfg.n_kv_heads, head_dim, dtype=p.dtype, device=p.device)
            for _ in self.layers
        ]

    def forward(self, tokens: torch.Tensor, cache: list[RollingKVCache]) -> torch.Tensor:
        """tokens: (batch, seqlen) continuing what `cache` has seen -> logits (batch, seqlen, vocab)."""
        x = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache)
        return self.lm_head(self.norm(x))
