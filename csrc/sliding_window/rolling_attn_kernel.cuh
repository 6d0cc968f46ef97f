// CUDA sliding-window attention of a chunk of queries against a rolling KV buffer (flash-decoding style).
//
// Math: the query at absolute position p = seqlens[b] + t sees keys lo = max(0, p - W + 1) .. p; position j
// is read in place from the chunk when j >= seqlens[b] (row j - seqlens[b]) else from ring slot j % W.
//   out = sum_j softmax_j(s_j) v_j,  s_j = scale * q . k_j  (softcap * tanh(s_j / softcap) if softcap > 0).
// Scores are kept in log2 units (times log2 e) so the exponentials are exp2f.
//
// Bound: decode reads the W keys and values of the window once per KV head: memory bandwidth. So one
// 128-thread block serves a tile of up to kHeadsPerBlock query heads of one KV head (GQA) for one (batch row,
// query row, split of the window): each K/V row is loaded once for all of them (a block per query head re-read
// the ring 4x through L2 at Mistral's 32/8 heads, which held decode at batch 64 to ~38% of copy bandwidth;
// this kernel measured 0.430 ms there, 84%: H100, 32/8 heads, d 128, W 4096, bf16, 2026-11-23).
// A key row of head_dim elements is read by kLanes = kHeadDimMax / 8 lanes with one 16-byte load each, so a
// warp reads 32 / kLanes keys at once and the block kGroups = 128 / kLanes. Each lane group takes
// kKeysPerGroup keys a step; the next step's K/V rows are loaded into a second register buffer before this
// step's math, and the step after next's ring rows are prefetched into L2, so loads stay in flight while the
// shuffles and exponentials run. Each group keeps an online softmax state per head (m, l, 8 fp32
// accumulators per lane), rescaled only in steps where some group of the warp raised its maximum; groups merge
// through shuffles within a warp, then shared memory across warps. With several splits (small batch: too few
// blocks to fill the GPU), each split writes its normalised partial outputs and log-sum-exps and
// rolling_attn_combine_kernel merges them.
//
// Prefill chunks also run here, one query row per block, without tensor cores: correct but compute bound,
// so automatic dispatch sends chunks of 64+ queries to the Triton kernel (llmkernels/ops/sliding_window.py),
// and prefills without a cache belong to flash_attn_func.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sliding_window/rolling_attn.h"

