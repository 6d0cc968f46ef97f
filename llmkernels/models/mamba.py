"""A Mamba language model (Gu & Dao, 2023): in_proj -> causal conv1d -> selective scan gated by z -> out_proj.

Prefill runs the fused scan over the prompt (keeping the last state and the conv window); decoding
steps through `causal_conv1d_update` and `selective_state_update`, so a step costs O(1) in the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update
from .common import RMSNorm


@dataclass
class MambaConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.dim / 16)


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d_inner = cfg.d_inner
        self.norm = RMSNorm(cfg.dim)
        self.in_proj = nn.Linear(cfg.dim, 2 * d_inner, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(d_inner, cfg.d_conv) / math.sqrt(cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(d_inner))
        self.x_proj = nn.Linear(d_inner, cfg.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, d_inner, bias=True)
        # S4D-real initialisation: A = -(1..d_state) per channel; dt bias so softplus(dt) lies in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.dim, bias=False)

    def forward(self, h: torch.Tensor, cache: dict) -> torch.Tensor:
        """h: (batch, seqlen, dim); cache: {"conv": (batch, d_inner, d_conv), "ssm": (batch, d_inner, d_state)}."""
        cfg = self.cfg
        xz = self.in_proj(self.norm(h))
        x, z = xz.chunk(2, dim=-1)
        A = -torch.exp(self.A_log.float())
        if cache["seen"] == 0 or h.shape[1] > 1:
            assert cache["seen"] == 0, "multi-token chunks are supported only as the first call (prefill)"
            xt = x.transpose(1, 2).contiguous()  # (batch, d_inner, seqlen)
            cache["conv"].copy_(F.pad(xt, (cfg.d_conv - xt.shape[-1], 0))[..., -cfg.d_conv :])
            xc = causal_conv1d_fn(xt, self.conv_weight, self.conv_bias, activation="silu")
            dbc = self.x_proj(xc.transpose(1, 2))
            dt, B, C = dbc.split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
            delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2).contiguous()
            y, last = selective_scan_fn(
                xc, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(),
                z.transpose(1, 2).contiguous(), self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True,
            )
            cache["ssm"].copy_(last)
            y = y.transpose(1, 2)
        else:
            xc = causal_conv1d_update(x[:, 0], cache["conv"], self.conv_weight, self.conv_bias, activation="silu")
            dt, B, C = self.x_proj(xc).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
            delta = dt @ self.dt_proj.weight.t()
            y = selective_state_update(
                cache["ssm"], xc, delta, A, B, C, self.D.float(), z[:, 0], self.dt_proj.bias.float(), dt_softplus=True
            )[:, None]
        cache["seen"] += h.shape[1]
        return h + self.out_proj(y)


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)

    def new_cache(self, batch: int) -> list[dict]:
        p = self.embed.weight
        c = self.cfg
        return [
            {
                "conv": torch.zeros(batch, c.d_inner, c.d_conv, dtype=p.dtype, device=p.device),
                "ssm": torch.zeros(batch, c.d_inner, c.d_state, dtype=torch.float32, device=p.device),
                "seen": 0,
            }
            for _ in self.layers
        ]

    def forward(self, tokens: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        h = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache)
        return self.norm(h) @ self.embed.weight.t()  # tied LM head
