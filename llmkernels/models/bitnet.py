"""A BitNet b1.58-style decoder: a Llama-shaped transformer whose linear layers are ternary.

Built with ordinary nn.Linear layers, then `llmkernels.quantize_` swaps every one of them except the LM
head for a TernaryLinear (2-bit packed weights, int8 activations). Attention decodes through
`flash_attn_with_kvcache` over a preallocated cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import flash_attn_with_kvcache, quantize_
from .common import RMSNorm, SwiGLU, rotary


@dataclass
class BitNetConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 384
    max_seqlen: int = 1024


class BitNetAttention(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        b, s, _ = x.shape
        seen = cache["seqlens"]
        positions = seen.long()[:, None] + torch.arange(s, device=x.device)
        q = rotary(self.q_proj(x).view(b, s, self.cfg.n_heads, self.head_dim), positions)
        k = rotary(self.k_proj(x).view(b, s, self.cfg.n_kv_heads, self.head_dim), positions)
        v = self.v_proj(x).view(b, s, self.cfg.n_kv_heads, self.head_dim)
        out = flash_attn_with_kvcache(q, cache["k"], cache["v"], k, v, cache_seqlens=seen, causal=True)
        return self.o_proj(out.reshape(b, s, -1))


class BitNetBlock(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = BitNetAttention(cfg)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
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

    def new_cache(self, batch: int) -> list[dict]:
        p = self.lm_head.weight
        c = self.cfg
        shape = (batch, c.max_seqlen, c.n_kv_heads, c.dim // c.n_heads)
        return [
            {
                "k": torch.zeros(shape, dtype=p.dtype, device=p.device),
                "v": torch.zeros(shape, dtype=p.dtype, device=p.device),
                "seqlens": torch.zeros(batch, dtype=torch.int32, device=p.device),
            }
            for _ in self.layers
        ]

    def forward(self, tokens: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        x = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache)
        for layer_cache in cache:
            layer_cache["seqlens"] += tokens.shape[1]
        return self.lm_head(self.norm(x))
