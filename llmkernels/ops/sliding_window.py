"""Sliding-window attention over a rolling KV buffer (Mistral 7B): the public API and its dispatch.

    cache = RollingKVCache(batch_size, window, num_kv_heads, head_dim, dtype=..., device=...)
    out = sliding_window_attn_with_cache(q, k, v, cache)   # attends, appends, advances cache.seqlens

A window of W means each query sees W keys including itself (positions p - W + 1 .. p); see
llmkernels/reference/sliding_window.py for the full semantics. Prefill without a cache is
`flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))`.

Two C++ ops (schemas in csrc/registration.cpp): `rolling_window_attn` (pure: reads the ring in place) and
`rolling_cache_append` (writes the chunk's last min(S, W) tokens, declared mutating with (a!)). The cache
object advances `seqlens` itself, so both ops stay functional enough for torch.compile.
Backends of rolling_window_attn: reference, cpu (C++), cuda (flash-decoding kernel, fp16/bf16, head_dim a
multiple of 8 up to 256), triton (chosen automatically on CUDA for chunks of LONG_CHUNK+ queries).
Inference only: no autograd is registered.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._backend import Dispatcher, requested_backend, triton_unavailable_reason
from .._checks import check_same_dtype, check_shape, check_tensor, fp32_positive, register_fake, softcap_ok
from ..reference.sliding_window import rolling_cache_append_ref, rolling_window_attn_ref
from .inference_only import inference_only

_FN = "sliding_window_attn_with_cache"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class RollingKVCache:
    """Fixed-size K/V ring buffers for sliding-window attention; memory never grows with the sequence.

    k, v: (batch_size, window, num_kv_heads, head_dim), absolute position p of row i in slot p % window.
    seqlens: (batch_size,) int32, tokens each row has seen (rows may differ).
    """

    def __init__(
        self,
        batch_size: int,
        window: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("window", window),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"llmkernels.RollingKVCache: {name} must be a positive int, got {value!r}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _DTYPES:
            raise TypeError(f"llmkernels.RollingKVCache: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.window = window
        self.k = torch.zeros(batch_size, window, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.k.device)

    def reset(self) -> None:
        """Forget every row's tokens (the ring contents are dead once seqlens is 0)."""
        self.seqlens.zero_()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.seqlens.nbytes

    def __repr__(self) -> str:
        b, w, hk, d = self.k.shape
        return f"RollingKVCache(batch_size={b}, window={w}, num_kv_heads={hk}, head_dim={d}, dtype={self.k.dtype})"


# --------------------------------------------------------------------------------------------------
# rolling_window_attn: one implementation per backend
# --------------------------------------------------------------------------------------------------
rolling_window_attn = Dispatcher("rolling_window_attn")


@rolling_window_attn.register("reference")
def _attn_reference(q, k, v, k_ring, v_ring, seqlens, softmax_scale: float, softcap: float) -> torch.Tensor:
    return rolling_window_attn_ref(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap)


@rolling_window_attn.register("cpu", kernel="rolling_window_attn")
def _attn_cpu(q, k, v, k_ring, v_ring, seqlens, softmax_scale: float, softcap: float) -> torch.Tensor:
    return torch.ops.llmkernels.rolling_window_attn(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap)


# Chunks at least this long go to the Triton kernel when chosen automatically: it tiles queries onto tensor
# cores, while the CUDA kernel (built for decode) gives every query row its own block.
LONG_CHUNK = 64


def _cuda_supports(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16/bfloat16, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 != 0 or d > 256:
        return f"the CUDA kernel takes head_dim a multiple of 8 up to 256, got {d}"
    if (q.shape[1] >= LONG_CHUNK and requested_backend() != "cuda" and triton_unavailable_reason("cuda") is None
            and _triton_supports(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap) is None):  # fmt: skip
        return f"chunks of {LONG_CHUNK}+ queries run on the Triton kernel (tensor cores) unless cuda is forced"
    return None


@rolling_window_attn.register("cuda", kernel="rolling_window_attn", supports=_cuda_supports)
def _attn_cuda(q, k, v, k_ring, v_ring, seqlens, softmax_scale: float, softcap: float) -> torch.Tensor:
    # 16-byte vector loads need rows aligned to 8 elements: contiguous chunks guarantee it.
    return torch.ops.llmkernels.rolling_window_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), k_ring, v_ring, seqlens, softmax_scale, softcap
    )


def _triton_supports(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap) -> str | None:
    if q.shape[-1] > 256:
        return f"the Triton kernel takes head_dim up to 256, got {q.shape[-1]}"
    if max(k.numel(), v.numel()) >= 2**31:  # (a chunk of ~2M tokens at 8 x 128)
        return "the Triton kernel addresses the chunk's keys with int32 row offsets: fewer than 2^31 elements"
    return None


@rolling_window_attn.register("triton", supports=_triton_supports)
def _attn_triton(q, k, v, k_ring, v_ring, seqlens, softmax_scale: float, softcap: float) -> torch.Tensor:
    from ..triton import sliding_window as triton_sliding_window  # lazy: importing triton is slow

    return triton_sliding_window.rolling_window_attn_triton(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap)


