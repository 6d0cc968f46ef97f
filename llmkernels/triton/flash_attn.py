"""Flash attention on Triton: the `llmkernels::flash_attn{,_varlen}_{fwd,bwd}_triton` ops and their autograd.

    flash_attn_triton(q, k, v, softmax_scale, window_left, window_right, softcap, deterministic, alibi_slopes)
        -> out   (differentiable)
    flash_attn_with_kvcache_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale,
                                   window_left, window_right, softcap, block_table=None, cache_batch_idx=None,
                                   alibi_slopes=None)
        -> out   (decode; writes the caches; paged or row-mapped caches: flash_attn_decode.py)
    flash_attn_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                             window_left, window_right, softcap, deterministic, alibi_slopes)
        -> out   (packed sequences; differentiable)

q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0;
fp16 / bf16 / fp32, headdim <= 256, last dimension contiguous (other strides are passed to the kernels).
Varlen: q (total_q, nheads, headdim), k, v (total_k, nheads_k, headdim), cu_seqlens (batch + 1,) int32.
Every op takes a trailing alibi_slopes: None, or fp32 contiguous (nheads,) or (batch, nheads) (varlen: batch =
sequences) slopes of flash_attn's ALiBi bias; no gradient flows to them (as flash_attn's).
Semantics are `llmkernels.reference.attention.flash_attn_fwd_ref`'s (flash_attn_varlen_fwd_ref's); the kernels
are in flash_attn_kernels.py.
Imported lazily by llmkernels.ops.attention: importing this module imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from triton.tools.tensor_descriptor import TensorDescriptor

from .._checks import check_same_dtype, check_shape, check_tensor
from ..ops.attention import register_attention_autograd
from ..reference.dropout import check_dropout_p, keep_scale, keep_threshold
from .flash_attn_decode import NO_ALIBI, check_kvcache_args, decode_launch
from .flash_attn_kernels import (
    flash_attn_bwd_dkdv_kernel,
    flash_attn_bwd_dq_kernel,
    flash_attn_bwd_preprocess_kernel,
    flash_attn_fwd_kernel,
    flash_attn_fwd_tma_kernel,
)
from .launch import INTERPRET, launch
from .tuned_file import read_tuned

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256
_INTERPRET = INTERPRET


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim bucket, chosen for H100 by compiling every kernel for
# sm_90a with triton 3.8 and reading ptxas -v: no register spills, except 80 / 16 bytes in the fp16/bf16 dQ
# kernel at head dims 128 / 256. Larger tiles (e.g. forward 128 x 64 at head dim 128) spill a little and may
# still be faster: worth a benchmark on the GPU. fp32 runs true-fp32 (FMA) dots, not tensor cores: small tiles,
# 8 warps from head dim 128 (4 warps spilled up to 4.8 KB with a window; scripts/triton_aot_check.py --all).
_FWD_CONFIGS = {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 16, 8, 2)}
_FWD_CONFIGS_FP32 = {64: (32, 32, 4, 2), 128: (32, 16, 8, 1), 256: (32, 16, 8, 1)}
_DKDV_CONFIGS = {64: (32, 64, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)}
_DKDV_CONFIGS_FP32 = {64: (16, 32, 4, 2), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)}
_DQ_CONFIGS = {64: (64, 64, 4, 2), 128: (64, 32, 8, 2), 256: (32, 16, 4, 2)}
_DQ_CONFIGS_FP32 = {64: (32, 32, 4, 2), 128: (16, 32, 8, 1), 256: (16, 16, 4, 1)}
# Decode (flash_attn_with_kvcache's split kernel): BLOCK_M is the most packed rows (query heads of a KV head x
# queries) a program takes, lowered to the next power of two >= 16 of what a call has; chosen from ptxas output
# (8 warps, no spills), never timed.
_DECODE_CONFIGS = {64: (32, 64, 8, 3), 128: (16, 64, 8, 3), 256: (16, 32, 8, 3)}
# The interpreter is slow per block op but not per element: small tiles, so the tests cross several tiles.
_INTERPRET_CONFIG = (16, 16, 1, 1)


def _pick(table: dict, block_d: int) -> tuple[int, int, int, int]:
    return table[min(bucket for bucket in table if bucket >= block_d)]


# A forward config may carry a 5th field, the kernel variant: 0 (or absent) flash_attn_fwd_kernel; 1
# flash_attn_fwd_tma_kernel (TMA loads of the unmasked K/V tiles, scale folded into the exp2's FMA); 2 the same
# with TMA loads of the masked tiles too. Only tuned files and config_override set it; shapes the TMA kernel
# cannot take (see _tma_view) run variant 0 with the same tiles.
FWD_VARIANTS = (0, 1, 2)
# A dK/dV config may carry a 5th field too: 1 makes that kernel add dq as well (atomically, in fp32) and skips
# the dQ kernel, which recomputes S and dP (five tile products instead of seven); 2 the same with the adds as one
# TMA reduce per tile (cp.reduce.async.bulk: no per-element addresses in registers; where _tma_reduce_ok says no,
# and for packed sequences, 2 runs as 1). Atomic sums are not deterministic, so deterministic=True keeps the two
# kernels (with the same dK/dV tiles).
DKDV_VARIANTS = (0, 1, 2)
# Tuned winners measured at seqlen <= SHORT_SEQLEN are stored under "<mask>_short" ("full_short",
# "causal_short") and used for seqlen_k <= SHORT_SEQLEN; without one, the long-sequence winner applies.
SHORT_SEQLEN = 2048
# A forward winner measured with a sliding window (a left bound: Mistral's prefill, 16k tokens, window 4k) is
# stored as "window" and used for windowed sequences longer than SHORT_SEQLEN; without one, the causal winner.
_MASKS = ("causal", "full", "causal_short", "full_short", "window")


# Measured tiles: bench/tune_triton.py times candidate configs on a GPU and writes tuned_configs.json next to
# this file (or where LLMKERNELS_TRITON_CONFIGS points). Its winners, per kernel, head-dim bucket and
# causal/banded vs full attention, replace the fp16/bf16 tables above (fp16 has bf16's tile shapes) when the
# file was measured on a GPU of this one's compute capability (the same SM: "NVIDIA H200" or "NVIDIA H100 PCIe"
# take an "NVIDIA H100 80GB HBM3" file) with the same triton major.minor (codegen, and so the best tile, moves
# between releases). Anything else, a missing or corrupt file included, silently keeps the tables.
TUNED_CONFIGS_ENV = "LLMKERNELS_TRITON_CONFIGS"
TUNED_FORMAT = 1
TUNED_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "decode")
_BUCKETS = (64, 128, 256)
_override: dict[str, tuple[int, ...]] = {}


@contextlib.contextmanager
def config_override(**configs: tuple[int, ...] | None):
    """Force configs by kernel name (fwd=, bwd_dkdv=, bwd_dq=, decode=) in this process: how bench/tune_triton.py
    times candidates. Wins over everything else, the interpreter's tiles included."""
    unknown = set(configs) - set(TUNED_KERNELS)
    if unknown:
        raise ValueError(f"config_override: unknown kernels {sorted(unknown)}, expected {TUNED_KERNELS}")
    saved = dict(_override)
    _override.update({k: tuple(v) for k, v in configs.items() if v is not None})
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def tuned_configs_path() -> str:
    return os.environ.get(TUNED_CONFIGS_ENV) or os.path.join(os.path.dirname(__file__), "tuned_configs.json")


