// GQA-sharing split-KV decode for flash_attn_with_kvcache (LLMKERNELS_DECODE_KERNEL=gqa).
//
// Math and masking are the forward kernel's (flash_fwd_kernel.cuh design note): packed row r of KV head kh is
// query i = r / group of head kh * group + r % group; it sees keys j in [lo_i, hi_i), the band of Band cut to
// the row's cache length sk = min(cache_seqlens[b] + seqlen_new, seqlen_k). Scores are in log2 units.
//
// Why a second kernel: decode reads each row's whole KV cache once and does ~1 flop per byte, so it is bound
// by memory bandwidth. The forward kernel already reads K/V once per KV head (it packs the group's heads into
// its rows), but serves decode with 64-row tensor-core tiles of which 4 rows are real (32 query / 8 KV heads,
// one token): one warp computes while three only copy, one 64-key tile in flight behind a barrier, 85 KB of
// shared memory (2 blocks an SM, so batch 64's 512 blocks run in two waves): 65% of copy bandwidth at batch
// 64, 4k context. Here a 128-thread block serves kDecodeRowsPerBlock packed rows of one (batch row, KV head,
// split) on CUDA cores:
// * K/V tiles of kBlockN keys (8 KB each of K and V, any head dim) stream through a kStages-deep cp.async
//   pipeline in shared memory, so two tiles (32 KB) a block are in flight while one is used, 128 KB an SM
//   at 4 blocks: well above what the ~2.9 TB/s x ~1 us latency needs. One barrier per tile.
// * A key row of the head-dim bucket D is read from shared memory by kLanes = D / 8 lanes, 16 bytes each; a
//   group of kLanes lanes takes keys group, group + kGroups, ... of the tile (conflict-free: a warp reads
//   consecutive rows). Dot products are reduced by shuffles within the group.
// * Online softmax per (group, row): m, l and 8 fp32 accumulators a lane, rescaled only when some group of
//   the warp raised a maximum. Groups merge by shuffles, warps through shared memory (reusing the pipeline's).
// * Splits: each block's key range [min lo, max hi) is cut into num_splits equal parts (chosen on the host so
//   one wave of 4 blocks an SM fills the GPU); partials are normalised, with their log2-sum-exp, and
//   flash_decode_combine_kernel merges them. Batch 64 x 8 KV heads (512 blocks) runs unsplit.
// Padded head-dim columns and keys past a split's end are zero-filled by cp.async (src-size 0), so the NaN a
// cache may hold past its length is never read.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "attention/cuda/flash_decode.h"
#include "attention/cuda/flash_utils.cuh"

