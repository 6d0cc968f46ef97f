"""Triton sliding-window attention over a rolling KV buffer: `llmkernels::rolling_window_attn_triton`.

Math (see llmkernels/reference/sliding_window.py): the query at absolute position p = seqlens[b] + t sees
positions p - W + 1 .. p; position j is read in place from the chunk (j >= seqlens[b]) or from ring slot j % W.

Tiling: one program per (BLOCK_M query rows, query head, batch row). It walks the absolute key positions its
rows can see, lo = max(0, first row's p - W + 1) .. last row's p, in BLOCK_N tiles; each tile's K/V rows are
loaded with two masked loads (ring part, chunk part), so a tile may straddle the ring's wrap-around or the
ring/chunk boundary. Online softmax in fp32 (log2 units), scores and P @ V on tl.dot.

Bound: decode (BLOCK_M mostly padding) reads the window once per query head: memory bandwidth; chunked
prefill: tensor-core throughput, like flash attention with a window.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launch import launch

_LOG2E = 1.4426950408889634


@triton.jit
def _rolling_attn_kernel(
    Q, K, V, K_RING, V_RING, OUT, SEQLENS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_rb, stride_rs, stride_rh,  # k_ring and v_ring share one (contiguous) layout
    stride_ob, stride_os, stride_oh,
    chunk, nheads, group, window, head_dim, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # grid (row blocks, nheads, batch): batch * nheads would overflow grid y's 65535
    n = tl.load(SEQLENS + tl.program_id(2))  # tokens before the chunk
    # int64 batch and head offsets: q / out / ring can pass 2^31 elements (b * stride alone overflows int32).
    b = tl.program_id(2).to(tl.int64)
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows t of the chunk
    row_ok = rows < chunk
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(Q + b * stride_qb + rows[:, None].to(tl.int64) * stride_qs + h * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    pos_q = n + rows

    lo = tl.maximum(n + pid_m * BLOCK_M - window + 1, 0)
    hi = n + tl.minimum(pid_m * BLOCK_M + BLOCK_M, chunk)  # exclusive
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos_k = start + tl.arange(0, BLOCK_N)
        key_ok = pos_k < hi
        from_chunk = pos_k >= n
        chunk_mask = (key_ok & from_chunk)[:, None] & dim_ok[None, :]
        ring_mask = (key_ok & ~from_chunk)[:, None] & dim_ok[None, :]
        crow = (pos_k - n)[:, None]
        slot = (pos_k % window)[:, None]  # the ring wrap-around
        k = tl.load(K + b * stride_kb + crow * stride_ks + hk * stride_kh + dims[None, :], mask=chunk_mask, other=0.0)
        k += tl.load(K_RING + b * stride_rb + slot * stride_rs + hk * stride_rh + dims[None, :], mask=ring_mask,
                     other=0.0)
        v = tl.load(V + b * stride_vb + crow * stride_vs + hk * stride_vh + dims[None, :], mask=chunk_mask, other=0.0)
        v += tl.load(V_RING + b * stride_rb + slot * stride_rs + hk * stride_rh + dims[None, :], mask=ring_mask,
                     other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_SOFTCAP:
            # tanh(x) = 2 sigmoid(2x) - 1, portable across Triton versions; below |x| = 1/8 its series (error < 2e-9
            # relative), where 2 sigmoid(2x) - 1 cancels (a cap far above the scores made them 0)
            x = s / softcap
            x2 = x * x
            series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
            s = softcap * tl.where(tl.abs(x) < 0.125, series, 2.0 * tl.sigmoid(2.0 * x) - 1.0)
        s = s * 1.4426950408889634
        visible = (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] > pos_q[:, None] - window) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * stride_ob + rows[:, None].to(tl.int64) * stride_os + h * stride_oh + dims[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton_op("llmkernels::rolling_window_attn_triton", mutates_args=())
def rolling_window_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    seqlens: torch.Tensor,
    softmax_scale: float,
    softcap: float,
) -> torch.Tensor:
    """q: (batch, S, nheads, d); k, v: (batch, S, nheads_k, d); k_ring, v_ring: (batch, W, nheads_k, d)
    contiguous; seqlens: (batch,) int32. Returns (batch, S, nheads, d); semantics of rolling_window_attn."""
    batch, chunk, nheads, head_dim = q.shape
    nheads_k, window = k.shape[2], k_ring.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = block_d > 128 or q.dtype == torch.float32  # keep the Q, K, V tiles within shared memory
    block_m = 16 if chunk <= 16 else (32 if wide else 64)
    block_n = 32 if q.device.type == "cpu" or wide else 64
    grid = (triton.cdiv(chunk, block_m), nheads, batch)
    launch(_rolling_attn_kernel, grid,
        q, k, v, k_ring, v_ring, out, seqlens,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        chunk, nheads, nheads // nheads_k, window, head_dim, softmax_scale, softcap,
        HAS_SOFTCAP=softcap > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
        # fp32 tiles are twice as large: no software pipelining keeps them within shared memory
        # (checked by compiling for sm_90: at most 96 KiB at head_dim 256).
        num_stages=1 if q.dtype == torch.float32 else 2,
    )
    return out


# Explicit fake: triton_op would otherwise trace the Python above with FakeTensors, which the CPU
# interpreter cannot launch (it copies tensor storages).
@rolling_window_attn_triton.register_fake
def _(q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap):
    return q.new_empty(q.shape)
