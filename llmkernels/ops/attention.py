"""Flash attention with flash_attn 2.x's signatures: the public functions, their dispatch, fakes and autograd.

    import llmkernels
    out = llmkernels.flash_attn_func(q, k, v, causal=True)  # q: (b, s, h, d); k, v: (b, s, h_kv, d)
    out.float().square().sum().backward()                   # dq, dk, dv (GQA gradients summed per KV head)
    k_cache, v_cache = torch.zeros(b, 4096, h_kv, d), torch.zeros(b, 4096, h_kv, d)  # lens: (b,) int32 held
    out = llmkernels.flash_attn_with_kvcache(q1, k_cache, v_cache, k1, v1, cache_seqlens=lens, causal=True)

Semantics (window band aligned bottom-right, rows that see no key give 0, softcap) are those of
llmkernels/reference/attention.py. Backends: the C++ ops `llmkernels::flash_attn_fwd / flash_attn_bwd /
flash_attn_with_kvcache` (CPU and CUDA kernels, schemas in csrc/registration.cpp), Triton
(llmkernels/triton/flash_attn.py, imported only when chosen) and the reference. Causal is folded into
window_right = 0 before any backend sees the call, so every implementation takes
(q, k, v, softmax_scale, window_left, window_right, softcap).
"""

from __future__ import annotations

import importlib.util

import torch

from .. import _checks, _ext
from .._backend import Dispatcher
from .._checks import check_same_dtype, check_shape, check_tensor, fp32_positive, register_fake, softcap_ok
from ..reference.attention import (
    flash_attn_fwd_ref,
    flash_attn_with_kvcache_ref,
    normalize_window,
    rotary_embedding,
)
from ..reference.dropout import check_dropout_p, new_dropout_seed
from .inference_only import inference_only

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


# --------------------------------------------------------------------------------------------------
# What each backend takes
# --------------------------------------------------------------------------------------------------
def _cpu_supports(q, *args, **kwargs) -> str | None:
    if q.dtype not in _DTYPES:
        return f"the CPU kernel takes float32/bfloat16/float16, got {q.dtype}"
    return None