def _valid_config(cfg, kernel: str = "fwd") -> bool:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), and for the forward and dK/dV optionally a 5th field: the variant."""
    variants = {"fwd": FWD_VARIANTS, "bwd_dkdv": DKDV_VARIANTS}.get(kernel)
    lengths = (4, 5) if variants else (4,)
    if not (isinstance(cfg, (list, tuple)) and len(cfg) in lengths and all(type(x) is int for x in cfg)):
        return False
    if len(cfg) == 5 and cfg[4] not in variants:
        return False
    block_m, block_n, warps, stages = cfg[:4]
    # tl.arange needs powers of two, tl.dot needs every side >= 16.
    pow2 = all(16 <= b <= 256 and b & (b - 1) == 0 for b in (block_m, block_n))
    return pow2 and warps in (1, 2, 4, 8, 16) and 1 <= stages <= 8


def _parse_winners(entries: dict) -> dict:
    winners: dict = {}
    for kernel, buckets in entries.items():
        if kernel not in TUNED_KERNELS:
            continue
        for bucket, by_mask in buckets.items():
            for mask, cfg in by_mask.items():
                if int(bucket) not in _BUCKETS or mask not in _MASKS or not _valid_config(cfg, kernel):
                    raise ValueError(f"bad winner {kernel} {bucket} {mask}: {cfg!r}")
                winners.setdefault(kernel, {}).setdefault(int(bucket), {})[mask] = tuple(cfg)
    return winners


def load_tuned(
    path: str, device_name: str, capability: tuple[int, int], triton_version: str
) -> tuple[dict | None, str]:
    """(winners {kernel: {bucket: {"causal" | "full": config}}} or None, what was used and why) for this GPU."""
    return read_tuned(path, device_name, capability, triton_version, expected_format=TUNED_FORMAT,
                      fallback="static tables", parse_winners=_parse_winners)


@functools.cache
def _tuned() -> tuple[dict | None, str]:
    """Read once, at the first launch (never at import: the device query initialises CUDA)."""
    if _INTERPRET:
        return None, f"interpreter tiles {_INTERPRET_CONFIG} (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return None, "static tables (no GPU)"
    name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    return load_tuned(tuned_configs_path(), name, cap, triton.__version__)


def config_source() -> str:
    """Which configs the kernels use here, for `python -m llmkernels info`."""
    return _tuned()[1]


def _tuned_or(kernel: str, table: dict, block_d: int, banded: bool, seqlen: int | None = None,
              windowed: bool = False) -> tuple[int, ...]:  # fmt: skip
    winners = _tuned()[0] or {}
    bucket = min(b for b in _BUCKETS if b >= block_d)
    by_mask = winners.get(kernel, {}).get(bucket, {})
    mask = "causal" if banded else "full"
    if seqlen is not None and seqlen <= SHORT_SEQLEN:
        short = by_mask.get(mask + "_short")
        if short:
            return short
    elif windowed and by_mask.get("window"):
        return by_mask["window"]
    return by_mask.get(mask) or _pick(table, block_d)


def _fwd_config(block_d: int, dtype: torch.dtype, banded: bool = False, seqlen: int | None = None,
                windowed: bool = False) -> tuple[int, ...]:  # fmt: skip
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]) of the forward; banded: a causal or window mask;
    seqlen: seqlen_k, which picks a short-sequence winner where the tuned file has one; windowed: the band has a
    left bound (a sliding window), which picks the "window" winner for longer sequences."""
    return _kernel_config("fwd", _FWD_CONFIGS, _FWD_CONFIGS_FP32, block_d, dtype, banded, seqlen, windowed)