namespace llmkernels::sliding_window {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeysPerGroup = 2;  // keys each lane group loads per step (x2 with the double buffer)
// At most 128 registers a thread, so that 4 blocks (16 warps) fit an SM: at batch 64 the 512 (batch, KV head)
// blocks are then all resident at once (132 SMs) with enough loads in flight to cover the memory latency.
constexpr int kMinBlocksPerSm = 4;
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

// exp2(m - m_new) as the weight of a softmax state with maximum m in one with maximum m_new >= m; 0 for an
// empty state (m = -inf), also when both are empty (where m - m_new would be NaN).
__device__ __forceinline__ float rescale(float m, float m_new) { return m == -INFINITY ? 0.f : exp2f(m - m_new); }

template <typename T, int kHeadDimMax>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) rolling_attn_kernel(const RollingAttnParams p) {
  constexpr int kLanes = kHeadDimMax / 8;             // lanes reading one key row
  constexpr int kGroupsPerWarp = 32 / kLanes;         // keys a warp reads per load
  constexpr int kGroups = kThreads / kLanes;          // keys the block reads per load
  constexpr int kH = kHeadsPerBlock;
  constexpr int kK = kKeysPerGroup;
  constexpr int kStep = kGroups * kK;                 // keys the block covers per loop step
  static_assert(kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0, "head-dim bucket must be 8..256");
  __shared__ float s_m[kWarps][kH], s_l[kWarps][kH];
  __shared__ float s_acc[kWarps][kH][kHeadDimMax];
  __shared__ __align__(16) float s_q[kH][kHeadDimMax];

  // blockIdx.x = ((b * chunk + t) * nheads_k + hk) * head_tiles + tile; the tile's heads are h0 .. h0 + nh - 1.
  const int group_heads = p.nheads / p.nheads_k;
  const int head_tiles = (group_heads + kH - 1) / kH;
  int prog = blockIdx.x;
  const int tile = prog % head_tiles;
  prog /= head_tiles;
  const int hk = prog % p.nheads_k;
  prog /= p.nheads_k;
  const int t = prog % p.chunk;
  const int b = prog / p.chunk;
  const int h0 = hk * group_heads + tile * kH;
  const int nh = min(kH, group_heads - tile * kH);
  const int split = blockIdx.y;
  const int W = p.window;

  const int n = p.seqlens[b];
  const int pos = n + t;
  const int lo = max(0, pos - W + 1);
  const int key_begin = lo + split * p.keys_per_split;                 // absolute positions [key_begin, key_end)
  const int key_end = min(pos + 1, lo + (split + 1) * p.keys_per_split);  // may be empty for a late split
  // Keys [key_begin, ring_end) are in the ring, [ring_end, key_end) in the chunk (ring_end = n when that part is
  // not empty, so chunk row j - n = j - ring_end). Ring key j is in slot j + slot_shift, less W if that is past
  // the ring: j - key_begin < keys_per_split <= W, so no integer division per key.
  const int ring_end = min(key_end, n);
  const int slot_shift = key_begin % W - key_begin;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = warp * kGroupsPerWarp + lane / kLanes;
  const int d0 = (lane % kLanes) * 8;
  const bool active = d0 < p.head_dim;  // head_dim is a multiple of 8, at most kHeadDimMax

  // Addresses with this lane's d0 folded in. A ring slot is ring_row_bytes < 2^31 (checked on the host), so a
  // ring key's address is one 32 x 32 -> 64-bit multiply-add.
  const int ring_row_bytes = p.nheads_k * p.head_dim * static_cast<int>(sizeof(T));
  // Byte offset of this lane's part of slot 0 of row b, the same in k_ring and v_ring.
  const int64_t ring_base = ((static_cast<int64_t>(b) * W * p.nheads_k + hk) * p.head_dim + d0) * sizeof(T);
  const T* k_chunk = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + d0;
  const T* v_chunk = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + d0;

  // q, pre-scaled so that a dot product is the score in log2 units (or tanh's argument with a softcap), lives
  // in shared memory as floats: each step reads it back (2 vector loads a head) instead of holding 32 more
  // registers a thread, which would cost resident blocks. Heads past nh (the last tile of a group of heads)
  // get q = 0 and are never written.
  const bool capped = p.softcap > 0.f;
  const float q_scale = capped ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_log2 = p.softcap * kLog2e;
  // Layout of a head's row: dims 8i..8i+3 at 4i, dims 8i+4..8i+7 at kHeadDimMax / 2 + 4i, so that the lanes of
  // a group read consecutive 16-byte words (no bank conflicts).
  for (int idx = tid; idx < kH * kHeadDimMax; idx += kThreads) {
    const int g = idx / kHeadDimMax;
    const int d = idx % kHeadDimMax;
    float x = 0.f;
    if (g < nh && d < p.head_dim) {
      x = static_cast<float>(static_cast<const T*>(p.q)[b * p.q_sb + t * p.q_ss + (h0 + g) * p.q_sh + d]);
    }
    s_q[g][(d & 4 ? kHeadDimMax / 2 : 0) + (d >> 3) * 4 + (d & 3)] = x * q_scale;
  }
  __syncthreads();

  float acc[kH][8], m[kH], l[kH];
#pragma unroll
  for (int g = 0; g < kH; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  // Key kk of a step at `base` for this group is base + kk * kGroups + group; keys >= key_end load zeros.
  auto load = [&](int base, uint4 (&kraw)[kK], uint4 (&vraw)[kK]) {
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      const int j = base + kk * kGroups + group;
      kraw[kk] = make_uint4(0, 0, 0, 0);
      vraw[kk] = make_uint4(0, 0, 0, 0);
      if (active && j < key_end) {
        const void* krow;
        const void* vrow;
        if (j < ring_end) {  // the ring wrap-around is this index math
          int slot = j + slot_shift;
          if (slot >= W) slot -= W;
          const int64_t off = ring_base + static_cast<int64_t>(slot) * ring_row_bytes;
          krow = static_cast<const char*>(p.k_ring) + off;
          vrow = static_cast<const char*>(p.v_ring) + off;
        } else {
          krow = k_chunk + static_cast<int64_t>(j - ring_end) * p.k_ss;
          vrow = v_chunk + static_cast<int64_t>(j - ring_end) * p.v_ss;
        }
        kraw[kk] = __ldg(static_cast<const uint4*>(krow));
        vraw[kk] = __ldg(static_cast<const uint4*>(vrow));
      }
    }
  };

  // Asks L2 for the ring rows of the step after next: the register double buffer holds one step of loads in
  // flight a warp, about 32 KB an SM at batch 64, which leaves little slack over the memory latency; with the
  // rows already on their way to L2 those loads wait for L2 instead of HBM. Chunk rows (few) are not prefetched.
  auto prefetch = [&](int base) {
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      const int j = base + kk * kGroups + group;
      if (active && j < ring_end) {
        int slot = j + slot_shift;
        if (slot >= W) slot -= W;
        const int64_t off = ring_base + static_cast<int64_t>(slot) * ring_row_bytes;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p.k_ring) + off));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p.v_ring) + off));
      }
    }
  };

  // One step over the keys at `base`, whose K/V rows are in kcur/vcur. Every lane runs every step, keys past
  // key_end included (they weigh 0): the shuffles and votes need the whole warp.
  auto step = [&](int base, const uint4 (&kcur)[kK], const uint4 (&vcur)[kK]) {
    float s[kK][kH];
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      const float4 qa = *reinterpret_cast<const float4*>(&s_q[g][d0 / 2]);  // dims d0 .. d0 + 3
      const float4 qb = *reinterpret_cast<const float4*>(&s_q[g][kHeadDimMax / 2 + d0 / 2]);  // d0 + 4 .. d0 + 7
      const float qf[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        float kf[8];
        Vec8<T>::to_float(kcur[kk], kf);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(qf[i], kf[i], dot);
        s[kk][g] = dot;
      }
    }
