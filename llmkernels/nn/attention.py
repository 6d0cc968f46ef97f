"""Multi-head (grouped-query) self-attention on top of flash_attn_func / flash_attn_with_kvcache.

    attn = MultiheadFlashAttention(embed_dim=512, num_heads=8, num_kv_heads=2, rotary=True)
    y = attn(x)                                      # x: (batch, seqlen, embed_dim), causal by default
    cache = attn.new_cache(batch_size=4, max_seqlen=1024)
    y = attn(prompt, cache=cache); y = attn(next_token, cache=cache)   # incremental decoding
    y = attn(x_packed, cu_seqlens=cu)                 # x_packed: (total, embed_dim), sequences end to end
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.attention import flash_attn_func, flash_attn_with_kvcache
from ..ops.attention_varlen import flash_attn_varlen_func


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer; GPT-NeoX's rotate-half layout), computed in fp32.

    x: (batch, seqlen, nheads, headdim), headdim even; positions: (seqlen,) or (batch, seqlen) integer positions.
    Channel pair (c, c + headdim / 2) is rotated by the angle position * base ** (-2c / headdim).
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., seqlen, half)
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # (batch | 1, seqlen, 1, half)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def cache_dtype_device(proj: nn.Module, dtype: torch.dtype | None, device) -> tuple[torch.dtype, torch.device]:
    """dtype / device for a layer's KV cache: as given, else those of the key projection's weight. A projection
    without a float weight (a TernaryLinear after quantize_) holds packed buffers: then its activation_dtype (what
    the model was built in or cast to) or the default dtype, and the buffers' device, unless the caller says
    otherwise."""
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return dtype or weight.dtype, device or weight.device
    tensors = [*proj.parameters(), *proj.buffers()]
    known = getattr(proj, "activation_dtype", None)  # (a TernaryLinear's: what the model was cast to)
    dtype = dtype or (known if isinstance(known, torch.dtype) else torch.get_default_dtype())
    return dtype, device or (tensors[0].device if tensors else torch.device("cpu"))


@dataclass
class KVCache:
    """Keys and values of past tokens for incremental decoding with MultiheadFlashAttention.

    k, v: (batch, max_seqlen, num_kv_heads, head_dim); seqlens: (batch,) int32 tokens held per row.
    """

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor

    def reset(self) -> None:
        self.seqlens.zero_()


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., 2022), fp32 (num_heads,): the geometric sequence 2^(-8 i / n),
    i = 1..n, for the largest power of two n <= num_heads, then, for the heads past n, every other slope of the
    sequence for 2n heads (its odd terms), so that a head count that is not a power of two still gets distinct
    slopes spread over the same range (the convention of BLOOM / MPT checkpoints)."""
    n = 1 << (num_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-8.0 * i / (2 * n)) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class MultiheadFlashAttention(nn.Module):
    """Self-attention with q/k/v/o projections, grouped-query heads and optional rotary embeddings.

    embed_dim = num_heads * head_dim; num_kv_heads divides num_heads (default: num_heads). causal and
    window_size / softcap as in flash_attn_func; alibi=True adds ALiBi's linear distance bias with the standard
    per-head slopes (alibi_slopes(num_heads), the buffer `alibi_slopes`; no positional embedding is then needed).
    dropout: attention dropout (flash_attn_func's dropout_p) applied in training mode only.
    forward(x: (batch, seqlen, embed_dim)) -> same shape.
    With `cache` (from new_cache), x holds the next tokens of each row: they are appended to the
    cache, attend to everything cached (flash_attn_with_kvcache), and cache.seqlens advances.
    With `cu_seqlens` ((batch + 1,) int32 offsets), x is a packed batch (total, embed_dim) of sequences end to
    end (flash_attn_varlen_func): each sequence attends only to itself, rotary positions restart at its start.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = False,
        causal: bool = True,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        alibi: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadFlashAttention: dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"MultiheadFlashAttention: num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) "
                             "must be >= 1")
        if embed_dim % num_heads != 0:
            raise ValueError(f"MultiheadFlashAttention: embed_dim ({embed_dim}) must be a multiple of num_heads "
                             f"({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"MultiheadFlashAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        if rotary and self.head_dim % 2 != 0:
            raise ValueError(f"MultiheadFlashAttention: rotary embeddings need an even head_dim, got {self.head_dim}")
        self.causal, self.window_size, self.softcap = causal, tuple(window_size), softcap
        self.rotary, self.rotary_base = rotary, rotary_base
        # (not in state_dict: derived from num_heads; rebuilt exact fp32 by _apply whenever the module moves)
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads).to(device) if alibi else None, persistent=False)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)

    def new_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None) -> KVCache:
        dtype, device = cache_dtype_device(self.k_proj, dtype, device)
        k = torch.zeros((batch_size, max_seqlen, self.num_kv_heads, self.head_dim), dtype=dtype, device=device)
        return KVCache(k, torch.zeros_like(k), torch.zeros(batch_size, dtype=torch.int32, device=k.device))

    def _apply(self, fn, recurse=True):
        # After .to(bf16) the slopes would be rounded, after .to_empty() (meta init, then load_state_dict, which
        # does not hold them) uninitialised: rebuild them from num_heads wherever the module went.
        super()._apply(fn, recurse)
        if self.alibi_slopes is not None:
            self.alibi_slopes = alibi_slopes(self.num_heads).to(self.alibi_slopes.device)
        return self

    def _slopes(self) -> torch.Tensor | None:
        return self.alibi_slopes

    def _dropout_p(self) -> float:
        """Attention dropout while training (the cached decode path never drops: it is inference only)."""
        return self.dropout if self.training else 0.0

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("MultiheadFlashAttention: cu_seqlens (a packed batch) cannot be used with a cache")
            return self._forward_packed(x, cu_seqlens, max_seqlen)
        if x.dim() != 3:
            raise ValueError(f"MultiheadFlashAttention: x must be (batch, seqlen, embed_dim) (or (total, embed_dim) "
                             f"with cu_seqlens), got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if cache is not None and cache.seqlens.shape[0] != batch:
            raise ValueError(f"MultiheadFlashAttention: cache holds {cache.seqlens.shape[0]} rows, x has batch {batch}")
        if cache is not None and tuple(cache.k.shape[2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"MultiheadFlashAttention: cache holds {tuple(cache.k.shape[2:])} (kv heads, head "
                             f"dim), this layer ({self.num_kv_heads}, {self.head_dim}): a cache of another "
                             "layer")  # fmt: skip
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        steps = torch.arange(seqlen, device=x.device)
        if cache is None:
            if self.rotary:
                q, k = apply_rotary(q, steps, self.rotary_base), apply_rotary(k, steps, self.rotary_base)
            out = flash_attn_func(q, k, v, self._dropout_p(), causal=self.causal, window_size=self.window_size,
                                  softcap=self.softcap, alibi_slopes=self._slopes())  # fmt: skip
        else:
            if self.rotary:
                positions = cache.seqlens.unsqueeze(1) + steps  # (batch, seqlen): each row continues its own
                q, k = apply_rotary(q, positions, self.rotary_base), apply_rotary(k, positions, self.rotary_base)
            out = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens, causal=self.causal,
                                          window_size=self.window_size, softcap=self.softcap,
                                          alibi_slopes=self._slopes())
            cache.seqlens.add_(seqlen)
        return self.o_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))

    def _forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"MultiheadFlashAttention: with cu_seqlens, x must be (total, embed_dim), got "
                             f"{tuple(x.shape)}")
        total = x.shape[0]
        q = self.q_proj(x).view(total, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(total, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(total, self.num_kv_heads, self.head_dim)
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        if self.rotary:
            rows = torch.arange(total, device=x.device)
            starts = cu_seqlens.to(rows.dtype)
            sequence = (torch.searchsorted(starts[1:], rows, right=True)).clamp(max=max(len(starts) - 2, 0))
            positions = rows - starts[sequence] if len(starts) > 1 else rows
            q = apply_rotary(q.unsqueeze(0), positions, self.rotary_base)[0]
            k = apply_rotary(k.unsqueeze(0), positions, self.rotary_base)[0]
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, self._dropout_p(),
                                     causal=self.causal,
                                     window_size=self.window_size, softcap=self.softcap, alibi_slopes=self._slopes())
        return self.o_proj(out.reshape(total, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, window_size={self.window_size}, rotary={self.rotary}"
                + (", alibi=True" if self.alibi_slopes is not None else ""))
