"""Triton kernels of flash attention (FlashAttention-2), forward and backward.

Math (per batch b, query head h, KV head h // group):
    s_ij = scale * q_i . k_j, optionally s_ij <- softcap * tanh(s_ij / softcap)
    ALiBi (ALIBI not None): s_ij <- s_ij - slope[b, h] * |i + shift - j|, after the soft-cap (a constant in s)
    key j visible to query i iff  i + shift - window_left <= j <= i + shift + window_right,  shift = sk - sq
    lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  o_i = sum_j p_ij v_j
Backward (D_i = do_i . o_i):
    dv_j = sum_i p_ij do_i,  dp_ij = do_i . v_j,  ds_ij = p_ij (dp_ij - D_i) * (1 - tanh^2 when soft-capped)
    dq_i = scale * sum_j ds_ij k_j,  dk_j = scale * sum_i ds_ij q_i

Tiling: the forward runs one program per (BLOCK_M query rows, head, batch) and streams BLOCK_N-key tiles of
K and V through an online softmax kept in fp32 registers, in the base-2 domain (log2(e) folded into the
scale, so each score costs one exp2). Only key tiles that intersect the causal / window band are visited,
and of those only the tiles the band cuts (or the ragged end of the sequence) pay for the mask: the
visited range is split into masked head, unmasked middle, masked tail. The backward recomputes P from
the saved lse: one program per BLOCK_N keys accumulates dK and dV over the query tiles of its band and
over every query head of its KV head group (so GQA needs no reduction afterwards), and one program per
BLOCK_M queries accumulates dQ over its key tiles. That recomputes S and dP a second time (seven tile
products where five would do); the opt-in DQ_ATOMIC variant of the dK/dV kernel instead adds each tile's
dS^T K into an fp32 dq with atomics (or a TMA reduce) and the dQ kernel does not run: not deterministic.

Dropout (DROPOUT=True): p_ij is zeroed where dropped, after it joins the row sum (lse is that of the scores) and
before P @ V, and the output takes the factor Z = 1 / P(kept) once at the end (a factor of up to 65536 inside
fp16 P would overflow); the backward uses the dropped P for dV (scaled at the end) and multiplies dP by kept * Z
(dS = P * (dP * Z - D)). The mask is a function of (seed, b * nheads + h, i, j) (Philox4x32-10,
llmkernels/reference/dropout.py), so the backward redraws it instead of storing it. The seed is read from an int64
(2,) tensor (DROP_SEED), not passed as numbers: a graph compiled with the op must not freeze one mask.

Varlen (VARLEN=True, flash_attn_varlen_func): q, o (total_q, h, d) and k, v (total_k, hk, d) hold the sequences
packed end to end, sequence b at rows CU_SEQLENS_*[b] .. [b + 1] - 1; lse / delta are (h, total_q). The grid's
batch axis is the sequence and its block axis is sized from max_seqlen, a mere hint: each program loops over the
blocks of its sequence with a stride of the grid's size. The per-block work is the dense kernel's, a @triton.jit
helper that gets pointers already moved to the sequence's first row; the dense path calls it once with the
same arguments as before.

Speed: for head dims >= 64 both passes are bound by tensor-core throughput of the two (forward) or five
(backward) tl.dot per tile; for small head dims and short rows, by the exp2 throughput and by reading K/V
(each K/V tile is read once per query block).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
PHILOX_M0 = tl.constexpr(0xD2511F53)  # Philox4x32 round multipliers and key increments (reference/dropout.py)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
DROPOUT_ARGS = ("drop_thresh",)  # do_not_specialize: a value, not a kernel variant


@triton.jit
def _band_tile_ranges(row_lo, row_hi, n_total, shift, window_lo, window_hi, HAS_LO: tl.constexpr,
                      HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [lo, a) masked, [a, b) unmasked, [b, end) masked for rows row_lo .. row_hi - 1 (row_hi > row_lo).

    Column j is visible from row r iff r + shift - window_lo <= j <= r + shift + window_hi and 0 <= j < n_total.
    Tiles start at multiples of BLOCK; [a, b) holds the tiles every row of the block sees entirely.
    """
    first = row_lo + shift
    last = row_hi - 1 + shift
    lo = 0
    full_lo = 0
    if HAS_LO:
        lo = tl.maximum(first - window_lo, 0)
        full_lo = tl.maximum(last - window_lo, 0)
    end = n_total
    full_hi = n_total
    if HAS_HI:
        end = tl.minimum(last + window_hi + 1, n_total)
        full_hi = tl.minimum(tl.maximum(first + window_hi + 1, 0), n_total)
    lo_tile = lo // BLOCK * BLOCK
    end = tl.where(end > lo, end, lo_tile)  # no visible column: every range is empty
    lo = lo_tile
    a = tl.minimum(tl.cdiv(full_lo, BLOCK) * BLOCK, end)
    a = tl.maximum(a, lo)
    b = tl.maximum(full_hi // BLOCK * BLOCK, a)
    b = tl.minimum(b, end)
    return lo, a, b, end


@triton.jit
def _load_tile(ptrs, mask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Interior tiles of a head dim that fills BLOCK_D load with no mask: nothing for the compiler to predicate."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _softcap_scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """(scores in the log2 domain, tanh factor or None). qk: raw dot products (fp32)."""
    if SOFTCAP:
        x = qk * (scale / softcap)
        # tanh from exp2 of a non-positive argument: no overflow, and tl has no portable tanh. Below |x| = 1/8 its
        # Taylor series instead (error < 2e-9 relative): 1 - t cancels as x -> 0 (a cap of 1e5 lost ~1e-3 of
        # each score; one past ~1e8 made every score 0).
        ax = tl.abs(x)
        t = tl.exp2(ax * (-2.0 * LOG2E))  # tensor first: the interpreter wraps constexpr * tensor
        x2 = x * x
        series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        th = tl.where(ax < 0.125, series, (1.0 - t) / (1.0 + t))
        th = tl.where(x < 0, -th, th)
        return th * (softcap * LOG2E), th
    else:
        return qk * (scale * LOG2E), qk


@triton.jit
def _alibi_bias(s, slope, rows, cols, shift):
    """s - slope * |row + shift - col|: ALiBi's distance from the bottom-right-aligned diagonal. slope must be in
    the units of s (times LOG2E in the log2 domain); rows / cols broadcast to s's shape. Finite for finite s, so
    the -inf of a mask applied afterwards stays -inf (never -inf - inf or inf * 0)."""
    return s - slope * tl.abs(rows + shift - cols).to(tl.float32)


@triton.jit
def _alibi_slope(ALIBI_ROW, off_h, HAS_ALIBI: tl.constexpr):
    """Head off_h's slope in log2 units (the scores' domain), 0.0 without ALiBi (never read then)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI_ROW + off_h) * LOG2E
    return slope


