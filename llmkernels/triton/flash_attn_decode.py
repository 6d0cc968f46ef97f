"""Attention against a KV cache (decode) on Triton: split-KV ("flash-decoding") plus a combine kernel.

    flash_attn_with_kvcache_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens, softmax_scale,
                                   window_left, window_right, softcap, ..., alibi_slopes=None) -> out

q: (batch, seqlen_q, nheads, headdim); k_cache, v_cache: (batch, max_seqlen, nheads_k, headdim), updated in
place; k_new, v_new: (batch, seqlen_new, nheads_k, headdim) or None; cache_seqlens: (batch,) int32. The new
tokens are written at cache_seqlens[i] .. + seqlen_new - 1, then q attends to the first cache_seqlens[i] +
seqlen_new keys of row i, the window band aligned bottom-right (the C++ op `flash_attn_with_kvcache`).
Indirect caches (flash_attn's, at most one of the two): cache_batch_idx (batch,) int32 maps row i of q to cache
row cache_batch_idx[i] (constexpr INDEXED); block_table (batch, max_pages) int32 makes the caches (num_pages,
page_size, nheads_k, headdim) pages, position p of row i at slot p % page_size of page block_table[i, p //
page_size] (constexpr PAGED), a row holding max_pages * page_size tokens. Indices are never read back on the host:
the kernels and the append clamp them into range, so bad ones give garbage, not a memory fault.

Math: as flash_attn_kernels.py; ALiBi's distance i + shift - j counts from row b's own key count (shift =
cache_seqlens[b] + seqlen_new - seqlen_q). Each split s of the keys gives a partial (o_s normalised, lse_s); the
combine kernel merges them: lse = log sum_s exp(lse_s), o = sum_s exp(lse_s - lse) o_s.
Tiling: one program per (key split, block of rows, KV head, batch), where the rows are the query heads of
one KV head times the queries (GQA packing: each K/V tile is loaded once for the whole group). With one or a
few queries the work is reading the cache, so speed is bound by memory bandwidth; splitting the keys puts
enough programs on the GPU to reach it when batch * nheads_k is small.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._checks import check_same_dtype, check_shape, check_tensor
from .flash_attn_kernels import LN2, LOG2E, _alibi_bias, _softcap_scores
from .launch import INTERPRET, launch

_TARGET_PROGRAMS = 264  # about two waves on an H100 (132 SMs)
# Every launch names the ALiBi arguments, None included: torch.compile's wrap_triton does not fill in defaults.
NO_ALIBI = {"ALIBI": None, "stride_alibi_b": None}


@triton.jit
def _clamp_index(i, n):
    """i clamped into [0, n): a table entry the host never checked (no sync) must not address outside the cache."""
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def flash_attn_decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART,  # q: (b, sq, h, d); k, v: (b, cap, hk, d); o_part: (b, h, sq, splits, d)
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    nheads, group, seqlen_q, seqlen_new, capacity, split_len, num_splits, scale, softcap, window_left, window_right,
    # Indirect caches, all None (no parameters, no code) on the plain path. TABLE: block_table (PAGED) or
    # cache_batch_idx (INDEXED); cache_rows: k_cache.shape[0] (pages or rows), what its entries are clamped to.
    TABLE, stride_tb, stride_tp, page_size, cache_rows,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, INDEXED: tl.constexpr,
    ALIBI=None, stride_alibi_b=None,  # fp32 slopes (b, h) (stride_alibi_b 0: (h,)); None: no ALiBi (no code)
    LEFTPAD=None,  # cache_leftpad (b,) int32: row b's keys start at that slot; None: at 0 (no code)
):
    # grid (row blocks * splits, nheads_k, batch): the row blocks of a long prefill and batch * nheads_k can each
    # pass grid y / z's 65535, so the one unbounded count goes on axis 0.
    split = tl.program_id(0) % num_splits
    row_block = tl.program_id(0) // num_splits
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    off_b64 = off_b.to(tl.int64)

    # Row r of this KV head = (query head hk * group + r // seqlen_q, query r % seqlen_q).
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * seqlen_q
    head = off_hk * group + rows // seqlen_q
    qi = rows % seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEADDIM
    q_offs = qi[:, None].to(tl.int64) * stride_qm + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(Q + off_b64 * stride_qb + q_offs, mask=row_ok[:, None] & d_mask, other=0.0)

    # Clamped to the cache like the CUDA kernel: a length past the capacity must not read past the row.
    seqlen_k = tl.minimum(tl.load(SEQLENS + off_b) + seqlen_new, capacity)
    shift = seqlen_k - seqlen_q
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen_k)
    if HAS_WL:  # keys before the first query's window are never seen
        lo = tl.maximum(lo, shift - window_left)
    if HAS_WR:
        hi = tl.minimum(hi, seqlen_q - 1 + shift + window_right + 1)
    if LEFTPAD is not None:  # slots before it hold no key; the band and ALiBi are relative, so only this moves
        lo = tl.maximum(lo, tl.minimum(tl.maximum(tl.load(LEFTPAD + off_b), 0), seqlen_k))
    HAS_ALIBI: tl.constexpr = ALIBI is not None
    if HAS_ALIBI:  # each packed row's head has its slope, in the scores' log2 units
        slopes = tl.load(ALIBI + off_b64 * stride_alibi_b + head, mask=row_ok, other=0.0) * LOG2E

    if PAGED:  # each key's page is looked up in the loop; here only the head
        k_base = K + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_hk.to(tl.int64) * stride_vh
        table_row = TABLE + off_b64 * stride_tb
    elif INDEXED:
        cache_row = _clamp_index(tl.load(TABLE + off_b64 * stride_tb), cache_rows).to(tl.int64)
        k_base = K + cache_row * stride_kb + off_hk.to(tl.int64) * stride_kh
        v_base = V + cache_row * stride_vb + off_hk.to(tl.int64) * stride_vh
    else:
        k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols[:, None] < hi) & d_mask
        if PAGED:  # per key, not per tile: a tile may straddle pages (the window start is not page aligned)
            page = _clamp_index(tl.load(table_row + (cols // page_size) * stride_tp, mask=cols < hi, other=0),
                                cache_rows).to(tl.int64)
            slot = cols % page_size
            k = tl.load(k_base + (page * stride_kb + slot * stride_kn)[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0)
        else:
            k_tile = k_base + tl.cast(n0, tl.int64) * stride_kn  # int64 scalar step, int32 in-tile offsets
            k = tl.load(k_tile + (offs_n[:, None] * stride_kn + offs_d[None, :]), mask=kv_mask, other=0.0)
        s, _ = _softcap_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale, softcap, SOFTCAP)
        if HAS_ALIBI:  # the distance counts from this row's own key count (shift)
            s = _alibi_bias(s, slopes[:, None], qi[:, None], cols[None, :], shift)
        visible = cols[None, :] < hi
        if HAS_WL:
            visible &= cols[None, :] >= qi[:, None] + shift - window_left
        if HAS_WR:
            visible &= cols[None, :] <= qi[:, None] + shift + window_right
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: exp2 gives 0, not NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PAGED:
            v = tl.load(v_base + (page * stride_vb + slot * stride_vn)[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0)
        else:
            v_tile = v_base + tl.cast(n0, tl.int64) * stride_vn
            v = tl.load(v_tile + (offs_n[:, None] * stride_vn + offs_d[None, :]), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    o = acc * tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    # (b, h, sq, splits) row index of these rows for this split.
    part = ((off_b64 * nheads + head) * seqlen_q + qi) * num_splits + split
    tl.store(O_PART + part[:, None] * HEADDIM + offs_d[None, :], o, mask=row_ok[:, None] & d_mask)
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def flash_attn_decode_combine_kernel(
    O_PART, LSE_PART, Out,  # o_part: (b, h, sq, splits, d) fp32; lse_part: (b, h, sq, splits); out: (b, sq, h, d)
    LSE_OUT,  # (b, h, sq) fp32 contiguous, each row's log-sum-exp; None: not asked for (no code)
    stride_ob, stride_om, stride_oh, nheads, seqlen_q, num_splits,
    HEADDIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * h + head) * sq + i
    off_b = row // (nheads * seqlen_q)
    off_h = (row // seqlen_q) % nheads
    qi = row % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse - lse_max)  # 0 for splits that saw no key
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0.0, total, 1.0)
    o = tl.load(O_PART + (row * num_splits + offs_s[:, None]) * HEADDIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(Out + off_b * stride_ob + qi * stride_om + off_h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEADDIM)
    if LSE_OUT is not None:
        tl.store(LSE_OUT + row, tl.where(total > 0.0, lse_max + tl.log(tl.where(total > 0.0, total, 1.0)),
                                         float("-inf")))


def _split_plan(capacity: int, programs: int, interpret: bool, block_n: int) -> tuple[int, int]:
    """(split_len, num_splits): keys per split (a multiple of 64 and of the key tile, so only a split's last tile
    can be ragged) and how many splits cover the cache."""
    if interpret:  # small splits so the tests cross several of them and the combine does real work
        split_len = 16
    else:
        wanted = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(capacity, 256), 128))
        step = math.lcm(64, block_n)
        split_len = triton.cdiv(triton.cdiv(capacity, wanted), step) * step
    return split_len, max(1, triton.cdiv(capacity, split_len))


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Tokens one row of q can keep in the cache: max_pages * page_size when paged, else the cache's dim 1."""
    if block_table is not None:
        return block_table.shape[1] * k_cache.shape[1]
    return k_cache.shape[1]