#pragma unroll
    for (int off = kLanes / 2; off >= 1; off /= 2) {  // within the group
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
        for (int g = 0; g < kH; ++g) s[kk][g] += __shfl_xor_sync(0xffffffffu, s[kk][g], off);
      }
    }
    if (capped) {
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
        for (int g = 0; g < kH; ++g) s[kk][g] = cap_log2 * tanhf(s[kk][g]);
      }
    }
    bool valid[kK];
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) valid[kk] = base + kk * kGroups + group < key_end;
    float pr[kK][kH];
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        if (valid[kk]) m_new = fmaxf(m_new, s[kk][g]);
      }
      // Rescale only when some group of the warp raised its maximum: after the first keys that is rare, and
      // skipping the multiply by exp2(0) = 1 is exact. m = -inf (a group's first key) rescales by 0.
      if (__any_sync(0xffffffffu, m_new > m[g])) {
        const float corr = rescale(m[g], m_new);  // also right for a group whose maximum did not move
        l[g] *= corr;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
        m[g] = m_new;
      }
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        pr[kk][g] = valid[kk] ? exp2f(s[kk][g] - m_new) : 0.f;  // a group with no key yet has m_new = -inf
        l[g] += pr[kk][g];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      float vf[8];
      Vec8<T>::to_float(vcur[kk], vf);  // zeros past key_end, where pr = 0
#pragma unroll
      for (int g = 0; g < kH; ++g) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr[kk][g], vf[i], acc[g][i]);
      }
    }
  };

  // Double buffer a / b: a step's math runs while the next step's loads are in flight.
  uint4 ka[kK], va[kK], kb[kK], vb[kK];
  load(key_begin, ka, va);
  for (int base = key_begin; base < key_end;) {
    prefetch(base + 2 * kStep);
    load(base + kStep, kb, vb);
    step(base, ka, va);
    base += kStep;
    if (base >= key_end) break;
    prefetch(base + 2 * kStep);
    load(base + kStep, ka, va);
    step(base, kb, vb);
    base += kStep;
  }

  // Merge the groups of a warp (lanes kLanes, 2 kLanes, ... apart hold the same dims of other groups).