@triton.jit
def _alibi_row(ALIBI, stride_alibi_b):
    """This program's row of the slopes (grid axis 2: batch row or packed sequence; stride 0 for (nheads,)
    slopes); None (a constexpr: no code) without ALiBi."""
    row = ALIBI
    if ALIBI is not None:
        row = ALIBI + tl.program_id(2).to(tl.int64) * stride_alibi_b
    return row


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10's four uint32 output words for counter (c0, c1, c2, c3) and key (k0, k1), all uint32 (the
    counters one shape). The multipliers go first so that Triton types the products as uint32."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(PHILOX_M0, c0)
        lo0 = PHILOX_M0 * c0
        hi1 = tl.umulhi(PHILOX_M1, c2)
        lo1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _dropout_key(DROP_SEED, DROPOUT: tl.constexpr):
    """The Philox key: the two words of the int64 (2,) seed tensor modulo 2**32 (0, 0 without dropout: unused)."""
    if DROPOUT:
        return tl.load(DROP_SEED).to(tl.uint32), tl.load(DROP_SEED + 1).to(tl.uint32)
    else:
        return 0, 0


@triton.jit
def _dropout_tile(rows, col0, BLOCK_N: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_bh):
    """(rows, BLOCK_N) bool: whether probability (drop_bh = b * nheads + h, query rows[r], key col0 + c) is kept
    (rows and keys counted within the sequence; col0 a multiple of 8, as tiles start). The mask is
    llmkernels/reference/dropout.py's: one Philox call per (row, 8 keys), counter (j >> 3, i, bh, 0), key (seed0,
    seed1) (uint32, from _dropout_key), key 8g + t reading the 16-bit half t % 2 of word t // 2, kept iff that draw
    >= the threshold. The eight halves of a call are interleaved into the tile's key
    order with three joins (join stacks along a new last axis: the last join's halves are t's lowest bit)."""
    tl.static_assert(BLOCK_N % 8 == 0, "dropout draws keys in groups of 8")
    groups = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    zero = rows[:, None] * 0 + groups[None, :] * 0
    c0 = (groups[None, :] + zero).to(tl.uint32)
    c1 = (rows[:, None] + zero).to(tl.uint32)
    c2 = (zero + drop_bh).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, zero.to(tl.uint32), drop_seed0, drop_seed1)
    low = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))  # [.., t >> 2, (t >> 1) & 1]
    high = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    draws = tl.reshape(tl.join(low, high), (rows.shape[0], BLOCK_N))
    return draws >= drop_thresh.to(tl.uint32)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, start, stop,
               seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, HAS_WL: tl.constexpr,
               HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
               HAS_ALIBI: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_bh, DROPOUT: tl.constexpr):
    d_mask = offs_d[None, :] < HEADDIM
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_mask
        else:
            kv_mask = d_mask
        k_tile = k_base + tl.cast(n0, tl.int64) * stride_kn  # int64 scalar step, int32 in-tile offsets
        k = _load_tile(k_tile + (offs_n[:, None] * stride_kn + offs_d[None, :]), kv_mask, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = _softcap_scores(qk, scale, softcap, SOFTCAP)
        if HAS_ALIBI:
            s = _alibi_bias(s, slope, offs_m[:, None], cols[None, :], shift)
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if HAS_WL:
                visible &= cols[None, :] >= offs_m[:, None] + shift - window_left
            if HAS_WR:
                visible &= cols[None, :] <= offs_m[:, None] + shift + window_right
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # after the row sum: lse and the normalisation are those of the undropped probabilities
            p = tl.where(_dropout_tile(offs_m, n0, BLOCK_N, drop_seed0, drop_seed1, drop_thresh, drop_bh), p, 0.0)
        v_tile = v_base + tl.cast(n0, tl.int64) * stride_vn  # int64 scalar step, int32 in-tile offsets
        v = _load_tile(v_tile + (offs_n[:, None] * stride_vn + offs_d[None, :]), kv_mask, MASKED, EVEN_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _varlen_span(CU, b, total):
    """(start, length) of sequence b of a packed tensor of `total` rows, from cu_seqlens CU. Clamped into
    [0, total] with end >= start: the host cannot check the values without a sync, and nonsense ones must still
    never index outside the tensors."""
    start = tl.load(CU + b)
    end = tl.load(CU + b + 1)
    start = tl.minimum(tl.maximum(start, 0), total)
    end = tl.minimum(tl.maximum(end, start), total)
    return start, end - start


@triton.jit
def _varlen_spans(CU_SEQLENS_Q, CU_SEQLENS_K, total_q, total_k):
    """(first q row, q rows, first k row, k rows) of this program's sequence (grid axis 2), rows as int64."""
    q_start, len_q = _varlen_span(CU_SEQLENS_Q, tl.program_id(2), total_q)
    k_start, len_k = _varlen_span(CU_SEQLENS_K, tl.program_id(2), total_k)
    return q_start.to(tl.int64), len_q, k_start.to(tl.int64), len_k


@triton.jit
def _fwd_block(
    Q, K, V, Out, LSE, start_m, off_b, off_h, off_hk,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    nheads, lse_len, seqlen_q, seqlen_k, scale, softcap, window_left, window_right, ALIBI_ROW,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_bh, DROPOUT: tl.constexpr,
):
    """Query block start_m of (batch off_b, head off_h); LSE row r of that head at (off_b * nheads + off_h) *
    lse_len + r. ALIBI_ROW: the slopes of this batch row / sequence (HAS_ALIBI). drop_bh: the dropout mask's
    (batch row or sequence) * nheads + head."""
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEADDIM
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & d_mask, other=0.0)
    # Scalar bases; tile pointers are formed inside the loops (a live 2-D pointer tensor costs 2 regs/elem).
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope = _alibi_slope(ALIBI_ROW, off_h, HAS_ALIBI)

    shift = seqlen_k - seqlen_q
    row_hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q)
    lo, a, b, end = _band_tile_ranges(start_m * BLOCK_M, row_hi, seqlen_k, shift, window_left, window_right,
                                      HAS_WL, HAS_WR, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               lo, a, seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM,
                               BLOCK_N, BLOCK_D, True, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D,
                               HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh, drop_bh, DROPOUT)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               a, b, seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM,
                               BLOCK_N, BLOCK_D, False, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D,
                               HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh, drop_bh, DROPOUT)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               b, end, seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM,
                               BLOCK_N, BLOCK_D, True, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D,
                               HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh, drop_bh, DROPOUT)

    # Rows that saw no key: l = 0 -> output 0 and lse = -inf.
    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l * drop_scale
    out = acc * inv_l[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & d_mask)
    lse_ptrs = LSE + (off_b * nheads + off_h) * lse_len + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def flash_attn_fwd_kernel(
    Q, K, V, Out, LSE,  # q: (b, sq, h, d); k, v: (b, sk, hk, d); o like q; lse: (b, h, sq) fp32
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: (b + 1,) int32; q, o (total_q, h, d); k, v (total_k, hk, d); lse (h, total_q)
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    nheads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,  # VARLEN: total_q, total_k
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    ALIBI=None, stride_alibi_b=None,  # fp32 slopes (b, h) (stride_alibi_b 0: (h,)); None: no ALiBi (no code)
    DROP_SEED=None, drop_thresh=0, drop_scale=1.0, DROPOUT: tl.constexpr = False,  # see the module doc
):
    HAS_ALIBI: tl.constexpr = ALIBI is not None
    drop_seed0, drop_seed1 = _dropout_key(DROP_SEED, DROPOUT)
    alibi_row = _alibi_row(ALIBI, stride_alibi_b)
    if VARLEN:
        off_h = tl.program_id(1)
        off_hk = (off_h // group).to(tl.int64)
        off_h = off_h.to(tl.int64)
        q0, len_q, k0, len_k = _varlen_spans(CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k)
        # The grid is sized from max_seqlen_q, a hint: each program strides over its sequence's blocks instead.
        # Batch index 0: the bases passed point at the sequence's first row (lse / delta: (h, total_q)).
        n_blocks = tl.cdiv(len_q, BLOCK_M)
        for it in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            _fwd_block(Q + q0 * stride_qm, K + k0 * stride_kn, V + k0 * stride_vn, Out + q0 * stride_om, LSE + q0,
                       n_blocks - 1 - it, 0, off_h, off_hk, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn,
                       stride_kh, stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh, nheads, seqlen_q,
                       len_q, len_k, scale, softcap, window_left, window_right, alibi_row, HEADDIM, BLOCK_M, BLOCK_N,
                       BLOCK_D, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh,
                       drop_scale, tl.program_id(2).to(tl.int64) * nheads + off_h, DROPOUT)
    else:
        # Longest rows (the last query blocks under a causal mask) are scheduled first.
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        # grid (query blocks, nheads, batch): batch * nheads on one axis would overflow grid y's 65535
        off_h = tl.program_id(1)
        off_b = tl.program_id(2).to(tl.int64)
        off_hk = (off_h // group).to(tl.int64)
        off_h = off_h.to(tl.int64)
        _fwd_block(Q, K, V, Out, LSE, start_m, off_b, off_h, off_hk, stride_qb, stride_qm, stride_qh, stride_kb,
                   stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh, nheads,
                   seqlen_q, seqlen_q, seqlen_k, scale, softcap, window_left, window_right, alibi_row, HEADDIM,
                   BLOCK_M, BLOCK_N, BLOCK_D, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HAS_ALIBI, drop_seed0,
                   drop_seed1, drop_thresh, drop_scale, off_b * nheads + off_h, DROPOUT)


@triton.jit
def flash_attn_bwd_preprocess_kernel(
    Out, DO, DELTA,  # o, do: (b, sq, h, d); delta: (b, h, sq) fp32 = rowsum(do * o)
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
    nheads, seqlen_q,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    off_h = tl.program_id(1).to(tl.int64)  # grid (query blocks, nheads, batch)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEADDIM)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (off_b * nheads + off_h) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, dq_base, dq_b, dq_h, stride_qm, stride_dom,
                    stride_dqm, offs_m, offs_n, offs_d, start, stop, seqlen_q, seqlen_k, shift, window_left,
                    window_right, scale, softcap, slope, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_bh,
                    DROPOUT: tl.constexpr, key0, BLOCK_N: tl.constexpr):
    """Adds one query head's contribution from query rows [start, stop) to dk, dv (BLOCK_N, BLOCK_D) fp32, and
    with DQ_ATOMIC this key block's share of dq to fp32 rows that other key blocks add to as well: DQ_ATOMIC 1
    through pointers (dq_base: this head's row 0), 2 through a TMA reduce (dq_base: a (b, sq, h, d) descriptor,
    (dq_b, dq_h) this batch and head; rows past the tensor are clipped, and a ragged tile's rows past seqlen_q add
    zeros: their P is masked).

    Works on transposed tiles (keys x queries) so P^T and dS^T feed tl.dot without a transpose.
    """
    d_mask = offs_d[None, :] < HEADDIM
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + offs_m
        if MASKED:
            qo_mask = (rows[:, None] < seqlen_q) & d_mask
        else:
            qo_mask = d_mask
        q_tile = q_base + tl.cast(m0, tl.int64) * stride_qm  # int64 scalar step, int32 in-tile offsets
        q = _load_tile(q_tile + (offs_m[:, None] * stride_qm + offs_d[None, :]), qo_mask, MASKED, EVEN_D)
        do_tile = do_base + tl.cast(m0, tl.int64) * stride_dom  # int64 scalar step, int32 in-tile offsets
        do = _load_tile(do_tile + (offs_m[:, None] * stride_dom + offs_d[None, :]), qo_mask, MASKED, EVEN_D)
        lse = tl.load(lse_ptr + rows, mask=rows < seqlen_q, other=float("inf")) * LOG2E
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
        delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        s_t, tanh_t = _softcap_scores(qk_t, scale, softcap, SOFTCAP)
        if HAS_ALIBI:
            s_t = _alibi_bias(s_t, slope, rows[None, :], offs_n[:, None], shift)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            visible = rows[None, :] < seqlen_q
            if HAS_WL:
                visible &= offs_n[:, None] >= rows[None, :] + shift - window_left
            if HAS_WR:
                visible &= offs_n[:, None] <= rows[None, :] + shift + window_right
            p_t = tl.where(visible, p_t, 0.0)
        if DROPOUT:  # dV from the dropped P (its factor at the end); dS = P * (dP * kept * Z - D)
            kept_t = tl.trans(_dropout_tile(rows, key0, BLOCK_N, drop_seed0, drop_seed1, drop_thresh, drop_bh))
            dv += tl.dot(tl.where(kept_t, p_t, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * tl.where(kept_t, drop_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        ds_t = ds_t.to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if DQ_ATOMIC != 0:
            # Keys past seqlen_k (a ragged last block) were loaded as 0 but their P is not masked: harmless for
            # dK / dV (never stored), but their dS can overflow the cast to inf and inf * 0 is NaN in dq.
            ds_t = tl.where(offs_n[:, None] < seqlen_k, ds_t, 0.0)
            dq_part = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * scale  # (BLOCK_M, BLOCK_D)
            if DQ_ATOMIC == 1:
                dq_tile = dq_base + tl.cast(m0, tl.int64) * stride_dqm  # int64 scalar step, int32 in-tile offsets
                tl.atomic_add(dq_tile + (offs_m[:, None] * stride_dqm + offs_d[None, :]), dq_part,
                              mask=(rows[:, None] < seqlen_q) & d_mask, sem="relaxed")
            else:
                dq_base.atomic_add([dq_b, m0, dq_h, 0], tl.reshape(dq_part, (1, BLOCK_M, 1, dq_part.shape[1])))
    return dk, dv


@triton.jit
def _bwd_dkdv_block(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, start_n, off_b, off_hk,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_dqb, stride_dqm, stride_dqh,
    nheads, group, lse_len, seqlen_q, seqlen_k, scale, softcap, window_left, window_right, ALIBI_ROW,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, HAS_ALIBI: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_b,
    DROPOUT: tl.constexpr,
):
    """Key block start_n of (batch off_b, KV head off_hk); LSE / delta row r of head h at (off_b * nheads + h) *
    lse_len + r. DQ (DQ_ATOMIC only): fp32, laid out like q, gets this block's share of dq added. drop_b: the
    dropout mask's batch row or sequence."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEADDIM)
    cols = offs_n[:, None].to(tl.int64)
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + cols * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + cols * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows that see these keys: the band seen from the key side (shift negated, windows swapped).
    shift = seqlen_k - seqlen_q
    col_hi = tl.minimum(start_n * BLOCK_N + BLOCK_N, seqlen_k)
    lo, a, b, end = _band_tile_ranges(start_n * BLOCK_N, col_hi, seqlen_q, -shift, window_right, window_left,
                                      HAS_WR, HAS_WL, BLOCK_M)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_ptr = LSE + (off_b * nheads + off_h) * lse_len
        delta_ptr = DELTA + (off_b * nheads + off_h) * lse_len
        dq_base, dq_b, dq_h = DQ, 0, 0  # DQ_ATOMIC 2: the descriptor and this (batch, head)'s coordinates
        if DQ_ATOMIC == 1:
            dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
        if DQ_ATOMIC == 2:
            dq_b, dq_h = off_b.to(tl.int32), off_h.to(tl.int32)
        slope = _alibi_slope(ALIBI_ROW, off_h, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, dq_base, dq_b, dq_h,
                                 stride_qm, stride_dom, stride_dqm, offs_m, offs_n, offs_d, lo, a, seqlen_q, seqlen_k,
                                 shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_M, True,
                                 HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, DQ_ATOMIC, HAS_ALIBI,
                                 drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_b * nheads + off_h, DROPOUT,
                                 start_n * BLOCK_N, BLOCK_N)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, dq_base, dq_b, dq_h,
                                 stride_qm, stride_dom, stride_dqm, offs_m, offs_n, offs_d, a, b, seqlen_q, seqlen_k,
                                 shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_M, False,
                                 HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, DQ_ATOMIC, HAS_ALIBI,
                                 drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_b * nheads + off_h, DROPOUT,
                                 start_n * BLOCK_N, BLOCK_N)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, dq_base, dq_b, dq_h,
                                 stride_qm, stride_dom, stride_dqm, offs_m, offs_n, offs_d, b, end, seqlen_q, seqlen_k,
                                 shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_M, True,
                                 HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, DQ_ATOMIC, HAS_ALIBI,
                                 drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_b * nheads + off_h, DROPOUT,
                                 start_n * BLOCK_N, BLOCK_N)

    dk = dk * scale
    if DROPOUT:
        dv = dv * drop_scale  # (P's dropout factor, kept out of the fp16 / bf16 tiles)
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + cols * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + cols * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def flash_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, do: (b, sq, h, d); k, v, dk, dv: (b, sk, hk, d); lse, delta: (b, h, sq)
    DQ,  # DQ_ATOMIC 1: fp32 like q, zeroed, gets dq added; 2: a TMA descriptor of it (dense only); 0: None
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: as flash_attn_fwd_kernel's; lse, delta: (h, total_q)
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_dqb, stride_dqm, stride_dqh,
    nheads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,  # VARLEN: total_q, total_k
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    ALIBI=None, stride_alibi_b=None,  # as flash_attn_fwd_kernel's
    DROP_SEED=None, drop_thresh=0, drop_scale=1.0, DROPOUT: tl.constexpr = False,  # as the forward's
):
    """One program per (BLOCK_N keys, KV head, batch); sums over the group's query heads in fp32. DQ_ATOMIC: dq
    too, from the same dS tile (five products per tile instead of the seven of this kernel plus the dQ kernel),
    added in fp32 with atomics: the order of the sums, and so dq's last bits, vary from run to run."""
    tl.static_assert(not (VARLEN and DQ_ATOMIC == 2), "packed sequences add dq through pointers (DQ_ATOMIC 1)")
    HAS_ALIBI: tl.constexpr = ALIBI is not None
    drop_seed0, drop_seed1 = _dropout_key(DROP_SEED, DROPOUT)
    alibi_row = _alibi_row(ALIBI, stride_alibi_b)
    if VARLEN:
        off_hk = tl.program_id(1).to(tl.int64)
        q0, len_q, k0, len_k = _varlen_spans(CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k)
        # The grid is sized from max_seqlen_k, a hint: each program strides over its sequence's blocks instead.
        # Batch index 0: the bases passed point at the sequence's first row (lse / delta: (h, total_q)).
        for start_n in range(tl.program_id(0), tl.cdiv(len_k, BLOCK_N), tl.num_programs(0)):
            dq_seq = None
            if DQ_ATOMIC == 1:
                dq_seq = DQ + q0 * stride_dqm
            _bwd_dkdv_block(Q + q0 * stride_qm, K + k0 * stride_kn, V + k0 * stride_vn, DO + q0 * stride_dom,
                            LSE + q0, DELTA + q0, DK + k0 * stride_dkn, DV + k0 * stride_dvn, dq_seq, start_n, 0,
                            off_hk, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb,
                            stride_vn, stride_vh, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn,
                            stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_dqb, stride_dqm, stride_dqh, nheads,
                            group, seqlen_q, len_q, len_k, scale, softcap, window_left, window_right, alibi_row,
                            HEADDIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, DQ_ATOMIC,
                            HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh, drop_scale, tl.program_id(2).to(tl.int64),
                            DROPOUT)
    else:
        start_n = tl.program_id(0)
        off_hk = tl.program_id(1).to(tl.int64)  # grid (key blocks, nheads_k, batch)
        off_b = tl.program_id(2).to(tl.int64)
        _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, start_n, off_b, off_hk, stride_qb, stride_qm,
                        stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_dob,
                        stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                        stride_dqb, stride_dqm, stride_dqh, nheads, group, seqlen_q, seqlen_q, seqlen_k, scale,
                        softcap, window_left, window_right, alibi_row, HEADDIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_WL,
                        HAS_WR, SOFTCAP, DOT_PRECISION, DQ_ATOMIC, HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh,
                        drop_scale, off_b, DROPOUT)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, start, stop,
                  seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                  SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_bh, DROPOUT: tl.constexpr):
    d_mask = offs_d[None, :] < HEADDIM
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_mask
        else:
            kv_mask = d_mask
        k_tile = k_base + tl.cast(n0, tl.int64) * stride_kn  # int64 scalar step, int32 in-tile offsets
        k = _load_tile(k_tile + (offs_n[:, None] * stride_kn + offs_d[None, :]), kv_mask, MASKED, EVEN_D)
        v_tile = v_base + tl.cast(n0, tl.int64) * stride_vn  # int64 scalar step, int32 in-tile offsets
        v = _load_tile(v_tile + (offs_n[:, None] * stride_vn + offs_d[None, :]), kv_mask, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, tanh_s = _softcap_scores(qk, scale, softcap, SOFTCAP)
        if HAS_ALIBI:
            s = _alibi_bias(s, slope, offs_m[:, None], cols[None, :], shift)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if HAS_WL:
                visible &= cols[None, :] >= offs_m[:, None] + shift - window_left
            if HAS_WR:
                visible &= cols[None, :] <= offs_m[:, None] + shift + window_right
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            kept = _dropout_tile(offs_m, n0, BLOCK_N, drop_seed0, drop_seed1, drop_thresh, drop_bh)
            dp = dp * tl.where(kept, drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_block(
    Q, K, V, DO, LSE, DELTA, DQ, start_m, off_b, off_h, off_hk,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh,
    nheads, lse_len, seqlen_q, seqlen_k, scale, softcap, window_left, window_right, ALIBI_ROW,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr, drop_seed0, drop_seed1, drop_thresh, drop_scale, drop_bh, DROPOUT: tl.constexpr,
):
    """Query block start_m of (batch off_b, head off_h); LSE / delta row r at (off_b * nheads + off_h) * lse_len + r.
    drop_bh as _fwd_block's."""
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qo_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEADDIM)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :], mask=qo_mask,
                other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :], mask=qo_mask,
                 other=0.0)
    row_ptr = (off_b * nheads + off_h) * lse_len + offs_m
    lse = tl.load(LSE + row_ptr, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
    delta = tl.load(DELTA + row_ptr, mask=offs_m < seqlen_q, other=0.0)
    # Scalar bases; tile pointers are formed inside the loops (a live 2-D pointer tensor costs 2 regs/elem).
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope = _alibi_slope(ALIBI_ROW, off_h, HAS_ALIBI)

    shift = seqlen_k - seqlen_q
    row_hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q)
    lo, a, b, end = _band_tile_ranges(start_m * BLOCK_M, row_hi, seqlen_k, shift, window_left, window_right,
                                      HAS_WL, HAS_WR, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, lo, a,
                       seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_N, True,
                       HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, HAS_ALIBI, drop_seed0, drop_seed1,
                       drop_thresh, drop_scale, drop_bh, DROPOUT)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, a, b,
                       seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_N, False,
                       HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, HAS_ALIBI, drop_seed0, drop_seed1,
                       drop_thresh, drop_scale, drop_bh, DROPOUT)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d, b, end,
                       seqlen_k, shift, window_left, window_right, scale, softcap, slope, HEADDIM, BLOCK_N, True,
                       HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, HAS_ALIBI, drop_seed0, drop_seed1,
                       drop_thresh, drop_scale, drop_bh, DROPOUT)
    dq = dq * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qo_mask)


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def flash_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # q, do, dq: (b, sq, h, d); k, v: (b, sk, hk, d); lse, delta: (b, h, sq)
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: as flash_attn_fwd_kernel's; lse, delta: (h, total_q)
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh,
    nheads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,  # VARLEN: total_q, total_k
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    ALIBI=None, stride_alibi_b=None,  # as flash_attn_fwd_kernel's
    DROP_SEED=None, drop_thresh=0, drop_scale=1.0, DROPOUT: tl.constexpr = False,  # as the forward's
):
    """One program per (BLOCK_M queries, head, batch): the forward's loop with dS in place of P."""
    HAS_ALIBI: tl.constexpr = ALIBI is not None
    drop_seed0, drop_seed1 = _dropout_key(DROP_SEED, DROPOUT)
    alibi_row = _alibi_row(ALIBI, stride_alibi_b)
    if VARLEN:
        off_h = tl.program_id(1)
        off_hk = (off_h // group).to(tl.int64)
        off_h = off_h.to(tl.int64)
        q0, len_q, k0, len_k = _varlen_spans(CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k)
        # The grid is sized from max_seqlen_q, a hint: each program strides over its sequence's blocks instead.
        # Batch index 0: the bases passed point at the sequence's first row (lse / delta: (h, total_q)).
        n_blocks = tl.cdiv(len_q, BLOCK_M)
        for it in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            _bwd_dq_block(Q + q0 * stride_qm, K + k0 * stride_kn, V + k0 * stride_vn, DO + q0 * stride_dom, LSE + q0,
                          DELTA + q0, DQ + q0 * stride_dqm, n_blocks - 1 - it, 0, off_h, off_hk, stride_qb, stride_qm,
                          stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_dob,
                          stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, nheads, seqlen_q, len_q, len_k,
                          scale, softcap, window_left, window_right, alibi_row, HEADDIM, BLOCK_M, BLOCK_N, BLOCK_D,
                          HAS_WL, HAS_WR, SOFTCAP, DOT_PRECISION, HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh,
                          drop_scale, tl.program_id(2).to(tl.int64) * nheads + off_h, DROPOUT)
    else:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        # grid (query blocks, nheads, batch): batch * nheads on one axis would overflow grid y's 65535
        off_h = tl.program_id(1)
        off_b = tl.program_id(2).to(tl.int64)
        off_hk = (off_h // group).to(tl.int64)
        off_h = off_h.to(tl.int64)
        _bwd_dq_block(Q, K, V, DO, LSE, DELTA, DQ, start_m, off_b, off_h, off_hk, stride_qb, stride_qm, stride_qh,
                      stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_dob, stride_dom,
                      stride_doh, stride_dqb, stride_dqm, stride_dqh, nheads, seqlen_q, seqlen_q, seqlen_k, scale,
                      softcap, window_left, window_right, alibi_row, HEADDIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_WL, HAS_WR,
                      SOFTCAP, DOT_PRECISION, HAS_ALIBI, drop_seed0, drop_seed1, drop_thresh, drop_scale,
                      off_b * nheads + off_h, DROPOUT)


# --- Forward variant for Hopper (opt-in: the 5th config field, see flash_attn.py) ------------------------------
# Differs from flash_attn_fwd_kernel in the loop body only:
# - the unmasked middle range reads K and V tiles through TMA tensor descriptors (one bulk copy per tile, no
#   address math or predicates in registers, and the pipeliner waits on an mbarrier instead of cp.async groups);
#   the masked head and tail keep pointer loads (TMA_MASKED=False), so a ragged last tile never reads past its
#   batch's rows, or use the descriptors too (TMA_MASKED=True: no cp.async path at all), where the rows past
#   seqlen_k, the next batch's keys, are masked in the scores and zeroed in V (0 * a non-finite V would be NaN);
# - the softmax scale is folded: the row max is taken over the raw dot products and scaled once per row, and
#   p = exp2(qk * scale' - m) is one FMA per score (flash_attn_fwd_kernel scales the whole tile, then subtracts).
#   Needs scale > 0 (max(c * x) = c * max(x)), which the host checks;
# - P @ V accumulates into the rescaled accumulator inside the dot (wgmma's accumulator input).


@triton.jit
def _fwd_inner_fold(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, desc_row, desc_col, stride_kn, stride_vn,
                    offs_m, offs_n, offs_d, start, stop, seqlen_k, shift, window_left, window_right, qk_scale, scale,
                    softcap, HEADDIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    EVEN_D: tl.constexpr, TMA_MASKED: tl.constexpr):
    """MASKED tiles load through pointers (as _fwd_inner) unless TMA_MASKED; the others through the descriptors,
    whose row desc_row + n0 is key n0 of this (batch, KV head) and column desc_col its first head-dim element."""
    d_mask = offs_d[None, :] < HEADDIM
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        if MASKED and not TMA_MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_mask
            k_tile = k_base + tl.cast(n0, tl.int64) * stride_kn
            k = _load_tile(k_tile + (offs_n[:, None] * stride_kn + offs_d[None, :]), kv_mask, True, EVEN_D)
        else:
            k = k_desc.load([desc_row + n0, desc_col])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            qk, _ = _softcap_scores(qk, scale, softcap, SOFTCAP)  # the log2 domain already: scale' = 1
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if HAS_WL:
                visible &= cols[None, :] >= offs_m[:, None] + shift - window_left
            if HAS_WR:
                visible &= cols[None, :] <= offs_m[:, None] + shift + window_right
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # Rows that have seen no visible key yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED and not TMA_MASKED:
            v_tile = v_base + tl.cast(n0, tl.int64) * stride_vn
            v = _load_tile(v_tile + (offs_n[:, None] * stride_vn + offs_d[None, :]), kv_mask, True, EVEN_D)
        else:
            v = v_desc.load([desc_row + n0, desc_col])
            if MASKED:
                v = tl.where(cols[:, None] < seqlen_k, v, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def flash_attn_fwd_tma_kernel(
    Q, K, V, K_desc, V_desc, Out, LSE,  # as flash_attn_fwd_kernel; K_desc, V_desc: 2-D (b * sk, hk * d) views
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    nheads, group, seqlen_q, seqlen_k, scale, softcap, window_left, window_right,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA_MASKED: tl.constexpr,
):
    """flash_attn_fwd_kernel with TMA loads of the K/V tiles and the scale folded (see above)."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h32 = tl.program_id(1)
    off_b32 = tl.program_id(2)
    off_hk32 = off_h32 // group
    off_b = off_b32.to(tl.int64)
    off_hk = off_hk32.to(tl.int64)
    off_h = off_h32.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEADDIM
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & d_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    desc_row = off_b32 * seqlen_k  # int32: the host checks batch * seqlen_k < 2^31 (a descriptor's shape is int32)
    desc_col = off_hk32 * HEADDIM

    if SOFTCAP:
        qk_scale = 1.0  # _softcap_scores returns log2-domain scores
    else:
        qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    shift = seqlen_k - seqlen_q
    row_hi = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q)
    lo, a, b, end = _band_tile_ranges(start_m * BLOCK_M, row_hi, seqlen_k, shift, window_left, window_right,
                                      HAS_WL, HAS_WR, BLOCK_N)
    acc, m_i, l_i = _fwd_inner_fold(acc, m_i, l_i, q, k_base, v_base, K_desc, V_desc, desc_row, desc_col, stride_kn,
                                    stride_vn, offs_m, offs_n, offs_d, lo, a, seqlen_k, shift, window_left,
                                    window_right, qk_scale, scale, softcap, HEADDIM, BLOCK_N, True, HAS_WL, HAS_WR,
                                    SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, TMA_MASKED)
    acc, m_i, l_i = _fwd_inner_fold(acc, m_i, l_i, q, k_base, v_base, K_desc, V_desc, desc_row, desc_col, stride_kn,
                                    stride_vn, offs_m, offs_n, offs_d, a, b, seqlen_k, shift, window_left,
                                    window_right, qk_scale, scale, softcap, HEADDIM, BLOCK_N, False, HAS_WL, HAS_WR,
                                    SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, TMA_MASKED)
    acc, m_i, l_i = _fwd_inner_fold(acc, m_i, l_i, q, k_base, v_base, K_desc, V_desc, desc_row, desc_col, stride_kn,
                                    stride_vn, offs_m, offs_n, offs_d, b, end, seqlen_k, shift, window_left,
                                    window_right, qk_scale, scale, softcap, HEADDIM, BLOCK_N, True, HAS_WL, HAS_WR,
                                    SOFTCAP, DOT_PRECISION, HEADDIM == BLOCK_D, TMA_MASKED)

    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & d_mask)
    lse_ptrs = LSE + (off_b * nheads + off_h) * seqlen_q + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
