// CUDA kernels of the ternary (BitNet b1.58) linear layers.
//
// Packed weights (llmkernels/reference/ternary.py): w (N, k_pad / 4) uint8, k_pad a multiple of 256; byte j of
// 64-byte block b of a row holds weights 256 b + 64 s + j (s = 0..3) at bits 2s as the code w + 1. A lane's
// 16-byte load at byte offset o of a row (o % 16 == 0) thus holds, for each s, the 16 consecutive weights
// k0 + 64 s + (0..15) with k0 = 256 (o / 64) + o % 64; `(word >> 2s) & 0x03030303` then `__vsub4(.., 0x01010101)`
// turns a 32-bit word into four signed bytes {-1, 0, 1}, ready for `__dp4a` against four int8 activations.
//
// Kernels:
// - quantize_rows: one block per token row; absmax (block reduction), then x_q = clamp(rint((x * 127) / s))
//   with IEEE multiply / divide (__fmul_rn / __fdiv_rn, immune to --use_fast_math): bit-identical to the CPU.
// - gemv_a8 / gemv_w2 (decode, up to 16 tokens): one warp per output row, each lane streaming 16-byte chunks
//   of the packed row (kGemvUnroll loads in flight) while the activations (M x k_pad, tiny) come from L1/L2.
//   Bound by the packed weight stream: N * k_pad / 4 bytes, 8x fewer than bf16 F.linear. ternary_linear's
//   8-bit decode uses gemv_a8_decode (ternary_cuda_decode.cuh) instead, which quantises the activations
//   itself; gemv_a8 serves ternary_matmul_int8 and the decode inputs too wide for its shared memory.
// - gemm_a8_mma (prefill, act_bits=8): int8 mma.sync tensor-core GEMM, weights unpacked in shared memory
//   (its own comment below).
// - unpack: packed -> int8 / fp16 / bf16 / fp32 dense weights for cuBLAS: the weight-only prefill (at::matmul)
//   and the optional cuBLASLt int8 path of act_bits=8 (at::_int_mm); N * k_pad bytes written, small next to
//   the 2 * M * N * K operations of a prefill.
// - epilogue: y = acc * row_scale (+ bias) in fp32, row_scale = (s * gamma) / 127 (a8) or gamma (w2).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace llmkernels::ternary_cuda {

constexpr int kWarp = 32;
constexpr int kChunkBytes = 16;                       // one 16-byte load per lane
constexpr int kWarpChunkBytes = kWarp * kChunkBytes;  // 512 packed bytes = 2048 weights per warp step
constexpr int kGemvWarps = 4;                         // output rows per block, one warp each
constexpr int kGemvUnroll = 4;                        // 16-byte loads in flight per lane
constexpr int kMaxGemvTokens = 16;
constexpr uint32_t kZeroWeights = 0x55555555u;        // code 1 in every 2-bit field: weight 0

__device__ __forceinline__ int ternary_bytes(uint32_t packed, int s) {
  // per-byte subtract (no borrow between bytes): codes {0, 1, 2} -> signed bytes {-1, 0, 1}
  return static_cast<int>(__vsub4((packed >> (2 * s)) & 0x03030303u, 0x01010101u));
}

// weight index of the s = 0 weight in byte `o` of a packed row
__device__ __forceinline__ int first_weight_of_byte(int o) { return (o / 64) * 256 + (o % 64); }

// max that keeps a NaN operand (fmaxf drops it): a row holding a NaN must get s = NaN, as the reference's amax.
__device__ __forceinline__ float max_keep_nan(float a, float b) { return a != a ? a : (b != b ? b : fmaxf(a, b)); }

// A row's activation scale from its absmax: the 1e-5 floor, NaN and inf kept (the reference's clamp_min).
__device__ __forceinline__ float act_scale(float amax) { return amax < 1e-5f ? 1e-5f : amax; }

