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
//   Bound by the packed weight stream: N * k_pad / 4 bytes, 8x fewer than bf16 F.linear.
// - unpack: packed -> int8 / fp16 / bf16 / fp32 dense weights for the prefill GEMM (tensor cores via
//   cuBLAS(Lt), int8 x int8 -> int32 for act_bits=8); the unpack writes N * k_pad bytes, small next to the
//   2 * M * N * K operations of a prefill.
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

__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[32];
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  // every warp reduces the per-warp maxima itself, so no second barrier is needed
  v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_max[lane] : 0.f;
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
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
  for (int k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(static_cast<float>(xr[k])));
  const float s = fmaxf(block_max(amax), 1e-5f);
  int8_t* qr = x_q + row * ldq;
  for (int k = threadIdx.x; k < k_out; k += blockDim.x) {
    float q = 0.f;
    if (k < K) q = fminf(127.f, fmaxf(-128.f, rintf(__fdiv_rn(__fmul_rn(static_cast<float>(xr[k]), 127.f), s))));
    qr[k] = static_cast<int8_t>(static_cast<int>(q));
  }
  if (threadIdx.x == 0) scale[row] = s;
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
  if (n >= N) return;  // warp-uniform: the shuffles below always see a full warp
  const int row_bytes = k_pad / 4;
  const uint8_t* wr = w + static_cast<int64_t>(n) * row_bytes;
  int acc[MT];
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
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t < m && lane == t) {  // spread the stores over lanes (MT <= 16 < 32)
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

// Decode GEMV, weight-only. x: (m, k_pad) fp32 zero-padded, m <= MT; out = (x @ W_t^T) * gamma (+ bias).
template <int MT, typename scalar_t>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_w2_kernel(const float* __restrict__ x, int m, const uint8_t* __restrict__ w, int N, int k_pad,
                   const float* __restrict__ w_scale, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  if (n >= N) return;  // warp-uniform
  const int row_bytes = k_pad / 4;
  const uint8_t* wr = w + static_cast<int64_t>(n) * row_bytes;
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = 0.f;

  for (int base = 0; base < row_bytes; base += kWarpChunkBytes * kGemvUnroll) {
    uint4 wv[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int o = base + u * kWarpChunkBytes + lane * kChunkBytes;
      wv[u] = o < row_bytes ? __ldcs(reinterpret_cast<const uint4*>(wr + o))
                            : make_uint4(kZeroWeights, kZeroWeights, kZeroWeights, kZeroWeights);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
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
