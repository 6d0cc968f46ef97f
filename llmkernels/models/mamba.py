"""A Mamba language model (Gu & Dao, 2023): residual blocks of RMSNorm -> llmkernels.nn.MambaMixer
(in_proj -> causal conv1d -> selective scan gated by z -> out_proj), a tied LM head.

Prefill runs the fused scan over the prompt (keeping the last state and the conv window); decoding steps
through `causal_conv1d_update` and `selective_state_update`, so a step costs O(1) in the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..nn import MambaMixer
from ..nn.mamba import MambaCache
from .common import RMSNorm, check_cache_count


@dataclass
class MambaConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim)
        self.mixer = MambaMixer(cfg.dim, state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand)

    def forward(self, h: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        return h + self.mixer(self.norm(h), cache)


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)

    def new_cache(self, batch: int) -> list[MambaCache]:
        return [layer.mixer.new_cache(batch) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, cache: list[MambaCache]) -> torch.Tensor:
        """tokens: (batch, seqlen) continuing what `cache` has seen -> logits (batch, seqlen, vocab)."""
        h = self.embed(tokens)
        check_cache_count(self, cache)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache)
        return self.norm(h) @ self.embed.weight.t()  # tied LM head