def _kernel_config(kernel: str, table: dict, fp32_table: dict, block_d: int, dtype: torch.dtype, banded: bool = False,
                   seqlen: int | None = None, windowed: bool = False) -> tuple[int, ...]:  # fmt: skip
    """An override, else the interpreter's tiles, else fp32's static table (tunes are measured in bf16), else the
    tuned winner or the static table."""
    if kernel in _override:
        return _override[kernel]
    if _INTERPRET:
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _pick(fp32_table, block_d)
    return _tuned_or(kernel, table, block_d, banded, seqlen, windowed)


def _bwd_configs(
    block_d: int, dtype: torch.dtype, banded: bool = False, seqlen: int | None = None
) -> tuple[tuple[int, ...], tuple[int, int, int, int]]:
    """Configs of the dK/dV kernel (holds two fp32 (BLOCK_N, d) accumulators; a 5th field 1: it adds dq too) and
    of the dQ kernel; seqlen: seqlen_k, as for _fwd_config."""
    if _INTERPRET:
        dkdv, dq = _INTERPRET_CONFIG, _INTERPRET_CONFIG
    elif dtype == torch.float32:
        dkdv, dq = _pick(_DKDV_CONFIGS_FP32, block_d), _pick(_DQ_CONFIGS_FP32, block_d)
    else:
        dkdv = _tuned_or("bwd_dkdv", _DKDV_CONFIGS, block_d, banded, seqlen)
        dq = _tuned_or("bwd_dq", _DQ_CONFIGS, block_d, banded, seqlen)
    return _override.get("bwd_dkdv", dkdv), _override.get("bwd_dq", dq)


def _tma_reduce_ok(q: torch.Tensor, headdim: int, block_d: int) -> bool:
    """Whether the dK/dV kernel may add dq through a TMA reduce (DQ_ATOMIC 2) rather than pointer atomics.

    Not in the interpreter (it has no TMA reduce); not with a padded head dim (the box would add into the next
    head's columns); and not while torch.compile traces the op (fake or functional tensors): its analysis of which
    arguments a Triton kernel writes does not know tt.descriptor_reduce (torch 2.14), so the graph would treat dq
    as the zeros it was allocated as.
    """
    tracing = is_fake(q) or isinstance(q, FunctionalTensor) or torch.compiler.is_compiling()
    return not (_INTERPRET or tracing or headdim != block_d)