def _cuda_supports(q, *args, **kwargs) -> str | None:
    if kwargs.get("alibi_slopes") is not None:
        return "the CUDA C++ kernels take no alibi_slopes (the Triton kernels do)"
    if kwargs.get("dropout_p", 0.0) > 0:
        return "the CUDA C++ kernels take no dropout (the Triton kernels do)"
    if kwargs.get("deterministic", False):
        return "the CUDA C++ backward adds dq (and GQA's dk, dv) atomically; deterministic=True runs Triton's"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16/bfloat16, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 != 0 or d > MAX_HEADDIM:
        return f"the CUDA kernel takes a head dim that is a multiple of 8 up to {MAX_HEADDIM}, got {d}"
    return None


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row of a 2-byte (b, s, h, d) tensor starts 16-byte aligned, as the CUDA kernels' vector loads
    need: element offset and the strides of the dims stepped over multiples of 8 (allocations are aligned)."""
    return t.storage_offset() % 8 == 0 and all(t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(3))


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or _rows_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _cuda_kvcache_supports(q, k_cache, v_cache, *args, **kwargs) -> str | None:
    reason = _cuda_supports(q, **kwargs) or _plain_cache(*args)
    if reason is None and len(args) > 12 and args[12] is not None:
        reason = "the CUDA kernels do not return softmax_lse (the Triton decode kernel does)"
    if reason is None and kwargs.get("cache_leftpad") is not None:
        reason = "the CUDA kernels take no cache_leftpad (the Triton decode kernel does)"
    if reason is None and not (_rows_aligned(k_cache) and _rows_aligned(v_cache)):
        return "the CUDA kernel needs k_cache and v_cache rows 16-byte aligned (updated in place, so never copied)"
    return reason


def _plain_cache(*args) -> str | None:
    """Why a kvcache backend without cache_batch_idx / block_table support cannot run a call (args: the kvcache
    impls' arguments after v_cache, see flash_attn_kvcache below)."""
    block_table, cache_batch_idx = args[7], args[8]
    if block_table is not None:
        return "no paged KV (block_table) in this kernel"
    if cache_batch_idx is not None:
        return "no cache_batch_idx in this kernel"
    return None


_TRITON_MODULE = "llmkernels.triton.flash_attn"
_triton_module_found = importlib.util.find_spec(_TRITON_MODULE) is not None


def _triton_function(name: str):
    """The function `name` of llmkernels/triton/flash_attn.py, imported on first use, or None if absent."""
    if not _triton_module_found:
        return None
    # an import statement, not importlib.import_module: torch.compile traces the first call too (its import runs
    # at trace time), where importlib is a function dynamo refuses (fullgraph failed on a GPU's first call)
    from ..triton import flash_attn as triton_flash_attn

    return getattr(triton_flash_attn, name, None)


def _triton_supports_for(function: str):
    def supports(q, *args, **kwargs) -> str | None:
        if not _triton_module_found:
            return f"{_TRITON_MODULE} is not in this installation"
        if _triton_function(function) is None:
            return f"{_TRITON_MODULE} has no {function}"
        if q.shape[-1] > MAX_HEADDIM:
            return f"the Triton kernel takes a head dim up to {MAX_HEADDIM}, got {q.shape[-1]}"
        return None

    return supports


# --------------------------------------------------------------------------------------------------
# flash_attn_func: (q, k, v, softmax_scale, window_left, window_right, softcap, deterministic=, alibi_slopes=,
#                   dropout_p=, dropout_seed=) -> (out, softmax_lse)
# deterministic: the CUDA C++ backward adds atomically (so it declines it), the Triton one may (tuned tiles), the CPU
# and reference backwards never do. alibi_slopes: None, or fp32 (nheads,)
# or (batch, nheads) contiguous (the public functions check and make it so).
# --------------------------------------------------------------------------------------------------
flash_attn = Dispatcher("flash_attn_func")


@flash_attn.register("reference")
def _fwd_reference(q, k, v, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                   deterministic: bool = False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    alibi_slopes = reference_slopes(alibi_slopes)
    return flash_attn_fwd_ref(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes=alibi_slopes,
                              dropout_p=dropout_p, dropout_seed=dropout_seed)  # fmt: skip


@flash_attn.register("cpu", kernel="flash_attn_fwd", supports=_cpu_supports)
def _fwd_cpu(q, k, v, softmax_scale: float, window_left: int, window_right: int, softcap: float,
             deterministic: bool = False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    return torch.ops.llmkernels.flash_attn_fwd(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                               dropout_p, dropout_seed)  # fmt: skip


@flash_attn.register("cuda", kernel="flash_attn_fwd", supports=_cuda_supports)
def _fwd_cuda(q, k, v, softmax_scale: float, window_left: int, window_right: int, softcap: float,
              deterministic: bool = False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    return torch.ops.llmkernels.flash_attn_fwd(q, k, v, softmax_scale, window_left, window_right, softcap)


@flash_attn.register("triton", supports=_triton_supports_for("flash_attn_triton"))
def _fwd_triton(q, k, v, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                deterministic: bool = False, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    _triton_function("flash_attn_triton")  # imports the module, which registers the op
    return torch.ops.llmkernels.flash_attn_fwd_triton(
        q, k, v, softmax_scale, window_left, window_right, softcap, deterministic, alibi_slopes, dropout_p,
        dropout_seed,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: (q, k_cache, v_cache, k_new, v_new, cache_seqlens, scale, left, right, softcap,
#                           block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved[, softmax_lse],
#                           alibi_slopes=, cache_leftpad=)
# softmax_lse: a (b, h, sq) fp32 tensor that receives each row's log-sum-exp, or None; alibi_slopes as above;
# cache_leftpad: None or (b,) int32 contiguous, each row's first key slot.
# The C++ CPU op applies the rotary embedding itself (a few us); the others get q and k_new rotated in Python.
# --------------------------------------------------------------------------------------------------
flash_attn_kvcache = Dispatcher("flash_attn_with_kvcache")


def _pre_rotated(q, k_new, cache_seqlens, window_left, window_right, cos, sin, interleaved):
    if cos is None:
        return q, k_new
    positional_q = window_left >= 0 or window_right >= 0
    return _rotate_for_kvcache("flash_attn_with_kvcache", q, k_new, cache_seqlens, cos, sin, interleaved, positional_q)


@flash_attn_kvcache.register("reference")
def _kvcache_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right,
                       softcap, block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
                       softmax_lse=None, alibi_slopes=None, cache_leftpad=None):  # fmt: skip
    if cache_leftpad is not None:  # (read back, as the lengths below: a negative start would be a silent slice)
        pad, held = cache_leftpad.long(), cache_seqlens.long()
        if pad.numel() and not bool(((pad >= 0) & (pad <= held)).all()):
            raise ValueError(f"llmkernels.flash_attn_with_kvcache: cache_leftpad must lie in [0, cache_seqlens] per "
                             f"row, got {pad.tolist()} with cache_seqlens {held.tolist()}")  # fmt: skip
    q, k_new = _pre_rotated(q, k_new, cache_seqlens, window_left, window_right, rotary_cos, rotary_sin,
                            rotary_interleaved)  # fmt: skip
    alibi_slopes = reference_slopes(alibi_slopes)
    # The kernels check or clamp these; here out-of-range indices would be an indexing error (a device assertion
    # on a GPU), so they are read back and checked first: this path is slow anyway. Only the pages a row uses
    # count (tables padded with -1 are fine, as in flash_attn).
    index = cache_batch_idx
    s_new = 0 if k_new is None else k_new.shape[1]
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    lens = cache_seqlens.long()
    if lens.numel() and not (int(lens.min()) >= 0 and int(lens.max()) + s_new <= capacity):
        raise ValueError(f"llmkernels.flash_attn_with_kvcache: cache_seqlens must lie in [0, {capacity - s_new}] "
                         f"(the cache holds {capacity}, {s_new} new tokens), got {lens.tolist()}")  # fmt: skip
    if block_table is not None:
        page_size = k_cache.shape[1]
        used = (lens + s_new + page_size - 1) // page_size
        index = block_table[torch.arange(block_table.shape[1], device=block_table.device) < used[:, None]]
    if index is not None and index.numel() and not (0 <= int(index.min()) and int(index.max()) < k_cache.shape[0]):
        name = "block_table" if block_table is not None else "cache_batch_idx"
        raise ValueError(f"llmkernels.flash_attn_with_kvcache: {name} entries must lie in [0, {k_cache.shape[0]})")
    out, lse = flash_attn_with_kvcache_ref(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens,
        softmax_scale,
        window_size=(window_left, window_right),
        softcap=softcap,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        return_softmax_lse=True,
        alibi_slopes=alibi_slopes,
        cache_leftpad=cache_leftpad,
    )
    if softmax_lse is not None:
        softmax_lse.copy_(lse)
    return out


@flash_attn_kvcache.register("cpu", kernel="flash_attn_with_kvcache", supports=_cpu_supports)
def _kvcache_cpu(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right, softcap,
                 block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
                 softmax_lse=None, alibi_slopes=None, cache_leftpad=None):  # fmt: skip
    return torch.ops.llmkernels.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right, softcap,
        block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved, softmax_lse, alibi_slopes,
        cache_leftpad,
    )  # fmt: skip


@flash_attn_kvcache.register("cuda", kernel="flash_attn_with_kvcache", supports=_cuda_kvcache_supports)
def _kvcache_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right, softcap,
                  block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
                  softmax_lse=None, alibi_slopes=None, cache_leftpad=None):  # fmt: skip
    q, k_new = _pre_rotated(q, k_new, cache_seqlens, window_left, window_right, rotary_cos, rotary_sin,
                            rotary_interleaved)  # fmt: skip
    return torch.ops.llmkernels.flash_attn_with_kvcache(
        _aligned(q),
        k_cache,
        v_cache,
        _aligned(k_new),
        _aligned(v_new),
        cache_seqlens,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        softmax_lse=softmax_lse,  # refused by the C++ host (supports sends such calls to Triton first)
    )


# (The Triton decode kernel reads block_table / cache_batch_idx itself: PAGED / INDEXED.)
_triton_kvcache_supports = _triton_supports_for("flash_attn_with_kvcache_triton")


@flash_attn_kvcache.register("triton", supports=_triton_kvcache_supports)
def _kvcache_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right,
                    softcap, block_table, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
                    softmax_lse=None, alibi_slopes=None, cache_leftpad=None):  # fmt: skip
    q, k_new = _pre_rotated(q, k_new, cache_seqlens, window_left, window_right, rotary_cos, rotary_sin,
                            rotary_interleaved)  # fmt: skip
    args = (q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right, softcap,
            block_table, cache_batch_idx, alibi_slopes, cache_leftpad)  # fmt: skip
    if softmax_lse is None:
        return _triton_function("flash_attn_with_kvcache_triton")(*args)
    out, lse = _triton_function("flash_attn_with_kvcache_lse_triton")(*args)
    softmax_lse.copy_(lse)
    return out


# --------------------------------------------------------------------------------------------------
# Argument checks (one place; every message names the function and the argument)
# --------------------------------------------------------------------------------------------------
def _check_common(fn: str, q: torch.Tensor, softmax_scale, window_size, softcap) -> None:
    check_tensor(fn, "q", q, ndim=4, dtypes=_DTYPES, last_dim_contiguous=True)
    if not 1 <= q.shape[-1] <= MAX_HEADDIM:
        raise ValueError(f"llmkernels.{fn}: q must have a head dim in [1, {MAX_HEADDIM}], got {q.shape[-1]}")
    if softmax_scale is not None and not fp32_positive(softmax_scale):
        raise ValueError(
            f"llmkernels.{fn}: softmax_scale must be a positive finite number that fp32 holds (1.2e-38 to 3.4e38) "
            f"or None, got {softmax_scale!r}"
        )
    if not (
        isinstance(window_size, (tuple, list))
        and len(window_size) == 2
        and all(isinstance(w, int) and w >= -1 for w in window_size)
    ):
        raise ValueError(
            f"llmkernels.{fn}: window_size must be a pair of ints >= -1 (-1: unbounded), got {window_size!r}"
        )
    if not softcap_ok(softcap):
        raise ValueError(
            f"llmkernels.{fn}: softcap must be a finite number >= 0 (0 disables it) that fp32 holds (1.2e-38 to "
            f"1e30 when not 0), got {softcap!r}"
        )


def _check_kv(
    fn: str,
    q: torch.Tensor,
    names: tuple[str, str],
    k: torch.Tensor,
    v: torch.Tensor,
    seqlen: int | None = None,
    nheads_k: int | None = None,
) -> None:
    for name, t in zip(names, (k, v)):
        check_tensor(fn, name, t, ndim=4, device=q.device, last_dim_contiguous=True)
        check_same_dtype(fn, name, t, "q", q)
    batch, _, nheads, d = q.shape
    expected = (batch, k.shape[1] if seqlen is None else seqlen, k.shape[2] if nheads_k is None else nheads_k, d)
    check_shape(fn, names[0], k, expected)
    check_shape(fn, names[1], v, expected)
    if k.shape[2] == 0 or nheads % k.shape[2] != 0:
        raise ValueError(
            f"llmkernels.{fn}: q's nheads ({nheads}) must be a multiple of {names[0]}'s nheads_k ({k.shape[2]})"
        )


def _scalars_ok(softmax_scale, window_size, softcap) -> bool:
    """Whether _check_common's checks of the numbers would pass (no messages)."""
    return (
        (softmax_scale is None or fp32_positive(softmax_scale))
        and isinstance(window_size, (tuple, list))
        and len(window_size) == 2
        and isinstance(window_size[0], int)
        and window_size[0] >= -1
        and isinstance(window_size[1], int)
        and window_size[1] >= -1
        and softcap_ok(softcap)
    )


# Each tensor attribute read costs ~0.1 us, a third of these checks' budget: shapes are read once, len(shape)
# stands in for dim() and stride()[3] for stride(3), which parses its argument.
def _q_ok(q) -> bool:
    """Whether _check_common's checks of q would pass (no messages)."""
    if not isinstance(q, torch.Tensor):
        return False
    shape = q.shape
    return len(shape) == 4 and q.dtype in _DTYPES and q.stride()[3] == 1 and 1 <= shape[3] <= MAX_HEADDIM


def _kv_ok(q, k, v, nheads_k: int | None = None) -> bool:
    """Whether _check_kv would pass (its seqlen, if given, being k's own), tested the cheap way (no messages)."""
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    q_shape, shape = q.shape, k.shape
    dev, dtype = q.device, q.dtype
    return (
        len(shape) == 4
        and shape[0] == q_shape[0]
        and shape[3] == q_shape[3]
        and (nheads_k is None or shape[2] == nheads_k)
        and v.shape == shape
        and shape[2] > 0
        and q_shape[2] % shape[2] == 0
        and k.dtype == dtype
        and v.dtype == dtype
        and k.device == dev
        and v.device == dev
        and k.stride()[3] == 1
        and v.stride()[3] == 1
    )


def dropout_args(fn: str, dropout_p) -> dict:
    """The backends' dropout keyword arguments for flash_attn's dropout_p: {} for 0, else dropout_p and a fresh
    dropout_seed drawn from torch's default CPU generator (torch.manual_seed repeats it; the backward reuses it)."""
    if type(dropout_p) in (float, int) and dropout_p == 0:  # every inference call: no checks worth their cost
        return {}
    if isinstance(dropout_p, torch.Tensor) and dropout_p.numel() == 1:  # (flash_attn takes a 0-d tensor too)
        dropout_p = float(dropout_p)
    check_dropout_p(fn, dropout_p)
    if dropout_p == 0:
        return {}
    return {"dropout_p": float(dropout_p), "dropout_seed": new_dropout_seed()}


def reference_slopes(alibi_slopes: torch.Tensor | None) -> torch.Tensor | None:
    """The reference backend's slopes: detached (the kernels give them no gradient, as flash_attn's), and checked
    finite as the C++ CPU op checks them (this path reads values back anyway; a GPU kernel cannot without a
    sync, so there a non-finite slope is the caller's to avoid)."""
    if alibi_slopes is None:
        return None
    if not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError(f"llmkernels: alibi_slopes must be finite, got {alibi_slopes.tolist()}")
    return alibi_slopes.detach()


def checked_alibi(fn: str, alibi_slopes, q: torch.Tensor, batch: int) -> torch.Tensor | None:
    """alibi_slopes as the backends take it (None, or fp32 (nheads,) / (batch, nheads) contiguous on q's device),
    checked. batch: q's, or for varlen the number of sequences."""
    if alibi_slopes is None:
        return None
    check_tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=q.device)
    nheads = q.shape[-2]
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(
            f"llmkernels.{fn}: alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}) (nheads or "
            f"(batch, nheads)), got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes.contiguous()


def _func_args_ok(q, k, v, softmax_scale, window_size, softcap) -> bool:
    """Whether _check_func_args would pass, tested the cheap way (no messages): it runs only when this says no."""
    return _q_ok(q) and _scalars_ok(softmax_scale, window_size, softcap) and _kv_ok(q, k, v)


def _check_func_args(fn: str, q, k, v, softmax_scale, window_size, softcap) -> None:
    _check_common(fn, q, softmax_scale, window_size, softcap)
    _check_kv(fn, q, ("k", "v"), k, v)


def _kvcache_args_ok(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size, softcap) -> bool:
    """Whether _check_kvcache_args would pass, tested the cheap way (no messages): it runs only when this says no.
    An int or None cache_seqlens is left to it (its range check needs the cache's capacity)."""
    return (
        _q_ok(q)
        and _scalars_ok(softmax_scale, window_size, softcap)
        and _kv_ok(q, k_cache, v_cache)
        and ((k is None and v is None) or (k is not None and _kv_ok(q, k, v, k_cache.shape[2])))
        and isinstance(cache_seqlens, torch.Tensor)
        and cache_seqlens.dtype == torch.int32
        and cache_seqlens.device == q.device
        and cache_seqlens.shape == q.shape[:1]
    )


# flash_attn 2.x's flash_attn_with_kvcache takes (..., k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
# cache_leftpad, block_table, softmax_scale, causal, ...) positionally; ours (the issue's) (..., k, v, cache_seqlens,
# softmax_scale, causal, window_size, softcap) and the rest by keyword. A call in flash_attn's order fails (tensors
# where numbers go): this says why instead of the check's message about the misplaced value.
_KVCACHE_ORDER_HINT = (
    "arguments after v go by keyword: the positional order after v is (cache_seqlens, softmax_scale, causal, "
    "window_size, softcap), flash_attn's puts rotary_cos, rotary_sin first (rotary_*, cache_batch_idx, "
    "cache_leftpad, block_table here are keyword-only)"
)


def _looks_shifted(cache_seqlens, softmax_scale, causal) -> bool:
    """Whether the values look like flash_attn's positional order: rotary_cos / rotary_sin (2-D float tensors) where
    cache_seqlens / softmax_scale go, or cache_seqlens (a (batch,) tensor, or an int other than 0 / 1) in causal."""
    def rotary_table(t):
        return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()

    shifted_lens = isinstance(causal, torch.Tensor) and causal.dim() >= 1
    shifted_int = type(causal) is int and causal not in (0, 1)
    return rotary_table(cache_seqlens) or rotary_table(softmax_scale) or shifted_lens or shifted_int


def _check_kvcache_order(fn: str, cache_seqlens, softmax_scale, causal) -> None:
    if _looks_shifted(cache_seqlens, softmax_scale, causal):
        raise TypeError(f"llmkernels.{fn}: {_KVCACHE_ORDER_HINT}")


def _check_kvcache_args(fn: str, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size, softcap):
    """flash_attn_with_kvcache's checks, raising the first problem found."""
    _check_common(fn, q, softmax_scale, window_size, softcap)
    _check_kv(fn, q, ("k_cache", "v_cache"), k_cache, v_cache)
    batch, capacity, nheads_k = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if (k is None) != (v is None):
        raise ValueError(f"llmkernels.{fn}: k and v (the new tokens) must be given together")
    seqlen_new = 0
    if k is not None:
        check_tensor(fn, "k", k, ndim=4)
        seqlen_new = k.shape[1]
        _check_kv(fn, q, ("k", "v"), k, v, seqlen=seqlen_new, nheads_k=nheads_k)
    if cache_seqlens is None:
        cache_seqlens = capacity - seqlen_new
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(
                f"llmkernels.{fn}: cache_seqlens ({cache_seqlens}) + the {seqlen_new} new tokens must fit "
                f"in the cache's {capacity} slots"
            )
    else:
        check_tensor(fn, "cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_seqlens", cache_seqlens, (batch,))


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """softmax(q k^T * softmax_scale) v over the visible keys, like flash_attn.flash_attn_func; differentiable.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0
    (GQA / MQA); fp16, bf16 or fp32, head dim <= 256, last dimension contiguous. softmax_scale defaults to
    headdim ** -0.5; window_size = (left, right), -1 unbounded, aligned bottom-right; causal sets right = 0;
    softcap > 0 caps scores at softcap * tanh(s / softcap). Returns (batch, seqlen_q, nheads, headdim) in q's dtype.
    return_attn_probs=True returns (out, softmax_lse, None) as flash_attn does without dropout: softmax_lse
    (batch, nheads, seqlen_q) fp32 is the natural-log log-sum-exp of each row's scores (-inf where no key is
    seen), and differentiable (flash_attn drops its gradient; here it flows into q and k). alibi_slopes (fp32
    (nheads,) or (batch, nheads)) adds -slope * |i + seqlen_k - seqlen_q - j| to the scores after the soft-cap, as
    flash_attn's ALiBi (finite slopes, checked by the CPU and reference backends; no gradient for them; see
    reference/attention.py for how its lse compares under causal). dropout_p in [0, 1) drops each probability
    with that chance and scales the kept ones by 1 / P(kept) (~ 1 / (1 - dropout_p)), as flash_attn's (pass 0 in
    evaluation); the mask comes from a seed drawn from torch's default CPU generator (torch.manual_seed repeats it)
    and is redrawn by the backward, never stored (reference/dropout.py; the CPU and Triton kernels; on a GPU dropout
    runs on Triton).
    With dropout, return_attn_probs still gives (out, softmax_lse, None): flash_attn's third item, a debugging
    copy of the mask, is not built. deterministic=True keeps the backward's sums in a fixed order: on a GPU it runs
    the Triton kernels (the CUDA C++ backward adds dq, and a GQA group's dk / dv, with fp32 atomics, as flash_attn's
    does; the Triton one may, when its tuned tiles say that is faster); the CPU and reference backwards are
    deterministic either way.
    """
    fn = "flash_attn_func"
    if not _func_args_ok(q, k, v, softmax_scale, window_size, softcap):
        _check_func_args(fn, q, k, v, softmax_scale, window_size, softcap)  # raises, naming the argument
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    drop = dropout_args(fn, dropout_p)
    out, lse = flash_attn(q, k, v, scale, left, right, float(softcap), deterministic=bool(deterministic),
                          alibi_slopes=checked_alibi(fn, alibi_slopes, q, q.shape[0]), **drop)  # fmt: skip
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    *,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention against a KV cache (decoding), like flash_attn.flash_attn_with_kvcache; not differentiable (a
    backward through it raises, on every backend).

    q: (batch, seqlen_q, nheads, headdim); k_cache, v_cache: (batch, max_seqlen, nheads_k, headdim), updated in
    place; k, v: (batch, seqlen_new, nheads_k, headdim) new tokens or None; cache_seqlens: int or (batch,) int32
    tensor of tokens already cached per row (ragged allowed; None: the whole cache, minus the new tokens).
    The new tokens are written at cache_seqlens[i] .. + seqlen_new - 1, then q attends to the first
    cache_seqlens[i] + seqlen_new keys, the causal / window band aligned bottom-right. cache_seqlens itself is
    not advanced. Returns (batch, seqlen_q, nheads, headdim), or with return_softmax_lse=True (out, softmax_lse):
    softmax_lse (batch, nheads, seqlen_q) fp32, the natural-log log-sum-exp of each row's scaled (and capped)
    scores; what merging attention over several caches needs (cascade / prefix sharing). A row that sees no key
    gets -inf, as from flash_attn_func here (flash_attn's own kernel may give +inf there; -inf is the value whose
    weight in a merge is 0). The CUDA C++ kernels do not return it: on a GPU such calls run the Triton kernel.

    rotary_cos / rotary_sin ((seqlen_ro, rotary_dim / 2), as flash_attn's): the new k is rotated at positions
    cache_seqlens[i] + t before it is stored, and q at cache_seqlens[i] + t when causal or windowed, else at
    cache_seqlens[i] (every query at the first new position), the first rotary_dim channels, pairs (2c, 2c + 1)
    when rotary_interleaved else (c, c + rotary_dim / 2); see reference.attention.rotary_embedding. num_splits
    (a launch hint) is accepted and ignored.

    cache_batch_idx ((batch,) int32): row i of q uses row cache_batch_idx[i] of the caches, which may have any
    number of rows. block_table ((batch, max_pages) int32, paged KV as in flash_attn / vLLM): k_cache and v_cache
    are (num_pages, page_size, nheads_k, headdim) and position p of row i is slot p % page_size of page
    block_table[i, p // page_size]; page_size a multiple of 64. Either runs on the CPU and Triton kernels and the
    reference (the CUDA C++ kernels refuse them: a GPU runs Triton). alibi_slopes as flash_attn_func's, each row's
    distances from its own last key (cache_seqlens[i] + seqlen_new - 1 for the last query); on a GPU such calls
    run the Triton kernel too.

    cache_leftpad ((batch,) int32, flash_attn's; a batch left-padded to one length): row i's tokens start at slot
    cache_leftpad[i] <= cache_seqlens[i]; the slots before it are no keys: q attends to slots cache_leftpad[i] ..
    cache_seqlens[i] + seqlen_new - 1. Everything else keeps the slots as flash_attn does: the new tokens go to
    slot cache_seqlens[i] + t and rotary positions are those slots (RoPE scores depend only on distances). Not
    with block_table (as flash_attn). The CPU op refuses values out of range; the Triton kernel (what a GPU runs)
    clamps them into [0, cache_seqlens[i] + seqlen_new].
    """
    # (A decode step calls this once a layer: the common case costs a few None tests on top of _kvcache_args_ok.)
    fn = "flash_attn_with_kvcache"
    capacity = None  # tokens a row can hold, when the caches are read through a table
    if type(causal) is not bool or (cache_seqlens is not None and not isinstance(cache_seqlens, int) and (
            not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.is_floating_point())):  # fmt: skip
        _check_kvcache_order(fn, cache_seqlens, softmax_scale, causal)
    if block_table is not None or cache_batch_idx is not None:
        capacity = _check_indirect_cache(fn, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size,
                                         softcap, block_table, cache_batch_idx)  # fmt: skip
    elif not _kvcache_args_ok(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size, softcap):
        _check_kvcache_args(fn, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size, softcap)
    if not isinstance(cache_seqlens, torch.Tensor):  # an int (in range: checked), or None: the whole cache
        if cache_seqlens is None:
            cache_seqlens = (k_cache.shape[1] if capacity is None else capacity) - (0 if k is None else k.shape[1])
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = normalize_window(causal, window_size)
    if rotary_cos is not None or rotary_sin is not None:
        _check_rotary(fn, q, rotary_cos, rotary_sin)
    if cache_leftpad is not None:
        check_tensor(fn, "cache_leftpad", cache_leftpad, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_leftpad", cache_leftpad, (q.shape[0],))
        if block_table is not None:
            raise ValueError(f"llmkernels.{fn}: cache_leftpad and block_table cannot be given together (as in "
                             "flash_attn: a paged cache has no padding to skip)")  # fmt: skip
    lse = None
    if return_softmax_lse:
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    out = flash_attn_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, scale, left, right, float(softcap), block_table, cache_batch_idx,
        rotary_cos, rotary_sin, bool(rotary_interleaved), lse,
        alibi_slopes=checked_alibi(fn, alibi_slopes, q, q.shape[0]), cache_leftpad=cache_leftpad,
    )  # fmt: skip
    out = inference_only(fn, out, q, k, v, k_cache, v_cache, train_with="flash_attn_func / flash_attn_varlen_func")
    return (out, lse) if return_softmax_lse else out


def _check_indirect_cache(fn, q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, window_size, softcap,
                          block_table, cache_batch_idx) -> int:  # fmt: skip
    """flash_attn_with_kvcache's checks when the caches are read through block_table or cache_batch_idx (their
    first dimension is then pages or cache rows, not q's batch). Returns the tokens a row can hold."""
    _check_common(fn, q, softmax_scale, window_size, softcap)
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError(f"llmkernels.{fn}: block_table and cache_batch_idx cannot be given together")
    batch, _, nheads, d = q.shape
    check_tensor(fn, "k_cache", k_cache, ndim=4, device=q.device, last_dim_contiguous=True)
    check_same_dtype(fn, "k_cache", k_cache, "q", q)
    check_shape(fn, "k_cache", k_cache, (*k_cache.shape[:3], d))
    check_tensor(fn, "v_cache", v_cache, ndim=4, device=q.device, last_dim_contiguous=True)
    check_same_dtype(fn, "v_cache", v_cache, "q", q)
    check_shape(fn, "v_cache", v_cache, k_cache.shape)
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"llmkernels.{fn}: k_cache's nheads_k ({nheads_k}) must divide q's nheads ({nheads})")
    if block_table is not None:
        check_tensor(fn, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "block_table", block_table, (batch, block_table.shape[1]))
        page_size = k_cache.shape[1]
        if page_size == 0 or page_size % 64 != 0:
            raise ValueError(f"llmkernels.{fn}: with a block_table, k_cache must be (num_pages, page_size, nheads_k, "
                             f"headdim) with page_size a multiple of 64, got {tuple(k_cache.shape)}")  # fmt: skip
        capacity = block_table.shape[1] * page_size
    else:
        check_tensor(fn, "cache_batch_idx", cache_batch_idx, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_batch_idx", cache_batch_idx, (batch,))
        capacity = k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError(f"llmkernels.{fn}: k and v (the new tokens) must be given together")
    seqlen_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(fn, name, t, ndim=4, device=q.device, last_dim_contiguous=True)
            check_same_dtype(fn, name, t, "q", q)
            check_shape(fn, name, t, (batch, k.shape[1], nheads_k, d))
        seqlen_new = k.shape[1]
    if isinstance(cache_seqlens, int) and not 0 <= cache_seqlens <= capacity - seqlen_new:
        raise ValueError(f"llmkernels.{fn}: cache_seqlens ({cache_seqlens}) + the {seqlen_new} new tokens must fit "
                         f"in the cache's {capacity} slots")  # fmt: skip
    if isinstance(cache_seqlens, torch.Tensor):
        check_tensor(fn, "cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_seqlens", cache_seqlens, (batch,))
    return capacity


def _check_rotary(fn, q, cos, sin) -> None:
    if cos is None or sin is None:
        raise ValueError(f"llmkernels.{fn}: rotary_cos and rotary_sin must be given together")
    check_tensor(fn, "rotary_cos", cos, ndim=2, dtypes=_DTYPES, device=q.device)
    check_tensor(fn, "rotary_sin", sin, ndim=2, dtypes=_DTYPES, device=q.device)
    check_shape(fn, "rotary_sin", sin, cos.shape)
    if not 1 <= 2 * cos.shape[1] <= q.shape[-1] or cos.shape[0] < 1:
        raise ValueError(
            f"llmkernels.{fn}: rotary_cos must be (seqlen_ro >= 1, rotary_dim / 2) with rotary_dim <= the head dim "
            f"({q.shape[-1]}), got {tuple(cos.shape)}"
        )


def _rotate_for_kvcache(fn, q, k, cache_seqlens, cos, sin, interleaved, positional_q):
    """(q, k) rotated as flash_attn_with_kvcache's rotary_cos / rotary_sin say (see its docstring)."""
    start = cache_seqlens.to(torch.long).unsqueeze(1)
    span = max(q.shape[1] if positional_q else 1, 0 if k is None else k.shape[1])  # (the CPU op's count too)
    checkable = q.device.type == "cpu" and not torch.compiler.is_compiling()  # reading values: no sync, no trace
    if checkable and start.numel() and int(start.max()) + span > cos.shape[0]:
        raise ValueError(
            f"llmkernels.{fn}: rotary_cos has {cos.shape[0]} positions, the new tokens reach position "
            f"{int(start.max()) + span - 1}"
        )
    # On a GPU the positions are not read back (no sync): past the table they clamp to its last row.
    last = cos.shape[0] - 1
    steps_q = torch.arange(q.shape[1], device=q.device) if positional_q else q.new_zeros(q.shape[1], dtype=torch.long)
    q = rotary_embedding(q, cos, sin, (start + steps_q).clamp(max=last), interleaved)
    if k is not None:
        k = rotary_embedding(k, cos, sin, (start + torch.arange(k.shape[1], device=q.device)).clamp(max=last),
                             interleaved)  # fmt: skip
    return q, k


def grad_of_output(dout: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The backward's dout: zeros when only softmax_lse reached the loss (grads not materialised), and
    contiguous in its last dimension, as every kernel reads it."""
    if dout is None or dout.numel() == 0:  # (an empty expanded dout keeps its 0 strides through .contiguous())
        return torch.zeros_like(out, memory_format=torch.contiguous_format)
    return dout if dout.stride(-1) == 1 else dout.contiguous()


def register_attention_autograd(fwd_op: str, bwd_op, n_tensors: int) -> None:
    """Autograd of an attention forward op returning (out, softmax_lse) whose inputs are n_tensors tensors (q, k, v
    and, for varlen, cu_seqlens_q / _k), then scalars, then alibi_slopes (a tensor or None), dropout_p and
    dropout_seed. The backward op takes (dout, q, k, v, out, lse, the other tensors, the scalars, dsoftmax_lse,
    alibi_slopes, dropout_p, dropout_seed): dsoftmax_lse is None unless softmax_lse (return_attn_probs) reached the
    loss, and dout zeros when only it did. The slopes get no gradient (as flash_attn's); the backward redraws the
    dropout mask from the same seed."""

    def setup_context(ctx, inputs, output):
        *inputs, alibi_slopes, dropout_p, dropout_seed = inputs  # (torch fills in the defaults)
        ctx.save_for_backward(*inputs[:n_tensors], alibi_slopes, dropout_seed, *output)
        ctx.params = tuple(inputs[n_tensors:])
        ctx.dropout_p = dropout_p
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        q, k, v, *tensors, alibi_slopes, dropout_seed, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_of_output(dout, out), q, k, v, out, lse, *tensors, *ctx.params, dlse, alibi_slopes,
                            ctx.dropout_p, dropout_seed)  # fmt: skip
        return (dq, dk, dv) + (None,) * (n_tensors - 3 + len(ctx.params) + 3)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd of the C++ ops
# --------------------------------------------------------------------------------------------------
if _ext.loaded:

    @register_fake("llmkernels::flash_attn_fwd")
    def _fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes=None, dropout_p=0.0,
                  dropout_seed=None):  # fmt: skip
        batch, seqlen_q, nheads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)

    @register_fake("llmkernels::flash_attn_bwd")
    def _bwd_fake(dout, q, k, v, out, softmax_lse, softmax_scale, window_left, window_right, softcap,
                  dsoftmax_lse=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @register_fake("llmkernels::flash_attn_with_kvcache")
    def _kvcache_fake(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right,
                      softcap, block_table=None, cache_batch_idx=None, rotary_cos=None, rotary_sin=None,
                      rotary_interleaved=True, softmax_lse=None, alibi_slopes=None, cache_leftpad=None):  # fmt: skip
        return q.new_empty(q.shape)

    register_attention_autograd("llmkernels::flash_attn_fwd", torch.ops.llmkernels.flash_attn_bwd, 3)
    _checks.refuse_double_backward("llmkernels::flash_attn_bwd")