def check_kvcache_args(fn, q, k_cache, v_cache, k_new, v_new, cache_seqlens, dtypes, max_headdim, block_table=None,
                       cache_batch_idx=None, cache_leftpad=None) -> None:  # fmt: skip
    check_tensor(fn, "q", q, ndim=4, dtypes=dtypes, last_dim_contiguous=True)
    batch, _, nheads, headdim = q.shape
    if headdim > max_headdim:
        raise ValueError(f"llmkernels.{fn}: q head dim must be <= {max_headdim}, got {headdim}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(fn, name, t, ndim=4, dtypes=dtypes, device=q.device, last_dim_contiguous=True)
        check_same_dtype(fn, name, t, "q", q)
    # Indirect caches: dim 0 holds pages or cache rows, not q's batch.
    cache_rows = k_cache.shape[0] if block_table is not None or cache_batch_idx is not None else batch
    check_shape(fn, "k_cache", k_cache, (cache_rows, k_cache.shape[1], k_cache.shape[2], headdim))
    check_shape(fn, "v_cache", v_cache, k_cache.shape)
    if k_cache.shape[2] == 0 or nheads % k_cache.shape[2] != 0:
        raise ValueError(f"llmkernels.{fn}: k_cache's nheads_k ({k_cache.shape[2]}) must divide q's nheads ({nheads})")
    _check_indirect(fn, q, k_cache, block_table, cache_batch_idx)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"llmkernels.{fn}: k_new and v_new must be given together")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_tensor(fn, name, t, ndim=4, dtypes=dtypes, device=q.device, last_dim_contiguous=True)
            check_same_dtype(fn, name, t, "q", q)
            check_shape(fn, name, t, (batch, k_new.shape[1], k_cache.shape[2], headdim))
        if k_new.shape[1] > cache_capacity(k_cache, block_table):
            raise ValueError(f"llmkernels.{fn}: k_new has {k_new.shape[1]} tokens, more than the cache holds")
    check_tensor(fn, "cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_shape(fn, "cache_seqlens", cache_seqlens, (batch,))
    if cache_leftpad is not None:
        check_tensor(fn, "cache_leftpad", cache_leftpad, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_leftpad", cache_leftpad, (batch,))
        if block_table is not None:
            raise ValueError(f"llmkernels.{fn}: cache_leftpad and block_table cannot be given together")


def _check_indirect(fn, q, k_cache, block_table, cache_batch_idx) -> None:
    """Shapes and dtypes of block_table / cache_batch_idx; their values stay on the device (clamped there)."""
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError(f"llmkernels.{fn}: block_table and cache_batch_idx cannot be given together")
    if block_table is not None:
        check_tensor(fn, "block_table", block_table, ndim=2, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "block_table", block_table, (q.shape[0], block_table.shape[1]))
        if k_cache.shape[1] == 0:  # positions are split by page_size
            raise ValueError(f"llmkernels.{fn}: with a block_table, k_cache must be (num_pages, page_size >= 1, "
                             f"nheads_k, headdim), got {tuple(k_cache.shape)}")  # fmt: skip
    if cache_batch_idx is not None:
        check_tensor(fn, "cache_batch_idx", cache_batch_idx, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(fn, "cache_batch_idx", cache_batch_idx, (q.shape[0],))


def _append_indirect(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx) -> None:
    """Writes the new tokens through the page table / row map, the destinations computed and clamped on the device
    (no host sync; in range for valid input, so clamping changes nothing there)."""
    batch, seqlen_new = k_new.shape[:2]
    capacity = cache_capacity(k_cache, block_table)
    if k_cache.shape[0] == 0 or capacity == 0:  # nowhere to write: only bad input gets here
        return
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k_new.device)
    pos = pos.clamp(0, capacity - 1)
    if block_table is not None:
        page_size = k_cache.shape[1]
        rows = block_table.long().gather(1, pos // page_size).clamp(0, k_cache.shape[0] - 1)
        slots = pos % page_size
    else:
        rows = cache_batch_idx.long().clamp(0, k_cache.shape[0] - 1)[:, None].expand(-1, seqlen_new)
        slots = pos
    k_cache.index_put_((rows, slots), k_new)
    v_cache.index_put_((rows, slots), v_new)


def decode_launch(q, k_cache, v_cache, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                  cache_seqlens, softmax_scale, window_left, window_right, softcap, meta,
                  block_table: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
                  softmax_lse: torch.Tensor | None = None, *, config: tuple[int, int, int, int],
                  alibi: dict | None = None, cache_leftpad: torch.Tensor | None = None) -> torch.Tensor:
    """Appends k_new / v_new to the caches, then runs the split and combine kernels; returns out (b, sq, h, d) and
    writes each row's log-sum-exp into softmax_lse ((b, h, sq) fp32 contiguous) when given. config: (most packed
    rows per program, BLOCK_N, num_warps, num_stages) of the split kernel, from flash_attn.py's _decode_config.
    alibi: the split kernel's ALIBI / stride_alibi_b (checked slopes), or None. cache_leftpad: (b,) int32 (checked),
    each row's first key slot, or None."""
    interpret = INTERPRET
    batch, seqlen_q, nheads, headdim = q.shape
    capacity, nheads_k = cache_capacity(k_cache, block_table), k_cache.shape[2]
    indirect = block_table is not None or cache_batch_idx is not None
    seqlen_new = 0
    if k_new is not None and k_new.shape[1] > 0 and indirect:
        seqlen_new = k_new.shape[1]
        _append_indirect(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx)
    elif k_new is not None and k_new.shape[1] > 0:
        seqlen_new = k_new.shape[1]
        # Positions cache_seqlens[i] + t, clamped on the device as _append_indirect's: no host sync, and a row that
        # claims more (or fewer than 0) tokens than its cache holds overwrites its own last (first) slot instead of
        # failing a device assertion (index_put on a GPU) or wrapping around (negative indices).
        pos = (cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=q.device)).clamp(0, capacity - 1)
        rows = torch.arange(batch, device=q.device)[:, None].expand(-1, seqlen_new)
        k_cache.index_put_((rows, pos), k_new)
        v_cache.index_put_((rows, pos), v_new)
    out = torch.empty((batch, seqlen_q, nheads, headdim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if capacity == 0 or k_cache.shape[0] == 0:  # no keys (no pages or rows: the clamps would have nothing to hit)
        if softmax_lse is not None:
            softmax_lse.fill_(float("-inf"))
        return out.zero_()
    group = nheads // nheads_k
    packed_rows = group * seqlen_q
    max_m, block_n, num_warps, num_stages = config
    block_m = max(min(max_m, triton.next_power_of_2(packed_rows)), 16)  # tl.dot's smallest tile is 16
    row_blocks = triton.cdiv(packed_rows, block_m)
    split_len, num_splits = _split_plan(capacity, batch * nheads_k * row_blocks, interpret, block_n)
    o_part = torch.empty((batch, nheads, seqlen_q, num_splits, headdim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, nheads, seqlen_q, num_splits), dtype=torch.float32, device=q.device)
    launch(flash_attn_decode_split_kernel, (row_blocks * num_splits, nheads_k, batch),
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        nheads, group, seqlen_q, seqlen_new, capacity, split_len, num_splits, softmax_scale, softcap, window_left,
        window_right, *_indirect_args(k_cache, block_table, cache_batch_idx),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta,
        PAGED=block_table is not None, INDEXED=cache_batch_idx is not None, **(alibi or NO_ALIBI),
        LEFTPAD=cache_leftpad,
    )  # fmt: skip
    launch(flash_attn_decode_combine_kernel, (batch * nheads * seqlen_q,),
        o_part, lse_part, out, softmax_lse, out.stride(0), out.stride(1), out.stride(2), nheads, seqlen_q, num_splits,
        HEADDIM=headdim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=meta["BLOCK_D"],
        num_warps=1 if interpret else 4,
    )  # fmt: skip
    return out


def _indirect_args(k_cache, block_table, cache_batch_idx) -> tuple:
    """The split kernel's (TABLE, stride_tb, stride_tp, page_size, cache_rows): Nones on the plain path (constexpr
    None: the kernel compiles as before)."""
    if block_table is not None:
        return block_table, block_table.stride(0), block_table.stride(1), k_cache.shape[1], k_cache.shape[0]
    if cache_batch_idx is not None:
        return cache_batch_idx, cache_batch_idx.stride(0), None, None, k_cache.shape[0]
    return None, None, None, None, None
