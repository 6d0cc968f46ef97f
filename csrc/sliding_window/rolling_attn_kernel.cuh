// CUDA sliding-window attention of a chunk of queries against a rolling KV buffer (flash-decoding style).
//
// Math: the query at absolute position p = seqlens[b] + t sees keys lo = max(0, p - W + 1) .. p; position j
// is read in place from the chunk when j >= seqlens[b] (row j - seqlens[b]) else from ring slot j % W.
//   out = sum_j softmax_j(s_j) v_j,  s_j = scale * q . k_j  (softcap * tanh(s_j / softcap) if softcap > 0).
// Scores are kept in log2 units (times log2 e) so the exponentials are exp2f.
//
// Tiling: one 128-thread block per (batch row, query row, query head, split of the window). A key row of
// head_dim elements is read by kLanes = kHeadDimMax / 8 lanes with one 16-byte load each, so a warp reads
// 32 / kLanes keys at once and the block 128 / kLanes ("groups"). Each group keeps its own online softmax
// state (m, l, 8 fp32 accumulators per lane); the groups are merged through shared memory at the end. With
// several splits (small batch: too few blocks to fill the GPU), each split writes its normalised partial
// output and log-sum-exp and rolling_attn_combine_kernel merges them.
//
// Bound: decode reads the W keys and values of the window once per query head (GQA heads re-read the
// same KV rows, from L2): memory bandwidth. Prefill chunks also run here, one query per block, without
// tensor cores: correct but compute bound, so automatic dispatch sends chunks of 64+ queries to the Triton
// kernel (llmkernels/ops/sliding_window.py), and prefills without a cache belong to flash_attn_func.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sliding_window/rolling_attn.h"