namespace llmk::flash {

template <int D>
struct DecodeTraits {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = kDecodeRowsPerBlock;
  static constexpr int kLanes = D / 8;             // lanes reading one key row
  static constexpr int kGroups = kThreads / kLanes;  // key rows the block reads at once
  static constexpr int kBlockN = 4096 / D;          // keys a tile: 8 KB of K and 8 KB of V
  static constexpr int kKeysPerGroup = kBlockN / kGroups;  // 4 for every bucket
  static constexpr int kStages = 3;
  static constexpr int kChunksPerThread = kBlockN * D / 8 / kThreads;  // 16-byte copies of K (and V) a tile
  static constexpr int kTileElems = kBlockN * D;
  static constexpr int kPipeBytes = kStages * 2 * kTileElems * 2;  // fp16/bf16
  static constexpr int kSmemBytes = kPipeBytes + kRows * D * 4;    // + q as fp32
  static_assert(32 % kLanes == 0 && kLanes >= 4, "head-dim bucket must be 32, 64, 128 or 256");
  static_assert(kKeysPerGroup * kGroups == kBlockN && kChunksPerThread * kThreads * 8 == kTileElems, "tiling");
  static_assert(kWarps * kRows * D * 4 <= kPipeBytes, "the warp merge reuses the pipeline's shared memory");
};

// exp2(m - m_new) as the weight of a softmax state with maximum m in one with maximum m_new >= m; 0 for an
// empty state (m = -inf), also when both are empty (where m - m_new would be NaN).
__device__ __forceinline__ float decode_rescale(float m, float m_new) {
  return m == -INFINITY ? 0.f : exp2f(m - m_new);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = TypeTraits<T>::unpack(w[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeTraits<D>::kThreads, kDecodeBlocksPerSm)
    flash_decode_gqa_kernel(const __grid_constant__ FwdParams p) {
  using Tr = DecodeTraits<D>;
  constexpr int kH = Tr::kRows, BN = Tr::kBlockN, KPG = Tr::kKeysPerGroup, NG = Tr::kGroups, L = Tr::kLanes;
  constexpr int kStages = Tr::kStages, kWarps = Tr::kWarps;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);                               // [kStages][BN][D]
  T* sV = sK + kStages * Tr::kTileElems;                                // [kStages][BN][D]
  float* s_q = reinterpret_cast<float*>(smem_raw + Tr::kPipeBytes);     // [kH][D], see below
  float* s_acc = reinterpret_cast<float*>(smem_raw);                    // [kWarps][kH][D], after the loop
  __shared__ float s_m[kWarps][kH], s_l[kWarps][kH];

  // blockIdx.x = (b * nheads_k + kh) * tiles + tile; blockIdx.y = split.
  const int group = p.group, sq = p.seqlen_q, d = p.headdim;
  const int packed = sq * group;
  const int tiles = ceil_div(packed, kH);
  int prog = blockIdx.x;
  const int tile = prog % tiles;
  prog /= tiles;
  const int kh = prog % p.nheads_k;
  const int b = prog / p.nheads_k;
  const int split = blockIdx.y;
  const int r0 = tile * kH;
  const int nh = min(kH, packed - r0);

  int sk = p.seqlen_k;
  if (p.cache_seqlens != nullptr) sk = max(0, min(p.cache_seqlens[b] + p.seqlen_new, p.seqlen_k));
  const int shift = sk - sq;

  // Each row's visible keys [lo, hi) (rows past nh: none), the block's range, then this split's part of it.
  int lo[kH], hi[kH];
  int n_lo = sk, n_hi = 0;
#pragma unroll
  for (int g = 0; g < kH; ++g) {
    lo[g] = 0;
    hi[g] = 0;
    if (g < nh) {
      const int i = (r0 + g) / group;
      lo[g] = p.window_left >= 0 ? max(0, i + shift - p.window_left) : 0;
      // window_right is capped at sq (i + shift + sq + 1 > sk: unbounded anyway) so that the sum stays in int32
      // whatever the host passes (it folds bounds >= seqlen_q into -1 now: attention_window.h; a guard, not a need).
      hi[g] = p.window_right >= 0 ? min(sk, i + shift + min(p.window_right, sq) + 1) : sk;
      if (lo[g] < hi[g]) {
        n_lo = min(n_lo, lo[g]);
        n_hi = max(n_hi, hi[g]);
      }
    }
  }
  const int range = max(0, n_hi - n_lo);
  const int per_split = ceil_div(range, p.num_splits);
  const int key_begin = n_lo + split * per_split;
  const int key_end = min(n_hi, key_begin + per_split);  // <= key_begin: an empty split
#pragma unroll
  for (int g = 0; g < kH; ++g) {
    lo[g] = max(lo[g], key_begin);
    hi[g] = min(hi[g], key_end);
  }
  const int ntiles = key_end > key_begin ? ceil_div(key_end - key_begin, BN) : 0;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kgroup = warp * (32 / L) + lane / L;  // this lane's key group
  const int d0 = (lane % L) * 8;                  // its 8 dims

  const T* k_base = static_cast<const T*>(p.k) + b * p.k_batch_stride + kh * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_batch_stride + kh * p.v_head_stride;
  // Tile t (keys key_begin + t * BN ..) into stage st: chunk c of row r is thread (r * D / 8 + c) % kThreads's,
  // so consecutive threads copy consecutive 16 bytes of a row. Rows past key_end and columns past d read nothing.
  auto load_tile = [&](int t, int st) {
    const int n0 = key_begin + t * BN;
#pragma unroll
    for (int c = 0; c < Tr::kChunksPerThread; ++c) {
      const int idx = tid + c * Tr::kThreads;
      const int r = idx / (D / 8), col = (idx % (D / 8)) * 8;
      const int j = n0 + r;
      const bool valid = j < key_end && col < d;
      const int64_t kofs = valid ? j * p.k_row_stride + col : 0;
      const int64_t vofs = valid ? j * p.v_row_stride + col : 0;
      cp_async_16(sK + st * Tr::kTileElems + r * D + col, k_base + kofs, valid);
      cp_async_16(sV + st * Tr::kTileElems + r * D + col, v_base + vofs, valid);
    }
  };

  // Start the pipeline before q is staged: its loads then overlap q's.
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ntiles) load_tile(st, st);
    cp_async_commit();
  }