def _append(backend: str, k_ring, v_ring, k, v, seqlens) -> None:
    """Write the chunk into the rings with the C++ kernel where the build has one for this device."""
    key = "CPU" if k.is_cpu else "CUDA" if k.is_cuda else k.device.type.upper()  # is_*: no string built per call
    usable = backend != "reference" and _ext.has_kernel("rolling_cache_append", key)
    if key == "CUDA":  # the CUDA copy moves 16-byte pieces: rows must be a multiple of 16 bytes
        usable = usable and (k.shape[-1] * k.element_size()) % 16 == 0
        k, v = k.contiguous(), v.contiguous()
    if usable:
        torch.ops.llmkernels.rolling_cache_append(k_ring, v_ring, k, v, seqlens)
    else:
        rolling_cache_append_ref(k_ring, v_ring, k, v, seqlens)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _args_ok(q, k, v, cache, softmax_scale, softcap) -> bool:
    """Whether _check_args would pass, tested the cheap way (no messages): it runs only when this says no.
    Each tensor attribute read costs ~0.1 us, so shapes are read once and len() stands in for dim()."""
    if not (
        isinstance(q, torch.Tensor)
        and isinstance(cache, RollingKVCache)
        and isinstance(cache.k, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and isinstance(v, torch.Tensor)
    ):
        return False
    shape, ring_shape = q.shape, cache.k.shape
    if not (len(shape) == 4 and len(ring_shape) == 4):
        return False
    batch, chunk, nheads, head_dim = shape
    ring_batch, _, nheads_k, ring_head_dim = ring_shape
    expected = (batch, chunk, nheads_k, head_dim)
    dev, dtype = q.device, q.dtype
    return (
        dtype in _DTYPES
        and q.stride()[3] == 1
        and chunk >= 1
        and k.shape == expected
        and v.shape == expected
        and k.device == dev
        and v.device == dev
        and k.dtype == dtype
        and v.dtype == dtype
        and k.stride()[3] == 1
        and v.stride()[3] == 1
        and nheads_k > 0
        and nheads % nheads_k == 0
        and ring_batch == batch
        and ring_head_dim == head_dim
        and cache.k.device == dev
        and cache.k.dtype == dtype
        and (softmax_scale is None or fp32_positive(softmax_scale))  # the numbers last, in _check_args' order
        and softcap_ok(softcap)
    )


def _check_args(q, k, v, cache, softmax_scale, softcap) -> None:
    check_tensor(_FN, "q", q, ndim=4, dtypes=_DTYPES, last_dim_contiguous=True)
    batch, chunk, nheads, head_dim = q.shape
    if not isinstance(cache, RollingKVCache):
        raise TypeError(f"llmkernels.{_FN}: cache must be a llmkernels.RollingKVCache, got {type(cache).__name__}")
    _, _, nheads_k, cache_head_dim = cache.k.shape
    if chunk < 1:
        raise ValueError(f"llmkernels.{_FN}: q must hold at least one new token (seqlen >= 1), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(_FN, name, t, ndim=4, device=q.device, last_dim_contiguous=True)
        check_same_dtype(_FN, name, t, "q", q)
        check_shape(_FN, name, t, (batch, chunk, nheads_k, head_dim))
    if nheads % nheads_k != 0:
        raise ValueError(
            f"llmkernels.{_FN}: q's nheads ({nheads}) must be a multiple of the cache's num_kv_heads ({nheads_k})"
        )
    if cache.k.shape[0] != batch:
        raise ValueError(f"llmkernels.{_FN}: cache has batch_size {cache.k.shape[0]}, q has batch {batch}")
    if cache_head_dim != head_dim:
        raise ValueError(f"llmkernels.{_FN}: cache has head_dim {cache_head_dim}, q has head_dim {head_dim}")
    check_tensor(_FN, "cache.k", cache.k, device=q.device)
    check_same_dtype(_FN, "cache.k", cache.k, "q", q)
    if softmax_scale is not None and not fp32_positive(softmax_scale):
        raise ValueError(
            f"llmkernels.{_FN}: softmax_scale must be a positive, finite Python or NumPy number (one fp32 holds: "
            f"1.2e-38 to 3.4e38), got {softmax_scale!r}"
        )
    if not softcap_ok(softcap):
        raise ValueError(
            f"llmkernels.{_FN}: softcap must be finite and >= 0 (0 disables it), a number fp32 holds (1.2e-38 to 1e30 "
            f"when not 0), got {softcap}"
        )


def sliding_window_attn_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: RollingKVCache,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attend a chunk of new tokens through the rolling cache, then append it and advance cache.seqlens.

    q: (batch, S, nheads, head_dim), k, v: (batch, S, num_kv_heads, head_dim): S >= 1 new tokens at absolute
    positions cache.seqlens[i] .. + S - 1 (S may exceed the window: chunked prefill). Each query at p sees
    positions p - W + 1 .. p: older ones from the ring, newer ones from the chunk.
    Returns (batch, S, nheads, head_dim) in q's dtype. Not differentiable (decoding): a backward through it raises.
    """
    if not _args_ok(q, k, v, cache, softmax_scale, softcap):
        _check_args(q, k, v, cache, softmax_scale, softcap)  # raises, naming the argument
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    args = (q, k, v, cache.k, cache.v, cache.seqlens, scale, float(softcap))
    backend = rolling_window_attn.choose(*args)
    out = rolling_window_attn.impls[backend](*args)
    _append(backend, cache.k, cache.v, k, v, cache.seqlens)
    cache.seqlens.add_(q.shape[1])
    return inference_only(_FN, out, q, k, v, train_with="flash_attn_func with window_size")


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels, so torch.compile can trace the C++ ops
# --------------------------------------------------------------------------------------------------
if _ext.loaded:

    @register_fake("llmkernels::rolling_window_attn")
    def _attn_fake(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @register_fake("llmkernels::rolling_cache_append")
    def _append_fake(k_ring, v_ring, k, v, seqlens):
        return None