namespace llmkernels::sliding_window {

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Vec8;  // 8 elements of T in a 16-byte uint4 <-> 8 floats

template <>
struct Vec8<__half> {
  static __device__ __forceinline__ void to_float(const uint4& u, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Vec8<__nv_bfloat16> {
  static __device__ __forceinline__ void to_float(const uint4& u, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T, int kHeadDimMax>
__global__ void __launch_bounds__(kThreads) rolling_attn_kernel(const RollingAttnParams p) {
  constexpr int kLanes = kHeadDimMax / 8;             // lanes reading one key row
  constexpr int kGroupsPerWarp = 32 / kLanes;         // keys a warp reads per step
  constexpr int kGroups = kThreads / kLanes;          // keys the block reads per step
  static_assert(kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0, "head-dim bucket must be 8..256");
  __shared__ float s_m[kGroups], s_l[kGroups];
  __shared__ float s_acc[kGroups][kHeadDimMax];

  const int row = blockIdx.x;  // flattened (b, t, h)
  const int split = blockIdx.y;
  const int h = row % p.nheads;
  const int t = (row / p.nheads) % p.chunk;
  const int b = row / (p.nheads * p.chunk);
  const int hk = h / (p.nheads / p.nheads_k);
  const int W = p.window;

  const int n = p.seqlens[b];
  const int pos = n + t;
  const int lo = max(0, pos - W + 1);
  const int key_begin = lo + split * p.keys_per_split;                 // absolute positions [key_begin, key_end)
  const int key_end = min(pos + 1, lo + (split + 1) * p.keys_per_split);  // may be empty for a late split

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int group = (tid / 32) * kGroupsPerWarp + lane / kLanes;
  const int sub = lane % kLanes;
  const int d0 = sub * 8;
  const bool active = d0 < p.head_dim;  // head_dim is a multiple of 8, at most kHeadDimMax

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + t * p.q_ss + h * p.q_sh;
  const T* k_chunk = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v_chunk = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int64_t ring_row = static_cast<int64_t>(p.nheads_k) * p.head_dim;  // elements between ring slots
  const T* k_ring = static_cast<const T*>(p.k_ring) + static_cast<int64_t>(b) * W * ring_row + hk * p.head_dim;
  const T* v_ring = static_cast<const T*>(p.v_ring) + static_cast<int64_t>(b) * W * ring_row + hk * p.head_dim;

  float qf[8], acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  if (active) {
    Vec8<T>::to_float(*reinterpret_cast<const uint4*>(q + d0), qf);
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[i] *= p.scale;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;

  // Every lane runs the same number of iterations (the shuffles below need the whole warp). Unrolled twice
  // so the next keys' loads are in flight during this key's shuffle reduction.
#pragma unroll 2
  for (int base = key_begin; base < key_end; base += kGroups) {
    const int j = base + group;
    const bool valid = j < key_end;
    const T* krow = nullptr;
    const T* vrow = nullptr;
    if (valid) {  // the ring wrap-around is this index math
      krow = j >= n ? k_chunk + static_cast<int64_t>(j - n) * p.k_ss : k_ring + static_cast<int64_t>(j % W) * ring_row;
      vrow = j >= n ? v_chunk + static_cast<int64_t>(j - n) * p.v_ss : v_ring + static_cast<int64_t>(j % W) * ring_row;
    }
    uint4 kraw = make_uint4(0, 0, 0, 0), vraw = make_uint4(0, 0, 0, 0);
    if (valid && active) {
      kraw = __ldg(reinterpret_cast<const uint4*>(krow + d0));
      vraw = __ldg(reinterpret_cast<const uint4*>(vrow + d0));
    }
    float kf[8];
    Vec8<T>::to_float(kraw, kf);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(qf[i], kf[i], s);
#pragma unroll
    for (int off = kLanes / 2; off >= 1; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);  // within the group
    if (valid) {
      if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
      s *= kLog2e;
      const float m_new = fmaxf(m, s);
      const float corr = exp2f(m - m_new);  // 0 on a group's first key (m = -inf)
      const float pr = exp2f(s - m_new);
      l = l * corr + pr;
      float vf[8];
      Vec8<T>::to_float(vraw, vf);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(acc[i], corr, pr * vf[i]);
      m = m_new;
    }
  }

  // Merge the groups' softmax states.
  if (sub == 0) {
    s_m[group] = m;
    s_l[group] = l;
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[group][d0 + i] = acc[i];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) m_all = fmaxf(m_all, s_m[g]);
  float l_all = 0.f;
  if (m_all != -INFINITY) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) l_all += s_l[g] * exp2f(s_m[g] - m_all);  // groups with no key add 0
  }
  const float inv_l = l_all > 0.f ? 1.f / l_all : 0.f;  // l_all = 0 only for an empty split
  for (int d = tid; d < p.head_dim; d += kThreads) {
    float o = 0.f;
    if (m_all != -INFINITY) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) o += s_acc[g][d] * exp2f(s_m[g] - m_all);
    }
    o *= inv_l;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_sb + t * p.o_ss + h * p.o_sh;
      out[d] = Vec8<T>::from_float(o);
    } else {
      const int64_t rows = static_cast<int64_t>(p.batch) * p.chunk * p.nheads;
      p.out_partial[(split * rows + row) * p.head_dim + d] = o;
    }
  }
  if (p.num_splits > 1 && tid == 0) {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.chunk * p.nheads;
    p.lse_partial[split * rows + row] = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
  }
}

// Merges the splits of one (b, t, h) row: out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M).
// Split 0 always holds the row's oldest key, so at least one lse is finite.
template <typename T>
__global__ void __launch_bounds__(kThreads) rolling_attn_combine_kernel(const RollingAttnParams p) {
  const int row = blockIdx.x;
  const int h = row % p.nheads;
  const int t = (row / p.nheads) % p.chunk;
  const int b = row / (p.nheads * p.chunk);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.chunk * p.nheads;
  float lse_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) lse_max = fmaxf(lse_max, p.lse_partial[s * rows + row]);
  float denom = 0.f;
  for (int s = 0; s < p.num_splits; ++s) denom += exp2f(p.lse_partial[s * rows + row] - lse_max);
  const float inv = 1.f / denom;
  T* out = static_cast<T*>(p.out) + b * p.o_sb + t * p.o_ss + h * p.o_sh;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = exp2f(p.lse_partial[s * rows + row] - lse_max);  // 0 for an empty split
      if (w > 0.f) o += w * p.out_partial[(s * rows + row) * p.head_dim + d];
    }
    out[d] = Vec8<T>::from_float(o * inv);
  }
}

template <typename T, int kHeadDimMax>
void launch_rolling_attn(const RollingAttnParams& p, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.batch) * p.chunk * p.nheads;
  rolling_attn_kernel<T, kHeadDimMax><<<dim3(rows, p.num_splits), kThreads, 0, stream>>>(p);
  if (p.num_splits > 1) rolling_attn_combine_kernel<T><<<rows, kThreads, 0, stream>>>(p);
}

}  // namespace llmkernels::sliding_window