  // q, pre-scaled so that a dot product is the score in log2 units (or tanh's argument with a softcap), as
  // fp32 in shared memory; dims 8i..8i+3 of a row at 4i, 8i+4..8i+7 at D / 2 + 4i, so that the lanes of a
  // group read consecutive 16-byte words. Rows past nh get q = 0 (and no visible key).
  const bool capped = p.softcap > 0.f;
  const float q_scale = capped ? p.softcap_inner : p.scale_log2;
  const float cap_log2 = p.softcap * kLog2e;
  for (int idx = tid; idx < kH * D; idx += Tr::kThreads) {
    const int g = idx / D, c = idx % D;
    float x = 0.f;
    if (g < nh && c < d) {
      const int r = r0 + g, i = r / group, h = kh * group + r % group;
      x = to_float(static_cast<const T*>(p.q)[b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride + c]);
    }
    s_q[g * D + (c & 4 ? D / 2 : 0) + (c >> 3) * 4 + (c & 3)] = x * q_scale;
  }

  float acc[kH][8], m[kH], l[kH];
#pragma unroll
  for (int g = 0; g < kH; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  for (int t = 0; t < ntiles; ++t) {
    // Tile t has landed (the groups committed after it may still be in flight); the barrier also makes the
    // stage read in iteration t - 1 free for the copy issued next, and s_q visible.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1, (t + kStages - 1) % kStages);
    cp_async_commit();  // also when empty, so that the wait above counts tiles

    const T* sKs = sK + (t % kStages) * Tr::kTileElems;
    const T* sVs = sV + (t % kStages) * Tr::kTileElems;
    const int n0 = key_begin + t * BN;

    // Scores of this group's keys kk (tile row kk * NG + kgroup) for each row g, summed over the group's lanes.
    float s[KPG][kH];
    uint4 kraw[KPG];
#pragma unroll
    for (int kk = 0; kk < KPG; ++kk)
      kraw[kk] = *reinterpret_cast<const uint4*>(sKs + (kk * NG + kgroup) * D + d0);
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      const float4 qa = *reinterpret_cast<const float4*>(s_q + g * D + d0 / 2);
      const float4 qb = *reinterpret_cast<const float4*>(s_q + g * D + D / 2 + d0 / 2);
      const float qf[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
      for (int kk = 0; kk < KPG; ++kk) {
        float kf[8];
        unpack8<T>(kraw[kk], kf);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qf[e], kf[e], dot);
        s[kk][g] = dot;
      }
    }
#pragma unroll
    for (int off = L / 2; off >= 1; off /= 2) {
#pragma unroll
      for (int kk = 0; kk < KPG; ++kk) {
#pragma unroll
        for (int g = 0; g < kH; ++g) s[kk][g] += __shfl_xor_sync(0xffffffffu, s[kk][g], off);
      }
    }
    if (capped) {
#pragma unroll
      for (int kk = 0; kk < KPG; ++kk) {
#pragma unroll
        for (int g = 0; g < kH; ++g) s[kk][g] = cap_log2 * tanhf(s[kk][g]);
      }
    }

    // Online softmax; a key is valid for row g inside [lo[g], hi[g]) (zero-filled rows past key_end are not).
    float pr[KPG][kH];
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      bool valid[KPG];
      float m_new = m[g];
#pragma unroll
      for (int kk = 0; kk < KPG; ++kk) {
        const int j = n0 + kk * NG + kgroup;
        valid[kk] = j >= lo[g] && j < hi[g];
        if (valid[kk]) m_new = fmaxf(m_new, s[kk][g]);
      }
      // Rescale only when some group of the warp raised its maximum (rare after the first keys; skipping a
      // multiply by exp2(0) = 1 is exact). m = -inf (no key yet) rescales by 0.
      if (__any_sync(0xffffffffu, m_new > m[g])) {
        const float corr = decode_rescale(m[g], m_new);
        l[g] *= corr;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
        m[g] = m_new;
      }
#pragma unroll
      for (int kk = 0; kk < KPG; ++kk) {
        pr[kk][g] = valid[kk] ? exp2f(s[kk][g] - m_new) : 0.f;
        l[g] += pr[kk][g];
      }
    }
#pragma unroll
    for (int kk = 0; kk < KPG; ++kk) {
      float vf[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(sVs + (kk * NG + kgroup) * D + d0), vf);  // zeros where pr = 0
#pragma unroll
      for (int g = 0; g < kH; ++g) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pr[kk][g], vf[e], acc[g][e]);
      }
    }
  }

  // Merge the groups of a warp (lanes L, 2L, ... apart hold the same dims of other groups).