// One x_q element: clamp(rint((x * 127) / s)), in that order and rounding; 0 throughout a row whose s is not
// finite (a NaN or inf in the row: round(x * 127 / s) is 0 or NaN there and NaN casts to 0), so that the row's
// outputs are NaN, as the reference's.
__device__ __forceinline__ float quantize_elem(float x, float s) {
  return isfinite(s) ? fminf(127.f, fmaxf(-128.f, rintf(__fdiv_rn(__fmul_rn(x, 127.f), s)))) : 0.f;
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[32];
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  // every warp reduces the per-warp maxima itself, so no second barrier is needed
  v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_max[lane] : 0.f;
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// x: (m, ldx) rows of K values -> x_q: (m, ldq) int8 with columns K..k_out-1 zeroed, scale: (m,) fp32.
// blockDim.x: a multiple of 32. grid: m blocks.
template <typename scalar_t>
__global__ void quantize_rows_kernel(const scalar_t* __restrict__ x, int64_t ldx, int K, int8_t* __restrict__ x_q,
                                     int64_t ldq, int k_out, float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * ldx;
  float amax = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) amax = max_keep_nan(amax, fabsf(static_cast<float>(xr[k])));
  const float s = act_scale(block_max(amax));
  int8_t* qr = x_q + row * ldq;
  for (int k = threadIdx.x; k < k_out; k += blockDim.x) {
    float q = 0.f;
    if (k < K) q = quantize_elem(static_cast<float>(xr[k]), s);
    qr[k] = static_cast<int8_t>(static_cast<int>(q));
  }
  if (threadIdx.x == 0) scale[row] = s;
}

