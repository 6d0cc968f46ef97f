// Decode GEMV of ternary_linear with 8-bit activations (1..16 tokens): one launch that quantises the tokens
// and streams the packed weights once.
//
// Why it is shaped like this (H100: a 4096x4096 layer is 4 MB of packed weights, ~1.5 us of HBM time, so it is
// latency-bound; 28672x8192 is 58.7 MB, ~21 us, so it is bandwidth-bound). Measured on H100 (2026-11-23, CUDA
// graph replay, bf16 in): 7 us and 30 us (1935 GB/s); cuBLAS bf16 F.linear 16 us and 161 us.
// - the grid is sized to the GPU (kDecodeBlocksPerSm blocks of kDecodeWarps warps per SM), not to N; each warp
//   walks its rows (n, n + all warps, ...) in batches of decode_unroll 16-byte loads a lane, the next batch
//   always in flight while the current one is multiplied: 1-4 KB of weights in flight per warp, whatever
//   k_pad is. Fewer blocks also means fewer blocks re-quantising the same activations.
// - the first batch is loaded before the block quantises the activations, so the first DRAM round trip
//   overlaps the quantisation instead of following it.
// - weights are not turned into {-1, 0, 1}: dp4a multiplies the raw codes {0, 1, 2} (w + 1) with x_q, and the
//   row's sum of x_q (computed once while quantising) is subtracted at the end: sum (c - 1) x = sum c x - sum x.
//   Exact in int32, so the accumulators are bit-identical to the reference; it saves a __vsub4 per word.
// - the quantised activations sit in shared memory with the two 64-weight quarter pairs of every odd 256-weight
//   block swapped (decode_smem_pos): the 8 lanes of one 16-byte LDS phase read 4 pieces of an even block and
//   4 of an odd one, which would otherwise be 256 bytes apart, i.e. on the same banks.
#pragma once

#include "ternary/ternary_cuda_kernels.cuh"

namespace llmkernels::ternary_cuda {

// 32 warps an SM in 2 blocks rather than 4: half the blocks quantising the same activations
constexpr int kDecodeWarps = 16;        // warps per block
constexpr int kDecodeBlocksPerSm = 2;   // grid = min(ceil(N / kDecodeWarps), SMs * this)
constexpr int kDecodeMaxSmemBytes = 40 * 1024;  // m * k_pad limit: below the 48 KB needing no opt-in

// 16-byte loads a lane per batch: 4+ tokens keep more accumulators live (4 tokens with 4 loads spilled)
template <int MT>
constexpr int decode_unroll() {
  return MT >= 4 ? 2 : 4;
}

// shared-memory position of weight index k of a token row (k_pad % 256 == 0: stays inside the row)
__device__ __forceinline__ int decode_smem_pos(int k) { return k ^ (((k >> 8) & 1) << 6); }

__device__ __forceinline__ int block_sum(int v) {
  __shared__ int warp_sum[32];
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_sum[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_sum[lane] : 0;
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Each thread quantises k = threadIdx.x + i * blockDim.x. The loads are batched kQuantBatch at a time and
// unconditional (the index is clamped, the value masked): a guarded load per element in a loop would make
// every thread wait out one L2 round trip per element (32 of them for an 8192-wide token).
constexpr int kQuantBatch = 8;

template <typename scalar_t>
__device__ __forceinline__ float thread_absmax(const scalar_t* __restrict__ xr, int K) {
  const int step = blockDim.x;
  float amax = 0.f;
  for (int k0 = threadIdx.x; k0 < K; k0 += kQuantBatch * step) {
    float v[kQuantBatch];
#pragma unroll
    for (int u = 0; u < kQuantBatch; ++u) v[u] = static_cast<float>(xr[min(k0 + u * step, K - 1)]);
#pragma unroll
    for (int u = 0; u < kQuantBatch; ++u) {
      if (k0 + u * step < K) amax = max_keep_nan(amax, fabsf(v[u]));
    }
  }
  return amax;
}

// x_q of one token row into swizzled shared memory, k_pad wide (zeros from K on), exactly as
// quantize_rows_kernel computes it; returns this thread's sum of its x_q.
template <typename scalar_t>
__device__ __forceinline__ int thread_quantize(const scalar_t* __restrict__ xr, int K, int k_pad, float s,
                                               int8_t* sq) {
  const int step = blockDim.x;
  int qsum = 0;
  for (int k0 = threadIdx.x; k0 < k_pad; k0 += kQuantBatch * step) {
    float v[kQuantBatch];
#pragma unroll
    for (int u = 0; u < kQuantBatch; ++u) v[u] = static_cast<float>(xr[min(k0 + u * step, K - 1)]);
#pragma unroll
    for (int u = 0; u < kQuantBatch; ++u) {
      const int k = k0 + u * step;
      if (k < k_pad) {
        float q = 0.f;
        if (k < K) q = quantize_elem(v[u], s);
        const int qi = static_cast<int>(q);
        sq[decode_smem_pos(k)] = static_cast<int8_t>(qi);
        qsum += qi;
      }
    }
  }
  return qsum;
}

// Batch b of packed row n into v: lane bytes o = b * U * 512 + u * 512 + 16 lane; nothing is read for a row
// n >= N or past the row (those slots are never multiplied).
template <int U>
__device__ __forceinline__ void load_decode_batch(const uint8_t* __restrict__ w, int n, int N, int row_bytes, int b,
                                                  int lane, uint4 (&v)[U]) {
  const uint8_t* wr = w + static_cast<int64_t>(n) * row_bytes;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int o = (b * U + u) * kWarpChunkBytes + lane * kChunkBytes;
    v[u] = n < N && o < row_bytes ? __ldcs(reinterpret_cast<const uint4*>(wr + o)) : make_uint4(0u, 0u, 0u, 0u);
  }
}

// acc[t] += sum over batch b of code * x_q[t] (codes 0..2, not yet minus 1). sxq: swizzled (m, k_pad) int8.
template <int MT, int U>
__device__ __forceinline__ void dot_decode_batch(const int8_t* sxq, int m, int k_pad, int row_bytes, int b, int lane,
                                                 const uint4 (&v)[U], int (&acc)[MT]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int o = (b * U + u) * kWarpChunkBytes + lane * kChunkBytes;
    if (o < row_bytes) {
      // weights k0 + 64 s + (0..15) of block o / 64 sit at decode_smem_pos: quarters s and s ^ 1 swap in odd blocks
      const int k0 = first_weight_of_byte(o);
      const int odd = (o >> 6) & 1;
      const int pos_even = k0 + 64 * odd;       // s = 0 (+ 128 for s = 2)
      const int pos_odd = k0 + 64 - 64 * odd;   // s = 1 (+ 128 for s = 3)
      const uint32_t words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        int c[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) c[i] = static_cast<int>((words[i] >> (2 * s)) & 0x03030303u);  // bytes 0..3
        const int pos = (s % 2 == 0 ? pos_even : pos_odd) + 128 * (s / 2);
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          if (t < m) {
            const int4 xv = *reinterpret_cast<const int4*>(sxq + t * k_pad + pos);
            acc[t] = __dp4a(c[0], xv.x, acc[t]);
            acc[t] = __dp4a(c[1], xv.y, acc[t]);
            acc[t] = __dp4a(c[2], xv.z, acc[t]);
            acc[t] = __dp4a(c[3], xv.w, acc[t]);
          }
        }
      }
    }
  }
}