#pragma unroll
  for (int off = L; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float m_new = fmaxf(m[g], m_o);
      const float c_self = decode_rescale(m[g], m_new), c_o = decode_rescale(m_o, m_new);
      l[g] = l[g] * c_self + l_o * c_o;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * c_self + a_o * c_o;
      }
      m[g] = m_new;
    }
  }
  // Then the warps, through the pipeline's shared memory once every copy has landed and every warp is done.
  cp_async_wait<0>();
  __syncthreads();
  if (lane < L) {
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[(warp * kH + g) * D + d0 + e] = acc[g][e];
    }
  }
  __syncthreads();

  const int64_t rows = int64_t(p.batch) * sq * p.nheads;
  for (int idx = tid; idx < nh * d; idx += Tr::kThreads) {
    const int g = idx / d, c = idx - g * d;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
    float l_all = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float cw = decode_rescale(s_m[w][g], m_all);  // warps with no key add 0
      l_all += s_l[w][g] * cw;
      o += s_acc[(w * kH + g) * D + c] * cw;
    }
    o = l_all > 0.f ? o / l_all : 0.f;  // a row (or split) with no visible key
    const int r = r0 + g, i = r / group, h = kh * group + r % group;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
      out[c] = from_float<T>(o);
    } else {
      const int64_t row = (int64_t(b) * sq + i) * p.nheads + h;
      p.out_accum[(split * rows + row) * D + c] = o;
      if (c == 0) p.lse_accum[split * rows + row] = l_all > 0.f ? m_all + log2f(l_all) : -INFINITY;
    }
  }
}

// Merges the splits of one (b, i, h) row: out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M); a row that no
// split saw (every lse -inf) is written as 0. One warp turns the lse's into weights in shared memory; then the
// 128 threads are D / 4 float4 columns x slices of the splits, each slice summing its splits with independent
// loads (batch 1 has ~64 splits a row), and the slices are added through shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(128) flash_decode_combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr int kThreads = 128, kCols = D / 4, kSlices = kThreads / kCols;
  constexpr int kPerLane = kDecodeMaxSplits / 32;
  __shared__ float s_w[kDecodeMaxSplits];
  __shared__ float s_inv;
  __shared__ float4 s_part[kSlices][kCols];
  const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.nheads;
  const int64_t row = blockIdx.x;
  const int h = row % p.nheads, i = (row / p.nheads) % p.seqlen_q, b = row / p.nheads / p.seqlen_q;
  const int n = p.num_splits;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float lse[kPerLane];
    float lse_max = -INFINITY;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int s = lane + 32 * e;
      lse[e] = s < n ? p.lse_accum[s * rows + row] : -INFINITY;
      lse_max = fmaxf(lse_max, lse[e]);
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, off));
    float denom = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int s = lane + 32 * e;
      const float w = lse[e] == -INFINITY ? 0.f : exp2f(lse[e] - lse_max);  // 0 for an empty split
      if (s < n) s_w[s] = w;
      denom += w;
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) denom += __shfl_xor_sync(0xffffffffu, denom, off);
    if (lane == 0) s_inv = denom > 0.f ? 1.f / denom : 0.f;
  }
  __syncthreads();
  const int col = threadIdx.x % kCols, slice = threadIdx.x / kCols;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = slice; s < n; s += kSlices) {
    const float w = s_w[s];
    const float4 x = *reinterpret_cast<const float4*>(p.out_accum + (s * rows + row) * D + col * 4);
    // An empty split wrote 0 with w = 0; skip the product anyway so that nothing can turn into NaN.
    if (w != 0.f) {
      a.x = fmaf(w, x.x, a.x);
      a.y = fmaf(w, x.y, a.y);
      a.z = fmaf(w, x.z, a.z);
      a.w = fmaf(w, x.w, a.w);
    }
  }
  s_part[slice][col] = a;
  __syncthreads();
  if (threadIdx.x < kCols && col * 4 < p.headdim) {  // headdim % 8 == 0: all 4 columns are < headdim
    float4 o = s_part[0][col];
#pragma unroll
    for (int sl = 1; sl < kSlices; ++sl) {
      const float4 x = s_part[sl][col];
      o.x += x.x;
      o.y += x.y;
      o.z += x.z;
      o.w += x.w;
    }
    const float inv = s_inv;
    T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride + col * 4;
    *reinterpret_cast<uint2*>(out) =
        make_uint2(TypeTraits<T>::pack(o.x * inv, o.y * inv), TypeTraits<T>::pack(o.z * inv, o.w * inv));
  }
}

template <typename T, int D>
void run_flash_decode_gqa(const FwdParams& params, cudaStream_t stream) {
  using Tr = DecodeTraits<D>;
  auto kernel = &flash_decode_gqa_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  // kDecodeBlocksPerSm blocks of ~54 KB need the largest shared-memory carveout: ask rather than rely on the
  // driver's choice (the scan's wide kernel does the same)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  const dim3 grid(static_cast<unsigned>(decode_programs(params)), params.num_splits);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.num_splits > 1) {
    const int64_t rows = int64_t(params.batch) * params.seqlen_q * params.nheads;
    flash_decode_combine_kernel<T, D><<<static_cast<unsigned>(rows), 128, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace llmk::flash