// One warp: acc[t] = sum_k x_q[t][k] * W_t[n][k] for the packed row wr, t < m, reduced over the warp (every lane
// ends with the totals). x_q: (m, k_pad) int8, global or shared memory, 16-byte aligned rows.
template <int MT>
__device__ __forceinline__ void warp_dot_a8(const int8_t* x_q, int m, const uint8_t* __restrict__ wr, int k_pad,
                                            int lane, int (&acc)[MT]) {
  const int row_bytes = k_pad / 4;
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0;
  for (int base = 0; base < row_bytes; base += kWarpChunkBytes * kGemvUnroll) {
    uint4 wv[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {  // issue every load before using any
      const int o = base + u * kWarpChunkBytes + lane * kChunkBytes;
      wv[u] = o < row_bytes ? __ldcs(reinterpret_cast<const uint4*>(wr + o))
                            : make_uint4(kZeroWeights, kZeroWeights, kZeroWeights, kZeroWeights);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int o = base + u * kWarpChunkBytes + lane * kChunkBytes;
      if (o < row_bytes) {
        const int k0 = first_weight_of_byte(o);
#pragma unroll
        for (int sidx = 0; sidx < 4; ++sidx) {
          const int w0 = ternary_bytes(wv[u].x, sidx), w1 = ternary_bytes(wv[u].y, sidx);
          const int w2 = ternary_bytes(wv[u].z, sidx), w3 = ternary_bytes(wv[u].w, sidx);
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            if (t < m) {  // 16 aligned bytes: k0 + 64 sidx + 15 < k_pad
              const int4 xv = *reinterpret_cast<const int4*>(x_q + static_cast<int64_t>(t) * k_pad + k0 + 64 * sidx);
              acc[t] = __dp4a(w0, xv.x, acc[t]);
              acc[t] = __dp4a(w1, xv.y, acc[t]);
              acc[t] = __dp4a(w2, xv.z, acc[t]);
              acc[t] = __dp4a(w3, xv.w, acc[t]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    for (int o = kWarp / 2; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
  }
}

// out[t][n] for t < m from a warp's reduced accumulators, lane t storing token t (MT <= 16 < 32). OutT int32_t:
// the raw accumulator; otherwise acc * ((s[t] * gamma) / 127) (+ bias[n]) in fp32.
template <int MT, typename OutT>
__device__ __forceinline__ void store_a8(const int (&acc)[MT], int m, int lane, const float* s,
                                         const float* __restrict__ w_scale, const OutT* __restrict__ bias,
                                         OutT* __restrict__ out, int n, int N) {
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t < m && lane == t) {
      if constexpr (std::is_same_v<OutT, int32_t>) {
        out[static_cast<int64_t>(t) * N + n] = acc[t];
      } else {
        const float row_scale = __fdiv_rn(__fmul_rn(s[t], *w_scale), 127.f);
        float y = __fmul_rn(static_cast<float>(acc[t]), row_scale);
        if (bias != nullptr) y = __fadd_rn(y, static_cast<float>(bias[n]));
        out[static_cast<int64_t>(t) * N + n] = static_cast<OutT>(y);
      }
    }
  }
}

// Decode GEMV with 8-bit activations. x_q: (m, k_pad) int8 zero-padded, m <= MT; s: (m,) fp32; w: packed
// (N, k_pad / 4); out: (m, N). OutT int32_t stores the raw accumulators (bias, s, w_scale unused); otherwise
// out = acc * ((s * gamma) / 127) (+ bias). grid: ceil(N / kGemvWarps) blocks of kGemvWarps * 32 threads.
template <int MT, typename OutT>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_a8_kernel(const int8_t* __restrict__ x_q, int m, const float* __restrict__ s,
                   const uint8_t* __restrict__ w, int N, int k_pad, const float* __restrict__ w_scale,
                   const OutT* __restrict__ bias, OutT* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // warp-uniform: the shuffles always see a full warp
  int acc[MT];
  warp_dot_a8<MT>(x_q, m, w + static_cast<int64_t>(n) * (k_pad / 4), k_pad, lane, acc);
  store_a8<MT, OutT>(acc, m, lane, s, w_scale, bias, out, n, N);
}

// Decode GEMV, weight-only. x: (m, k_pad) fp32 zero-padded, m <= MT; out = (x @ W_t^T) * gamma (+ bias).
template <int MT, typename scalar_t>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_w2_kernel(const float* __restrict__ x, int m, const uint8_t* __restrict__ w, int N, int k_pad,
                   const float* __restrict__ w_scale, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // warp-uniform
  // 16 tokens keep 16 accumulators and 16 unpacked weights live: fewer loads in flight, no spills on sm_80
  constexpr int kUnroll = MT >= 16 ? 2 : kGemvUnroll;
  const int row_bytes = k_pad / 4;
  const uint8_t* wr = w + static_cast<int64_t>(n) * row_bytes;
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0.f;

  for (int base = 0; base < row_bytes; base += kWarpChunkBytes * kUnroll) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int o = base + u * kWarpChunkBytes + lane * kChunkBytes;
      wv[u] = o < row_bytes ? __ldcs(reinterpret_cast<const uint4*>(wr + o))
                            : make_uint4(kZeroWeights, kZeroWeights, kZeroWeights, kZeroWeights);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int o = base + u * kWarpChunkBytes + lane * kChunkBytes;
      if (o < row_bytes) {
        const int k0 = first_weight_of_byte(o);
        const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
        for (int sidx = 0; sidx < 4; ++sidx) {
          float wf[16];
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            wf[i] = static_cast<float>(static_cast<int>((words[i / 4] >> (8 * (i % 4) + 2 * sidx)) & 3u) - 1);
          }
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            if (t < m) {
              const float4* xp = reinterpret_cast<const float4*>(x + static_cast<int64_t>(t) * k_pad + k0 + 64 * sidx);
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const float4 xv = xp[q];
                acc[t] = fmaf(wf[4 * q + 0], xv.x, acc[t]);
                acc[t] = fmaf(wf[4 * q + 1], xv.y, acc[t]);
                acc[t] = fmaf(wf[4 * q + 2], xv.z, acc[t]);
                acc[t] = fmaf(wf[4 * q + 3], xv.w, acc[t]);
              }
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    for (int o = kWarp / 2; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
  }
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t < m && lane == t) {
      float y = __fmul_rn(acc[t], *w_scale);
      if (bias != nullptr) y = __fadd_rn(y, static_cast<float>(bias[n]));
      out[static_cast<int64_t>(t) * N + n] = static_cast<scalar_t>(y);
    }
  }
}

// Packed (N, k_pad / 4) -> dense (rows_out, k_pad) of OutT (int8_t or a float type); rows N..rows_out-1 are
// zero weights (the int8 GEMM wants out_features padded to a multiple of 8). One thread per 16 packed bytes.
template <typename OutT>
__global__ void unpack_kernel(const uint8_t* __restrict__ w, int N, int k_pad, int rows_out, OutT* __restrict__ out) {
  const int chunks_per_row = k_pad / 64;  // (k_pad / 4 bytes) / 16
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(rows_out) * chunks_per_row) return;
  const int64_t row = idx / chunks_per_row;
  const int o = static_cast<int>(idx % chunks_per_row) * kChunkBytes;
  const uint4 v = row < N ? *reinterpret_cast<const uint4*>(w + row * (k_pad / 4) + o)
                          : make_uint4(kZeroWeights, kZeroWeights, kZeroWeights, kZeroWeights);
  OutT* dst = out + row * k_pad + first_weight_of_byte(o);
#pragma unroll
  for (int sidx = 0; sidx < 4; ++sidx) {
    if constexpr (std::is_same_v<OutT, int8_t>) {
      const int4 r = make_int4(ternary_bytes(v.x, sidx), ternary_bytes(v.y, sidx), ternary_bytes(v.z, sidx),
                               ternary_bytes(v.w, sidx));
      *reinterpret_cast<int4*>(dst + 64 * sidx) = r;  // 16-byte aligned: k_pad % 256 == 0, offset % 16 == 0
    } else {
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int code = static_cast<int>((words[i / 4] >> (8 * (i % 4) + 2 * sidx)) & 3u);
        dst[64 * sidx + i] = static_cast<OutT>(static_cast<float>(code - 1));
      }
    }
  }
}

// ---- Prefill GEMM on the int8 tensor cores -----------------------------------------------------------
// out (m, N) = x_q (m, k_pad) @ W_t^T with mma.sync.m16n8k32 (s8 x s8 -> s32), then the a8 epilogue (or raw
// int32 when OutT is int32_t). Block tile 64 tokens x 128 outputs x 128 k; 8 warps as 2 (M) x 4 (N), each
// owning 32 x 32 outputs (2 x 4 mma tiles, 32 int32 accumulators a lane). A k-tile is half of a packed block:
// the 64 bytes of block k0 / 256 are read (16-byte loads, L2-resident) and the two bit planes s = 2h, 2h + 1
// (h = (k0 / 128) % 2) are unpacked to int8 in shared memory. The next tile's global loads are issued into
// registers before the current tile's mma loop (one shared buffer, register prefetch). Shared rows are
// padded by 16 bytes (36 words) so the fragment loads of a warp hit 32 distinct banks.
// Bound by the tensor cores for large m (int8 mma.sync: 2x the bf16 rate), by the weight stream for small m.
constexpr int kMmaBM = 64;
constexpr int kMmaBN = 128;
constexpr int kMmaBK = 128;
constexpr int kMmaThreads = 256;
constexpr int kMmaSmemStride = kMmaBK + 16;

__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const int (&a)[4], const int (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // int8 mma.sync needs sm_80+; the host code never launches this below sm_80
#endif
}

// x_q: (m, k_pad) int8 zero-padded; w: packed (N, k_pad / 4); s: (m,); out: (m, N).
// grid: (ceil(N / kMmaBN), ceil(m / kMmaBM)), kMmaThreads threads.
template <typename OutT>
__global__ void __launch_bounds__(kMmaThreads)
    gemm_a8_mma_kernel(const int8_t* __restrict__ x_q, int m, const float* __restrict__ s,
                       const uint8_t* __restrict__ w, int N, int k_pad, const float* __restrict__ w_scale,
                       const OutT* __restrict__ bias, OutT* __restrict__ out) {
  __shared__ __align__(16) int8_t sA[kMmaBM][kMmaSmemStride];  // tokens x k
  __shared__ __align__(16) int8_t sB[kMmaBN][kMmaSmemStride];  // outputs x k (the mma's "col" B operand)
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int group = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const int m0 = blockIdx.y * kMmaBM, n0 = blockIdx.x * kMmaBN;
  const int warp_m = (warp / 4) * 32, warp_n = (warp % 4) * 32;
  const int64_t row_bytes = k_pad / 4;

  int acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

  // Each thread moves 2 of the 512 16-byte chunks of A (64 rows x 128 bytes: row c / 8, byte (c % 8) * 16)
  // and 2 of the 512 chunks of packed B (128 rows x 64 bytes: row c / 4, byte (c % 4) * 16).
  uint4 ra[2], rb[2];
  auto load_tile = [&](int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kMmaThreads;
      const int am = m0 + c / 8;
      ra[i] = am < m ? *reinterpret_cast<const uint4*>(x_q + static_cast<int64_t>(am) * k_pad + k0 + (c % 8) * 16)
                     : make_uint4(0u, 0u, 0u, 0u);
      const int bn = n0 + c / 4;
      rb[i] = bn < N ? __ldg(reinterpret_cast<const uint4*>(w + bn * row_bytes + (k0 / 256) * 64 + (c % 4) * 16))
                     : make_uint4(kZeroWeights, kZeroWeights, kZeroWeights, kZeroWeights);
    }
  };
  auto store_tile = [&](int k0) {
    const int h = (k0 / kMmaBK) % 2;  // which half of the 256-weight block: bit planes s = 2h, 2h + 1
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kMmaThreads;
      *reinterpret_cast<uint4*>(&sA[c / 8][(c % 8) * 16]) = ra[i];
      const int j0 = (c % 4) * 16;  // byte j of the block holds weights 64 s + j of the block
#pragma unroll
      for (int si = 0; si < 2; ++si) {
        const int sp = 2 * h + si;
        *reinterpret_cast<int4*>(&sB[c / 4][64 * si + j0]) =
            make_int4(ternary_bytes(rb[i].x, sp), ternary_bytes(rb[i].y, sp), ternary_bytes(rb[i].z, sp),
                      ternary_bytes(rb[i].w, sp));
      }
    }
  };

  const int k_tiles = k_pad / kMmaBK;  // k_pad % 256 == 0
  load_tile(0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    __syncthreads();  // every warp is done reading the previous tile
    store_tile(kt * kMmaBK);
    __syncthreads();
    if (kt + 1 < k_tiles) load_tile((kt + 1) * kMmaBK);  // in flight during the mma loop
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += 32) {
      int a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = warp_m + mi * 16 + group;
        a[mi][0] = *reinterpret_cast<const int*>(&sA[r][kk + tig * 4]);
        a[mi][1] = *reinterpret_cast<const int*>(&sA[r + 8][kk + tig * 4]);
        a[mi][2] = *reinterpret_cast<const int*>(&sA[r][kk + 16 + tig * 4]);
        a[mi][3] = *reinterpret_cast<const int*>(&sA[r + 8][kk + 16 + tig * 4]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = warp_n + ni * 8 + group;
        b[ni][0] = *reinterpret_cast<const int*>(&sB[col][kk + tig * 4]);
        b[ni][1] = *reinterpret_cast<const int*>(&sB[col][kk + 16 + tig * 4]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_s8_16832(acc[mi][ni], a[mi], b[ni]);
    }
  }

  // accumulator fragment: e = 0, 1 at (group, 2 tig + e), e = 2, 3 at (group + 8, 2 tig + e - 2)
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m + mi * 16 + group + 8 * half;
      if (row >= m) continue;
      float row_scale = 0.f;
      if constexpr (!std::is_same_v<OutT, int32_t>) row_scale = __fdiv_rn(__fmul_rn(s[row], *w_scale), 127.f);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + warp_n + ni * 8 + 2 * tig + e;
          if (n >= N) continue;
          const int v = acc[mi][ni][2 * half + e];
          if constexpr (std::is_same_v<OutT, int32_t>) {
            out[static_cast<int64_t>(row) * N + n] = v;
          } else {
            float y = __fmul_rn(static_cast<float>(v), row_scale);
            if (bias != nullptr) y = __fadd_rn(y, static_cast<float>(bias[n]));
            out[static_cast<int64_t>(row) * N + n] = static_cast<OutT>(y);
          }
        }
      }
    }
  }
}

// out (m, N) = acc (m, ld_acc)[:, :N] * row_scale (+ bias); row_scale = (s[i] * gamma) / 127 when s != nullptr
// (8-bit activations), gamma otherwise. One thread per output element.
template <typename AccT, typename scalar_t>
__global__ void epilogue_kernel(const AccT* __restrict__ acc, int64_t ld_acc, int m, int N,
                                const float* __restrict__ s, const float* __restrict__ w_scale,
                                const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(m) * N) return;
  const int64_t i = idx / N;
  const int n = static_cast<int>(idx % N);
  const float gamma = *w_scale;
  const float row_scale = s != nullptr ? __fdiv_rn(__fmul_rn(s[i], gamma), 127.f) : gamma;
  float y = __fmul_rn(static_cast<float>(acc[i * ld_acc + n]), row_scale);
  if (bias != nullptr) y = __fadd_rn(y, static_cast<float>(bias[n]));
  out[idx] = static_cast<scalar_t>(y);
}

}  // namespace llmkernels::ternary_cuda
