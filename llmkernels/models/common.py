"""Pieces shared by the demo models: RMSNorm, SwiGLU, greedy generation."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_cache_count(model: nn.Module, cache: list) -> None:
    """One cache per layer: zip would silently run only as many layers as there are caches."""
    if len(cache) != len(model.layers):
        raise ValueError(f"{type(model).__name__}: cache holds {len(cache)} layers' state, the model has "
                         f"{len(model.layers)} layers (build it with new_cache)")  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the model's own cache: one prefill call, then one token per step.

    The model provides `new_cache(batch)` and `forward(tokens, cache) -> logits` where tokens continue the
    sequence the cache has seen. Returns (tokens (batch, new_tokens), top-2 logit margins (batch, new_tokens)),
    the margins letting a caller tell a real disagreement from a near-tie between two backends.
    """
    if new_tokens < 0:
        raise ValueError(f"greedy_generate: new_tokens must be >= 0, got {new_tokens}")
    if new_tokens == 0:
        empty = prompt.new_empty((prompt.shape[0], 0))
        return empty, empty.float()
    cache = model.new_cache(prompt.shape[0])
    logits = model(prompt, cache)[:, -1]
    out, margins = [], []
    for step in range(new_tokens):
        top2 = logits.float().topk(2, dim=-1)
        token = top2.indices[:, :1]
        out.append(token)
        margins.append(top2.values[:, 0] - top2.values[:, 1])
        if on_token is not None:
            on_token(step)
        if step + 1 < new_tokens:
            logits = model(token, cache)[:, -1]
    return torch.cat(out, dim=1), torch.stack(margins, dim=1)