def _decode_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(most packed rows per program, BLOCK_N, num_warps, num_stages) of the decode split kernel; a tuned winner
    ("decode", mask "full": measured at batch 64 x 4k keys, GQA 4) replaces the table for fp16 / bf16."""
    return _kernel_config("decode", _DECODE_CONFIGS, _DECODE_CONFIGS, block_d, dtype)


def _dq_atomic(dkdv_cfg: tuple[int, ...], deterministic: bool) -> int:
    """How the dK/dV kernel adds dq: 0 it does not (the dQ kernel runs), 1 pointer atomics, 2 TMA reduce."""
    return 0 if deterministic or len(dkdv_cfg) < 5 else dkdv_cfg[4]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (not TF32), so fp32 results match the fp32 reference closely.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor(fn, "q", q, ndim=4, dtypes=DTYPES, last_dim_contiguous=True)
    check_tensor(fn, "k", k, ndim=4, dtypes=DTYPES, device=q.device, last_dim_contiguous=True)
    check_tensor(fn, "v", v, ndim=4, dtypes=DTYPES, device=q.device, last_dim_contiguous=True)
    check_same_dtype(fn, "k", k, "q", q)
    check_same_dtype(fn, "v", v, "q", q)
    batch, _, nheads, headdim = q.shape
    if headdim > MAX_HEADDIM:
        raise ValueError(f"llmkernels.{fn}: q head dim must be <= {MAX_HEADDIM}, got {headdim}")
    check_shape(fn, "k", k, (batch, k.shape[1], k.shape[2], headdim))
    check_shape(fn, "v", v, k.shape)
    if k.shape[2] == 0 or nheads % k.shape[2] != 0:
        raise ValueError(f"llmkernels.{fn}: k's nheads_k ({k.shape[2]}) must divide q's nheads ({nheads})")


def _alibi_args(fn: str, alibi_slopes: torch.Tensor | None, batch: int, nheads: int, device: torch.device) -> dict:
    """The kernels' ALIBI / stride_alibi_b for alibi_slopes, checked: fp32, contiguous, (nheads,) (one row for the
    whole batch: batch stride 0) or (batch, nheads). None gives Nones: the kernels compile without ALiBi."""
    if alibi_slopes is None:
        return NO_ALIBI
    check_tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=device, contiguous=True)
    if alibi_slopes.dim() == 2:
        check_shape(fn, "alibi_slopes", alibi_slopes, (batch, nheads))
        return {"ALIBI": alibi_slopes, "stride_alibi_b": alibi_slopes.stride(0)}
    check_shape(fn, "alibi_slopes", alibi_slopes, (nheads,))
    return {"ALIBI": alibi_slopes, "stride_alibi_b": 0}


def _check_dropout(fn: str, dropout_p, dropout_seed) -> None:
    """dropout_p a number in [0, 1); with dropout_p > 0, dropout_seed an int64 (2,) CPU tensor."""
    check_dropout_p(fn, dropout_p)
    if dropout_p > 0 and not (
        isinstance(dropout_seed, torch.Tensor)
        and dropout_seed.dtype == torch.int64
        and dropout_seed.device.type == "cpu"
        and tuple(dropout_seed.shape) == (2,)
    ):
        got = (f"{tuple(dropout_seed.shape)} {dropout_seed.dtype} on {dropout_seed.device}"
               if isinstance(dropout_seed, torch.Tensor) else repr(dropout_seed))  # fmt: skip
        raise ValueError(f"llmkernels.{fn}: dropout_p > 0 needs dropout_seed, an int64 (2,) CPU tensor, got {got}")


def _dropout_args(fn: str, dropout_p: float, dropout_seed: torch.Tensor | None, device: torch.device) -> dict:
    """The kernels' dropout arguments (flash_attn_kernels.py): {} without
    dropout (the kernels compile without it), else the seed as a tensor on the kernels' device (read there: its
    values are never taken on the host, so a traced graph keeps drawing fresh masks), the 16-bit threshold and
    the kept probabilities' factor (both functions of dropout_p, a constant of the call)."""
    _check_dropout(fn, dropout_p, dropout_seed)
    if dropout_p == 0:
        return {}
    return {
        # non_blocking: a plain .to() of a CPU tensor waits for the stream's queued kernels; the seed is never written
        # afterwards, so the copy may stay in flight
        "DROP_SEED": dropout_seed.to(device, non_blocking=True),
        "drop_thresh": keep_threshold(dropout_p),
        "drop_scale": keep_scale(dropout_p),
        "DROPOUT": True,
    }


def _tma_view(t: torch.Tensor, block_n: int, block_d: int) -> TensorDescriptor | None:
    """A TMA descriptor of (batch, seqlen, nheads, headdim) K or V as its 2-D (batch * seqlen, nheads * headdim)
    view, tiles (block_n, headdim); None where the strides do not allow that view or TMA's 16-byte alignment."""
    batch, seqlen, nheads, headdim = t.shape
    es = t.element_size()
    ok = (
        headdim == block_d  # a padded tile would read the next head's columns
        and (nheads == 1 or t.stride(2) == headdim)
        and (batch == 1 or t.stride(0) == seqlen * t.stride(1))
        and t.stride(1) >= nheads * headdim  # rows that do not overlap (no broadcast views)
        and t.stride(1) * es % 16 == 0
        and t.storage_offset() * es % 16 == 0
        and (t.is_meta or is_fake(t) or t.data_ptr() % 16 == 0)
        and batch * seqlen < 2**31  # descriptor shapes and coordinates are int32
    )
    if not ok:
        return None
    return TensorDescriptor.from_tensor(
        t.as_strided((batch * seqlen, nheads * headdim), (t.stride(1), 1)), [block_n, headdim]
    )


