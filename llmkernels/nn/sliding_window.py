"""Mistral-style sliding-window attention layer: GQA, rotary embedding at absolute positions, a window of W keys.

    attn = SlidingWindowAttention(hidden_size=4096, num_heads=32, num_kv_heads=8, window=4096)
    y = attn(x)                                    # prefill without a cache: flash_attn_func with the window
    cache = attn.new_cache(batch_size=4)           # RollingKVCache: (batch, W, num_kv_heads, head_dim) rings
    y = attn(prompt, cache=cache); y = attn(next_token, cache=cache)   # chunked prefill, then decode

Each token at absolute position p sees positions p - W + 1 .. p (W keys including itself), as in Mistral's
reference code and Hugging Face's `sliding_window`. The projections are named as in Hugging Face's
MistralAttention (q_proj, k_proj, v_proj, o_proj) so its weights load directly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import flash_attn_func
from ..ops.sliding_window import RollingKVCache, sliding_window_attn_with_cache
from .attention import apply_rotary, cache_dtype_device


class SlidingWindowAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        window: int,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"SlidingWindowAttention: num_heads ({num_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads} >= 1)")
        if window < 1:
            raise ValueError(f"SlidingWindowAttention: window must be >= 1, got {window}")
        self.num_heads, self.num_kv_heads, self.window = num_heads, num_kv_heads, window
        self.head_dim = head_dim or hidden_size // num_heads
        if self.head_dim < 2 or self.head_dim % 2 != 0:  # rotary embeddings rotate channel pairs
            raise ValueError(f"SlidingWindowAttention: head_dim must be even (rotary embeddings), got {self.head_dim}")
        self.rope_theta = rope_theta
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias, **kw)

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> RollingKVCache:
        """An empty rolling cache for this layer: memory fixed at 2 * batch * window * num_kv_heads * head_dim."""
        dtype, device = cache_dtype_device(self.k_proj, dtype, device)
        return RollingKVCache(batch_size, self.window, self.num_kv_heads, self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cache: RollingKVCache | None = None) -> torch.Tensor:
        """x: (batch, seqlen, hidden_size) -> (batch, seqlen, hidden_size).

        Without a cache x is a whole sequence from position 0. With one, x continues each row of the cache
        from position cache.seqlens[i]; the cache is appended to and advanced.
        """
        if x.dim() != 3:
            raise ValueError(f"SlidingWindowAttention: x must be (batch, seqlen, hidden_size), got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if cache is not None and cache.seqlens.shape[0] != batch:
            raise ValueError(f"SlidingWindowAttention: cache holds {cache.seqlens.shape[0]} rows, x has batch {batch}")
        if cache is not None and tuple(cache.k.shape[2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"SlidingWindowAttention: cache holds {tuple(cache.k.shape[2:])} (kv heads, head "
                             f"dim), this layer ({self.num_kv_heads}, {self.head_dim}): a cache of another "
                             "layer")  # fmt: skip
        if cache is not None and cache.window != self.window:
            raise ValueError(f"SlidingWindowAttention: cache has window {cache.window}, this layer {self.window} "
                             "(new_cache() makes a matching one)")  # fmt: skip
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        steps = torch.arange(seqlen, device=x.device)
        positions = steps if cache is None else cache.seqlens.long().unsqueeze(1) + steps  # (seqlen,) | (batch, seqlen)
        q = apply_rotary(q, positions, self.rope_theta)
        k = apply_rotary(k, positions, self.rope_theta)
        if cache is None:
            out = flash_attn_func(q, k, v, causal=True, window_size=(self.window - 1, 0))
        else:
            out = sliding_window_attn_with_cache(q, k, v, cache)
        return self.o_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, rope_theta={self.rope_theta}")