// x: (m, K) contiguous, 1 <= m <= MT; w: packed (N, k_pad / 4), 16-byte aligned; out: (m, N) =
// acc * ((s * gamma) / 127) (+ bias), x_q and s exactly as quantize_rows_kernel makes them.
// grid: any number of blocks (see kDecodeBlocksPerSm) of kDecodeWarps * 32 threads; dynamic shared memory
// m * k_pad bytes (16-byte aligned, k_pad % 256 == 0).
template <int MT, typename scalar_t>
__global__ void __launch_bounds__(kDecodeWarps* kWarp)
    gemv_a8_decode_kernel(const scalar_t* __restrict__ x, int m, int K, const uint8_t* __restrict__ w, int N,
                          int k_pad, const float* __restrict__ w_scale, const scalar_t* __restrict__ bias,
                          scalar_t* __restrict__ out) {
  constexpr int U = decode_unroll<MT>();
  extern __shared__ int4 decode_smem[];  // int4: 16-byte aligned rows for the int4 activation loads
  int8_t* sxq = reinterpret_cast<int8_t*>(decode_smem);
  __shared__ float s_tok[MT];
  __shared__ int sum_tok[MT];
  const int lane = threadIdx.x % kWarp;
  const int row_bytes = k_pad / 4;
  const int batches = (row_bytes + U * kWarpChunkBytes - 1) / (U * kWarpChunkBytes);
  const int row_stride = gridDim.x * kDecodeWarps;
  int n = blockIdx.x * kDecodeWarps + threadIdx.x / kWarp;  // this warp's first row; may be >= N (then idle)
  int b = 0;
  uint4 cur[U];
  load_decode_batch<U>(w, n, N, row_bytes, 0, lane, cur);  // in flight while the block quantises

  // Every warp takes part (the block reductions have barriers), idle ones too.
  for (int t = 0; t < m; ++t) {
    const scalar_t* xr = x + static_cast<int64_t>(t) * K;
    const float st = act_scale(block_max(thread_absmax(xr, K)));
    int qsum = thread_quantize(xr, K, k_pad, st, sxq + t * k_pad);
    // block_sum's barrier also orders this token's block_max scratch reads before the next token's writes,
    // and its own scratch reads before the next token's block_max barrier
    qsum = block_sum(qsum);
    if (threadIdx.x == 0) {
      s_tok[t] = st;
      sum_tok[t] = qsum;
    }
  }
  __syncthreads();  // publishes sxq, s_tok, sum_tok; no barrier follows, so warps may now leave independently

  int acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0;
  while (n < N) {  // warp-uniform
    int next_n = n, next_b = b + 1;
    if (next_b == batches) {
      next_b = 0;
      next_n += row_stride;
    }
    uint4 nxt[U];
    load_decode_batch<U>(w, next_n, N, row_bytes, next_b, lane, nxt);  // before this batch's arithmetic
    dot_decode_batch<MT, U>(sxq, m, k_pad, row_bytes, b, lane, cur, acc);
    if (next_b == 0) {  // row n done
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        for (int o = kWarp / 2; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
        acc[t] -= t < m ? sum_tok[t] : 0;  // codes were w + 1
      }
      store_a8<MT, scalar_t>(acc, m, lane, s_tok, w_scale, bias, out, n, N);
#pragma unroll
      for (int t = 0; t < MT; ++t) acc[t] = 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = nxt[u];
    n = next_n;
    b = next_b;
  }
}

}  // namespace llmkernels::ternary_cuda