def _bounded_windows(window_left: int, window_right: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """Windows as wide as the sequences become -1 (unbounded): same band, no mask work, no int32 overflow."""
    return (-1 if window_left >= seqlen_k else window_left), (-1 if window_right >= seqlen_q else window_right)


def _banded(meta: dict) -> bool:
    """A causal or window mask: tiles outside the band are skipped, which favours other tile shapes."""
    return meta["HAS_WL"] or meta["HAS_WR"]


def _common_meta(q: torch.Tensor, window_left: int, window_right: int, softcap: float) -> dict:
    return dict(
        HEADDIM=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        HAS_WL=window_left >= 0,
        HAS_WR=window_right >= 0,
        SOFTCAP=softcap > 0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )


@torch.library.triton_op("llmkernels::flash_attn_fwd_triton", mutates_args=())
def flash_attn_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (b, sq, h, d) in q's dtype, softmax_lse (b, h, sq) fp32 natural log; -inf where no key is seen).
    deterministic: for the backward (autograd hands it on), which may otherwise sum dq with atomics.
    alibi_slopes: (h,) or (b, h) fp32, or None; lse is that of the biased scores. dropout_p > 0 with dropout_seed
    (int64 (2,) on the CPU): reference/dropout.py's mask."""
    _check_qkv("flash_attn_fwd_triton", q, k, v)
    drop = _dropout_args("flash_attn_fwd_triton", dropout_p, dropout_seed, q.device)
    batch, seqlen_q, nheads, headdim = q.shape
    alibi = _alibi_args("flash_attn_fwd_triton", alibi_slopes, batch, nheads, q.device)
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, headdim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:  # nothing to attend to: zero output, lse -inf (and no zero-sized launch)
        return out.zero_(), lse.fill_(float("-inf"))
    window_left, window_right = _bounded_windows(window_left, window_right, seqlen_q, seqlen_k)
    meta = _common_meta(q, window_left, window_right, softcap)
    cfg = _fwd_config(meta["BLOCK_D"], q.dtype, _banded(meta), seqlen_k, windowed=meta["HAS_WL"])
    block_m, block_n, num_warps, num_stages = cfg[:4]
    grid = (triton.cdiv(seqlen_q, block_m), nheads, batch)  # not batch * nheads: grid y stops at 65535
    kernel, descs = flash_attn_fwd_kernel, ()
    # The TMA variant folds the scale into the max (needs scale > 0; soft-capping applies its own scale), which a
    # per-key bias breaks: ALiBi takes the pointer kernel.
    # The pointer kernel's varlen arguments: none (None is a constexpr: no kernel parameter, no code).
    variant, tail, extra = (cfg[4] if len(cfg) > 4 else 0), (None, None), {"VARLEN": False, **alibi, **drop}
    tma_ok = q.dtype != torch.float32 and (softmax_scale > 0 or softcap > 0) and alibi_slopes is None and not drop
    if variant in (1, 2) and tma_ok:
        k_desc, v_desc = _tma_view(k, block_n, meta["BLOCK_D"]), _tma_view(v, block_n, meta["BLOCK_D"])
        if k_desc is not None and v_desc is not None:
            kernel, descs, tail = flash_attn_fwd_tma_kernel, (k_desc, v_desc), ()
            extra = {"TMA_MASKED": variant == 2}
    launch(kernel, grid,
        q, k, v, *descs, out, lse, *tail,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, softmax_scale, softcap, window_left, window_right,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta, **extra,
    )  # fmt: skip
    return out, lse


@torch.library.triton_op("llmkernels::flash_attn_bwd_triton", mutates_args=())
def flash_attn_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool = False,
    dsoftmax_lse: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of flash_attn_fwd_triton from dout (b, sq, h, d), the saved out and softmax_lse (b, h, sq), and
    the gradient reaching softmax_lse when there is one (it lowers delta: d lse_i / d s_ij = p_ij). alibi_slopes,
    dropout_p, dropout_seed: the forward's (the bias is a constant in the scores: it changes P, not the formulas;
    the dropout mask is redrawn from the seed).

    dk, dv (b, sk, hk, d) are summed over each KV head's query heads inside the kernel (no extra pass). dq comes
    from the dQ kernel, or, when the dK/dV config asks for it and not deterministic, from atomic fp32 adds in the
    dK/dV kernel (see DKDV_VARIANTS).
    """
    fn = "flash_attn_bwd_triton"
    _check_qkv(fn, q, k, v)
    check_tensor(fn, "dout", dout, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    check_shape(fn, "dout", dout, q.shape)
    check_tensor(fn, "out", out, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    check_shape(fn, "out", out, q.shape)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    check_tensor(fn, "softmax_lse", softmax_lse, dtypes=(torch.float32,), device=q.device, contiguous=True)
    check_shape(fn, "softmax_lse", softmax_lse, (batch, nheads, seqlen_q))
    alibi = _alibi_args(fn, alibi_slopes, batch, nheads, q.device)
    options = {**alibi, **_dropout_args(fn, dropout_p, dropout_seed, q.device)}  # the kernels' optional args

    dk = torch.empty((batch, seqlen_k, nheads_k, headdim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, seqlen_k, nheads_k, headdim), dtype=v.dtype, device=v.device)
    if q.numel() == 0 or dk.numel() == 0:  # no scores at all: every gradient is zero
        return torch.zeros_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_()
    window_left, window_right = _bounded_windows(window_left, window_right, seqlen_q, seqlen_k)
    meta = _common_meta(q, window_left, window_right, softcap)
    dkdv_cfg, dq_cfg = _bwd_configs(meta["BLOCK_D"], q.dtype, _banded(meta), seqlen_k)
    # With dropout the atomic-dq tiles spill (948-1448 bytes at d 128, sm_90a, triton_aot_check.py): two kernels.
    atomic = _dq_atomic(dkdv_cfg, deterministic or dropout_p > 0)
    # The atomic paths sum into fp32 (zeroed) and cast once at the end.
    shape = (batch, seqlen_q, nheads, headdim)
    dq = torch.zeros(shape, dtype=torch.float32, device=q.device) if atomic else q.new_empty(shape)
    dq_arg = dq if atomic else None
    if atomic == 2:
        if _tma_reduce_ok(q, headdim, meta["BLOCK_D"]):
            dq_arg = TensorDescriptor.from_tensor(dq, [1, dkdv_cfg[0], 1, headdim])
        else:
            atomic = 1

    delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    launch(flash_attn_bwd_preprocess_kernel, (triton.cdiv(seqlen_q, dq_cfg[0]), nheads, batch),
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), nheads, seqlen_q,
        HEADDIM=headdim, BLOCK_M=dq_cfg[0], BLOCK_D=meta["BLOCK_D"],
    )  # fmt: skip
    _lower_delta(fn, delta, dsoftmax_lse)
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
    )  # fmt: skip
    scalars = (nheads, nheads // nheads_k, seqlen_q, seqlen_k, softmax_scale, softcap, window_left, window_right)
    block_m, block_n, num_warps, num_stages = dkdv_cfg[:4]
    launch(flash_attn_bwd_dkdv_kernel, (triton.cdiv(seqlen_k, block_n), nheads_k, batch),
        q, k, v, dout, softmax_lse, delta, dk, dv, dq_arg, None, None, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, VARLEN=False, DQ_ATOMIC=atomic,
        **meta, **options,
    )  # fmt: skip
    if atomic:
        return dq.to(q.dtype), dk, dv
    block_m, block_n, num_warps, num_stages = dq_cfg
    launch(flash_attn_bwd_dq_kernel, (triton.cdiv(seqlen_q, block_m), nheads, batch),
        q, k, v, dout, softmax_lse, delta, dq, None, None, *strides, dq.stride(0), dq.stride(1), dq.stride(2), *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, VARLEN=False, **meta, **options,
    )  # fmt: skip
    return dq, dk, dv


def _lower_delta(fn: str, delta: torch.Tensor, dsoftmax_lse: torch.Tensor | None) -> None:
    """delta -= dsoftmax_lse: a gradient reaching lse_i adds p_ij * dlse_i to ds_ij, as a lower delta_i does."""
    if dsoftmax_lse is not None:
        check_tensor(fn, "dsoftmax_lse", dsoftmax_lse, dtypes=(torch.float32,), device=delta.device)
        check_shape(fn, "dsoftmax_lse", dsoftmax_lse, delta.shape)
        delta.sub_(dsoftmax_lse)


def _kvcache(fn, q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right, softcap,
             block_table, cache_batch_idx, softmax_lse, alibi_slopes, cache_leftpad) -> torch.Tensor:  # fmt: skip
    check_kvcache_args(fn, q, k_cache, v_cache, k_new, v_new, cache_seqlens, DTYPES, MAX_HEADDIM, block_table,
                       cache_batch_idx, cache_leftpad)  # fmt: skip
    # The kernels read row b's length and padding at [b] (a strided column of a table would be misread).
    cache_seqlens = cache_seqlens.contiguous()
    cache_leftpad = None if cache_leftpad is None else cache_leftpad.contiguous()
    alibi = _alibi_args(fn, alibi_slopes, q.shape[0], q.shape[2], q.device)
    # Every row sees at most capacity keys (max_pages * page_size when paged): it bounds the band like seqlen_k.
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    window_left, window_right = _bounded_windows(window_left, window_right, q.shape[1], capacity)
    meta = _common_meta(q, window_left, window_right, softcap)
    return decode_launch(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale, window_left, window_right,
                         softcap, meta, block_table, cache_batch_idx, softmax_lse,
                         config=_decode_config(meta["BLOCK_D"], q.dtype), alibi=alibi,
                         cache_leftpad=cache_leftpad)  # fmt: skip


@torch.library.triton_op("llmkernels::flash_attn_with_kvcache_triton", mutates_args=("k_cache", "v_cache"))
def flash_attn_with_kvcache_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention against a KV cache (split-KV); see flash_attn_decode.py. Writes k_new, v_new into the caches.

    q: (b, sq, h, d); k_cache, v_cache: (b, max_seqlen, hk, d); k_new, v_new: (b, s_new, hk, d) or None;
    cache_seqlens: (b,) int32. Returns out (b, sq, h, d) in q's dtype. At most one of block_table ((b, max_pages)
    int32; the caches are then (num_pages, page_size, hk, d)) and cache_batch_idx ((b,) int32; the caches have any
    number of rows), as flash_attn's. alibi_slopes: (h,) or (b, h) fp32, or None; row i's distances count from its
    own key count cache_seqlens[i] + s_new. cache_leftpad: (b,) int32 or None, row i's first key slot (clamped
    into [0, cache_seqlens[i] + s_new] on the device).
    """
    return _kvcache("flash_attn_with_kvcache_triton", q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale,
                    window_left, window_right, softcap, block_table, cache_batch_idx, None, alibi_slopes,
                    cache_leftpad)  # fmt: skip