#pragma unroll
  for (int off = kLanes; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float m_new = fmaxf(m[g], m_o);
      const float c_self = rescale(m[g], m_new), c_o = rescale(m_o, m_new);
      l[g] = l[g] * c_self + l_o * c_o;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
        acc[g][i] = acc[g][i] * c_self + a_o * c_o;
      }
      m[g] = m_new;
    }
  }
  // Then the warps, through shared memory: the first group of each warp holds its warp's state.
  if (lane < kLanes) {
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
      if (active) {
#pragma unroll
        for (int i = 0; i < 8; ++i) s_acc[warp][g][d0 + i] = acc[g][i];
      }
    }
  }
  __syncthreads();
  const int64_t rows = static_cast<int64_t>(p.batch) * p.chunk * p.nheads;
  for (int idx = tid; idx < nh * p.head_dim; idx += kThreads) {
    const int g = idx / p.head_dim;
    const int d = idx - g * p.head_dim;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
    float l_all = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = rescale(s_m[w][g], m_all);  // warps with no key add 0
      l_all += s_l[w][g] * c;
      o += s_acc[w][g][d] * c;
    }
    o = l_all > 0.f ? o / l_all : 0.f;  // l_all = 0 only for an empty split
    const int h = h0 + g;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_sb + t * p.o_ss + h * p.o_sh;
      out[d] = Vec8<T>::from_float(o);
    } else {
      const int64_t row = (static_cast<int64_t>(b) * p.chunk + t) * p.nheads + h;
      p.out_partial[(split * rows + row) * p.head_dim + d] = o;
      if (d == 0) p.lse_partial[split * rows + row] = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
    }
  }
}

// Merges the splits of one (b, t, h) row: out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M).
// Split 0 always holds the row's oldest key, so at least one lse is finite. One warp turns the (at most
// kMaxSplits) lse's into weights in shared memory, then every thread sums its dims over the splits with
// independent loads (a row at batch 1 has up to 64 splits: a dependent chain of loads would be slow).
template <typename T>
__global__ void __launch_bounds__(kThreads) rolling_attn_combine_kernel(const RollingAttnParams p) {
  constexpr int kPerLane = kMaxSplits / 32;
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_inv;
  const int row = blockIdx.x;
  const int h = row % p.nheads;
  const int t = (row / p.nheads) % p.chunk;
  const int b = row / (p.nheads * p.chunk);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.chunk * p.nheads;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float lse[kPerLane];
    float lse_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int s = lane + 32 * i;
      lse[i] = s < p.num_splits ? p.lse_partial[s * rows + row] : -INFINITY;
      lse_max = fmaxf(lse_max, lse[i]);
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, off));
    float denom = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int s = lane + 32 * i;
      const float w = lse[i] == -INFINITY ? 0.f : exp2f(lse[i] - lse_max);  // 0 for an empty split
      if (s < p.num_splits) s_w[s] = w;
      denom += w;
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) denom += __shfl_xor_sync(0xffffffffu, denom, off);
    if (lane == 0) s_inv = 1.f / denom;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.o_sb + t * p.o_ss + h * p.o_sh;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float o = 0.f;
#pragma unroll 8
    for (int s = 0; s < p.num_splits; ++s) o += s_w[s] * p.out_partial[(s * rows + row) * p.head_dim + d];
    out[d] = Vec8<T>::from_float(o * s_inv);
  }
}

template <typename T, int kHeadDimMax>
void launch_rolling_attn(const RollingAttnParams& p, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.batch) * p.chunk * p.nheads;
  const unsigned programs = static_cast<unsigned>(rolling_attn_programs(p.batch, p.chunk, p.nheads, p.nheads_k));
  rolling_attn_kernel<T, kHeadDimMax><<<dim3(programs, p.num_splits), kThreads, 0, stream>>>(p);
  if (p.num_splits > 1) rolling_attn_combine_kernel<T><<<rows, kThreads, 0, stream>>>(p);
}

}  // namespace llmkernels::sliding_window
