// Small memory-bound kernels around the flash attention kernels: the split-KV combine, the KV-cache
// append, the backward preprocess (delta = rowsum(dO * O)) and the fp32 -> fp16/bf16 conversion of the
// backward's accumulators. Each is bound by global memory bandwidth; none needs shared memory.
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "attention/cuda/flash.h"
#include "attention/cuda/flash_utils.cuh"

namespace llmk::flash {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

// One warp per output row (b, h, i): lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s
// (lse is stored too when softmax_lse is given).
// Splits that saw no key have lse_s = -inf and weigh 0; a row no split saw is written as 0.
template <typename T>
__global__ void flash_combine_kernel(const __grid_constant__ FwdParams p, int head_dim_padded) {
  using TT = TypeTraits<T>;
  const int sq = p.seqlen_q;
  const int64_t rows = int64_t(p.batch) * p.nheads * sq;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = row % sq, h = (row / sq) % p.nheads, b = row / sq / p.nheads;
  const float* lse_s = p.lse_accum + row;  // split s at lse_s[s * rows]

  float lmax = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) lmax = fmaxf(lmax, lse_s[s * rows]);
  lmax = warp_max(lmax);
  float sum = 0.f;
  if (lmax != -INFINITY)
    for (int s = lane; s < p.num_splits; s += 32) sum += expf(lse_s[s * rows] - lmax);
  sum = warp_sum(sum);
  const float lse = lmax == -INFINITY ? -INFINITY : lmax + logf(sum);
  if (lane == 0 && p.softmax_lse != nullptr) p.softmax_lse[row] = lse;  // same (b, h, i) order

  T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  for (int c = lane * 4; c < p.headdim; c += 128) {  // headdim % 8 == 0: c + 3 < headdim
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lse != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(lse_s[s * rows] - lse);
        if (w == 0.f) continue;  // an empty split (lse_s = -inf)
        const float4 x = *reinterpret_cast<const float4*>(p.out_accum + (s * rows + row) * head_dim_padded + c);
        acc.x += w * x.x;
        acc.y += w * x.y;
        acc.z += w * x.z;
        acc.w += w * x.w;
      }
    }
    *reinterpret_cast<uint2*>(o + c) = make_uint2(TT::pack(acc.x, acc.y), TT::pack(acc.z, acc.w));
  }
}

// grid (seqlen_new, nheads_k, batch): row t of k_new / v_new goes to cache row cache_seqlens[b] + t.
template <typename T>
__global__ void kvcache_append_kernel(const __grid_constant__ AppendParams p) {
  const int t = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int pos = p.cache_seqlens[b] + t;
  if (pos < 0 || pos >= p.max_seqlen) return;
  const T* kn = static_cast<const T*>(p.k_new) + b * p.kn_stride[0] + t * p.kn_stride[1] + kh * p.kn_stride[2];
  const T* vn = static_cast<const T*>(p.v_new) + b * p.vn_stride[0] + t * p.vn_stride[1] + kh * p.vn_stride[2];
  T* kc = static_cast<T*>(p.k_cache) + b * p.kc_stride[0] + pos * p.kc_stride[1] + kh * p.kc_stride[2];
  T* vc = static_cast<T*>(p.v_cache) + b * p.vc_stride[0] + pos * p.vc_stride[1] + kh * p.vc_stride[2];
  for (int c = threadIdx.x * 8; c < p.headdim; c += blockDim.x * 8) {  // 16-byte chunks
    *reinterpret_cast<uint4*>(kc + c) = *reinterpret_cast<const uint4*>(kn + c);
    *reinterpret_cast<uint4*>(vc + c) = *reinterpret_cast<const uint4*>(vn + c);
  }
}

// One warp per (b, i, h) row: delta[b, h, i] = sum_c dout[b, i, h, c] * out[b, i, h, c] in fp32.
template <typename T>
__global__ void flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  using TT = TypeTraits<T>;
  const int sq = p.seqlen_q;
  const int64_t rows = int64_t(p.batch) * sq * p.nheads;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int h = row % p.nheads, i = (row / p.nheads) % sq, b = row / p.nheads / sq;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
  const T* out = static_cast<const T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  float sum = 0.f;
  for (int c = lane * 8; c < p.headdim; c += 256) {
    const uint4 x = *reinterpret_cast<const uint4*>(dout + c);
    const uint4 y = *reinterpret_cast<const uint4*>(out + c);
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 a = TT::unpack(xs[e]), bb = TT::unpack(ys[e]);
      sum += a.x * bb.x + a.y * bb.y;
    }
  }
  sum = warp_sum(sum);
  const int64_t lse_row = (int64_t(b) * p.nheads + h) * sq + i;
  // A gradient reaching lse_i adds P_ij dlse_i to dS_ij: the same as lowering D_i by it.
  if (lane == 0) p.delta[lse_row] = sum - (p.dsoftmax_lse != nullptr ? p.dsoftmax_lse[lse_row] : 0.f);
}

// dst[r, c] = src[r, c] for c < headdim, two elements per thread.
template <typename T>
__global__ void convert_accum_kernel(T* dst, const float* src, int64_t rows, int headdim, int head_dim_padded) {
  using TT = TypeTraits<T>;
  const int half_d = headdim / 2;
  const int64_t n = rows * half_d;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / half_d;
    const int c = int(idx % half_d) * 2;
    const float2 x = *reinterpret_cast<const float2*>(src + r * head_dim_padded + c);
    *reinterpret_cast<uint32_t*>(dst + r * headdim + c) = TT::pack(x.x, x.y);
  }
}

int64_t blocks_for_rows(int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

template <typename T>
void run_flash_combine(const FwdParams& params, int head_dim_padded, cudaStream_t stream) {
  const int64_t rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
  flash_combine_kernel<T><<<blocks_for_rows(rows), kWarpsPerBlock * 32, 0, stream>>>(params, head_dim_padded);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_kvcache_append(const AppendParams& params, cudaStream_t stream) {
  const dim3 grid(params.seqlen_new, params.nheads_k, params.batch);
  kvcache_append_kernel<T><<<grid, 32, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_flash_bwd_preprocess(const BwdParams& params, cudaStream_t stream) {
  const int64_t rows = int64_t(params.batch) * params.seqlen_q * params.nheads;
  flash_bwd_preprocess_kernel<T><<<blocks_for_rows(rows), kWarpsPerBlock * 32, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_convert_accum(T* dst, const float* src, int64_t rows, int headdim, int head_dim_padded,
                       cudaStream_t stream) {
  const int64_t n = rows * (headdim / 2);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  convert_accum_kernel<T><<<blocks, threads, 0, stream>>>(dst, src, rows, headdim, head_dim_padded);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LLMK_INSTANTIATE_AUX(T)                                                                     \
  template void run_flash_combine<T>(const FwdParams&, int, cudaStream_t);                          \
  template void run_kvcache_append<T>(const AppendParams&, cudaStream_t);                           \
  template void run_flash_bwd_preprocess<T>(const BwdParams&, cudaStream_t);                        \
  template void run_convert_accum<T>(T*, const float*, int64_t, int, int, cudaStream_t);

LLMK_INSTANTIATE_AUX(__half)
LLMK_INSTANTIATE_AUX(__nv_bfloat16)

}  // namespace llmk::flash