# A second op rather than an optional mutable lse argument: torch 2.11's ADInplaceOrView wrapper of Python custom
# ops indexes every mutable argument positionally and fails when a defaulted one is left out.
@torch.library.triton_op("llmkernels::flash_attn_with_kvcache_lse_triton", mutates_args=("k_cache", "v_cache"))
def flash_attn_with_kvcache_lse_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_with_kvcache_triton that also returns each row's log-sum-exp, (b, h, sq) fp32 (-inf where a row
    sees no key)."""
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    out = _kvcache("flash_attn_with_kvcache_lse_triton", q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                   softmax_scale, window_left, window_right, softcap, block_table, cache_batch_idx, lse,
                   alibi_slopes, cache_leftpad)  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------------
# Variable-length (packed) batches: flash_attn_varlen_func
# --------------------------------------------------------------------------------------------------
def _check_varlen(
    fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor
) -> None:
    check_tensor(fn, "q", q, ndim=3, dtypes=DTYPES, last_dim_contiguous=True)
    check_tensor(fn, "k", k, ndim=3, dtypes=DTYPES, device=q.device, last_dim_contiguous=True)
    check_tensor(fn, "v", v, ndim=3, dtypes=DTYPES, device=q.device, last_dim_contiguous=True)
    check_same_dtype(fn, "k", k, "q", q)
    check_same_dtype(fn, "v", v, "q", q)
    _, nheads, headdim = q.shape
    if headdim > MAX_HEADDIM:
        raise ValueError(f"llmkernels.{fn}: q head dim must be <= {MAX_HEADDIM}, got {headdim}")
    check_shape(fn, "k", k, (k.shape[0], k.shape[1], headdim))
    check_shape(fn, "v", v, k.shape)
    if k.shape[1] == 0 or nheads % k.shape[1] != 0:
        raise ValueError(f"llmkernels.{fn}: k's nheads_k ({k.shape[1]}) must divide q's nheads ({nheads})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(fn, name, cu, ndim=1, dtypes=(torch.int32,), device=q.device, contiguous=True)
        if cu.shape[0] < 1:
            raise ValueError(f"llmkernels.{fn}: {name} must hold batch + 1 >= 1 offsets, got shape {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"llmkernels.{fn}: cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}, "
            f"got {tuple(cu_seqlens_k.shape)}"
        )


def _varlen_blocks(max_seqlen: int, total: int, block: int) -> int:
    """Grid axis 0: max_seqlen is only a hint (the kernels loop over whatever blocks a sequence has), so it is
    bounded by the packed length and kept >= 1."""
    return max(1, triton.cdiv(min(max_seqlen, total), block))


@torch.library.triton_op("llmkernels::flash_attn_varlen_fwd_triton", mutates_args=())
def flash_attn_varlen_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, h, d) in q's dtype, softmax_lse (h, total_q) fp32) of the packed sequences; see
    flash_attn_varlen_fwd_ref. q: (total_q, h, d); k, v: (total_k, hk, d); cu_seqlens_*: (batch + 1,) int32.
    deterministic: for the backward, as flash_attn_fwd_triton's. alibi_slopes: (h,) or (batch, h) fp32, row i for
    sequence i, or None. dropout_p, dropout_seed: as flash_attn_fwd_triton's, sequence i's mask that of batch row i."""
    _check_varlen("flash_attn_varlen_fwd_triton", q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, nheads, headdim = q.shape
    total_k, nheads_k = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    options = {**_alibi_args("flash_attn_varlen_fwd_triton", alibi_slopes, batch, nheads, q.device),
               **_dropout_args("flash_attn_varlen_fwd_triton", dropout_p, dropout_seed, q.device)}  # fmt: skip
    # Rows past cu_seqlens_q[-1] belong to no sequence and no program writes them: they start as out 0, lse -inf.
    out = torch.zeros((total_q, nheads, headdim), dtype=q.dtype, device=q.device)
    lse = torch.full((nheads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or total_k == 0 or batch == 0:
        return out, lse
    # The longest sequence is not known without a sync; a window as wide as the packed tensor is unbounded too.
    window_left, window_right = _bounded_windows(window_left, window_right, total_q, total_k)
    meta = _common_meta(q, window_left, window_right, softcap)
    cfg = _fwd_config(meta["BLOCK_D"], q.dtype, _banded(meta), max_seqlen_k, windowed=meta["HAS_WL"])
    block_m, block_n, num_warps, num_stages = cfg[:4]
    grid = (_varlen_blocks(max_seqlen_q, total_q, block_m), nheads, batch)
    # Batch strides 0: a sequence's rows are found from cu_seqlens; seqlen_q / seqlen_k are the packed lengths.
    launch(flash_attn_fwd_kernel, grid,
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
        0, out.stride(0), out.stride(1),
        nheads, nheads // nheads_k, total_q, total_k, softmax_scale, softcap, window_left, window_right,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, VARLEN=True, **meta, **options,
    )  # fmt: skip
    return out, lse


@torch.library.triton_op("llmkernels::flash_attn_varlen_bwd_triton", mutates_args=())
def flash_attn_varlen_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool = False,
    dsoftmax_lse: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of flash_attn_varlen_fwd_triton from dout (total_q, h, d), the saved out and softmax_lse
    (h, total_q). Rows outside every sequence get zero gradients. dq, alibi_slopes and dropout as in
    flash_attn_bwd_triton."""
    fn = "flash_attn_varlen_bwd_triton"
    _check_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_tensor(fn, "dout", dout, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    check_shape(fn, "dout", dout, q.shape)
    check_tensor(fn, "out", out, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    check_shape(fn, "out", out, q.shape)
    total_q, nheads, headdim = q.shape
    total_k, nheads_k = k.shape[0], k.shape[1]
    check_tensor(fn, "softmax_lse", softmax_lse, dtypes=(torch.float32,), device=q.device, contiguous=True)
    check_shape(fn, "softmax_lse", softmax_lse, (nheads, total_q))
    batch = cu_seqlens_q.shape[0] - 1
    alibi = _alibi_args(fn, alibi_slopes, batch, nheads, q.device)
    options = {**alibi, **_dropout_args(fn, dropout_p, dropout_seed, q.device)}  # the kernels' optional args

    # No program writes rows outside the sequences (nor keys of sequences without queries, in dk / dv): zeros.
    dk = torch.zeros((total_k, nheads_k, headdim), dtype=k.dtype, device=k.device)
    dv = torch.zeros((total_k, nheads_k, headdim), dtype=v.dtype, device=v.device)
    if q.numel() == 0 or dk.numel() == 0 or batch == 0:
        return torch.zeros((total_q, nheads, headdim), dtype=q.dtype, device=q.device), dk, dv
    # The longest sequence is not known without a sync; a window as wide as the packed tensor is unbounded too.
    window_left, window_right = _bounded_windows(window_left, window_right, total_q, total_k)
    meta = _common_meta(q, window_left, window_right, softcap)
    dkdv_cfg, dq_cfg = _bwd_configs(meta["BLOCK_D"], q.dtype, _banded(meta), max_seqlen_k)
    atomic = min(_dq_atomic(dkdv_cfg, deterministic or dropout_p > 0), 1)  # no TMA reduce here (yet)
    dq = torch.zeros((total_q, nheads, headdim), dtype=torch.float32 if atomic else q.dtype, device=q.device)

    # delta = rowsum(dout * out) is per row, sequences or not: the dense kernel over the packed rows as one batch
    # of total_q writes exactly the (h, total_q) layout.
    delta = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    launch(flash_attn_bwd_preprocess_kernel, (triton.cdiv(total_q, dq_cfg[0]), nheads, 1),
        out, dout, delta, 0, out.stride(0), out.stride(1), 0, dout.stride(0), dout.stride(1), nheads, total_q,
        HEADDIM=headdim, BLOCK_M=dq_cfg[0], BLOCK_D=meta["BLOCK_D"],
    )  # fmt: skip
    _lower_delta(fn, delta, dsoftmax_lse)
    strides = (
        0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
        0, dout.stride(0), dout.stride(1),
    )  # fmt: skip
    scalars = (nheads, nheads // nheads_k, total_q, total_k, softmax_scale, softcap, window_left, window_right)
    block_m, block_n, num_warps, num_stages = dkdv_cfg[:4]
    launch(flash_attn_bwd_dkdv_kernel, (_varlen_blocks(max_seqlen_k, total_k, block_n), nheads_k, batch),
        q, k, v, dout, softmax_lse, delta, dk, dv, dq if atomic else None, cu_seqlens_q, cu_seqlens_k, *strides,
        0, dk.stride(0), dk.stride(1), 0, dv.stride(0), dv.stride(1), 0, dq.stride(0), dq.stride(1), *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, VARLEN=True, DQ_ATOMIC=atomic,
        **meta, **options,
    )  # fmt: skip
    if atomic:
        return dq.to(q.dtype), dk, dv
    block_m, block_n, num_warps, num_stages = dq_cfg
    launch(flash_attn_bwd_dq_kernel, (_varlen_blocks(max_seqlen_q, total_q, block_m), nheads, batch),
        q, k, v, dout, softmax_lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *strides, 0, dq.stride(0), dq.stride(1),
        *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, VARLEN=True, **meta, **options,
    )  # fmt: skip
    return dq, dk, dv


if _INTERPRET:
    # triton_op decomposes the op into its kernel launches when AOTAutograd functionalizes a graph, so Inductor
    # can see the kernels. Interpreted kernels cannot be traced: keep the ops opaque instead.
    def _keep_opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (flash_attn_fwd_triton, flash_attn_bwd_triton, flash_attn_with_kvcache_triton,
                flash_attn_with_kvcache_lse_triton, flash_attn_varlen_fwd_triton, flash_attn_varlen_bwd_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)


register_attention_autograd("llmkernels::flash_attn_fwd_triton", torch.ops.llmkernels.flash_attn_bwd_triton, 3)


def flash_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (batch, seqlen_q, nheads, headdim); differentiable in q, k, v (not in alibi_slopes)."""
    return torch.ops.llmkernels.flash_attn_fwd_triton(
        q, k, v, float(softmax_scale), int(window_left), int(window_right), float(softcap), bool(deterministic),
        alibi_slopes, float(dropout_p), dropout_seed,
    )[0]


register_attention_autograd(
    "llmkernels::flash_attn_varlen_fwd_triton", torch.ops.llmkernels.flash_attn_varlen_bwd_triton, 5
)


def flash_attn_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (total_q, nheads, headdim) of packed sequences; differentiable in q, k, v (not in
    alibi_slopes)."""
    return torch.ops.llmkernels.flash_attn_varlen_fwd_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale),
        int(window_left), int(window_right), float(softcap), bool(deterministic), alibi_slopes, float(dropout_p),
        dropout_seed,
    )[0]
