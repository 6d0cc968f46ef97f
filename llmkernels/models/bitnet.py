"""A BitNet b1.58-style decoder: a Llama-shaped transformer whose linear layers are ternary.

Built with ordinary nn.Linear layers, then `llmkernels.quantize_` swaps every one of them except the LM
head for a TernaryLinear (2-bit packed weights, int8 activations). Attention is llmkernels.nn.MultiheadFlashAttention,
decoding through `flash_attn_with_kvcache` over a preallocated cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import quantize_
from ..nn import MultiheadFlashAttention
from ..nn.attention import KVCache
from .common import RMSNorm, SwiGLU, check_cache_count


@dataclass
class BitNetConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 384
    max_seqlen: int = 1024


class BitNetBlock(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = MultiheadFlashAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, causal=True, rotary=True)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class BitNetLM(nn.Module):
    def __init__(self, cfg: BitNetConfig, ternary: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(BitNetBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if ternary:
            quantize_(self.layers)  # every linear of the blocks; embedding and LM head stay full precision

    def new_cache(self, batch: int) -> list[KVCache]:
        p = self.embed.weight  # the projections are ternary: the cache takes the activations' dtype
        return [layer.attn.new_cache(batch, self.cfg.max_seqlen, dtype=p.dtype, device=p.device)
                for layer in self.layers]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        x = self.embed(tokens)
        check_cache_count(self, cache)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache)
        return self.lm_head(self.norm(x))
