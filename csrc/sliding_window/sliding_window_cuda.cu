// CUDA host code of rolling_window_attn and rolling_cache_append, and the append kernel.
//
// rolling_window_attn picks a head-dim bucket (32/64/128/256) and a split of the window so that small
// batches still fill the GPU (flash-decoding), then launches rolling_attn_kernel (rolling_attn_kernel.cuh),
// one block per (batch row, query row, KV head, tile of up to 4 of its query heads, split).
// rolling_cache_append copies the chunk's last min(S, W) tokens into the ring slots (seqlens[b] + t) % W:
// one thread per 16-byte piece, a pure copy bound by memory bandwidth. seqlens stays on the device: no
// host synchronisation anywhere.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "sliding_window/rolling_attn.h"
#include "sliding_window/sliding_window_common.h"

namespace llmkernels::sliding_window {
namespace {

// 16-byte vector access needs a 16-byte aligned base and row strides that are multiples of 16 bytes.
void check_vector_aligned(const char* op, const char* name, const at::Tensor& t) {
  const int64_t es = t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
                       (t.stride(1) * es) % 16 == 0 && (t.stride(2) * es) % 16 == 0;
  LLMK_CHECK_ARG(aligned, op, name, "must be 16-byte aligned with 16-byte multiple strides on CUDA "
                 "(call .contiguous()), got strides ", t.strides());
}

void check_cuda_dims(const char* op, const at::Tensor& k, const Dims& d) {
  LLMK_CHECK_ARG(k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16, op, "k",
                 "must be float16 or bfloat16 on CUDA, got ", k.scalar_type());
  LLMK_CHECK_ARG(d.head_dim % 8 == 0 && d.head_dim <= 256, op, "k",
                 "must have head_dim a multiple of 8 up to 256 on CUDA, got ", d.head_dim);
  LLMK_CHECK_ARG(d.window < (1 << 30), op, "k_ring", "window too large: ", d.window);
  // The kernel addresses a ring slot with a 32-bit row size in bytes.
  LLMK_CHECK_ARG(d.nheads_k * d.head_dim * 2 < (1LL << 31), op, "k_ring", "has too many KV heads (",
                 d.nheads_k, " of ", d.head_dim, ") for the CUDA kernel");
}

template <typename T>
void launch_for_head_dim(const RollingAttnParams& p, cudaStream_t stream) {
  if (p.head_dim <= 32) {
    launch_rolling_attn<T, 32>(p, stream);
  } else if (p.head_dim <= 64) {
    launch_rolling_attn<T, 64>(p, stream);
  } else if (p.head_dim <= 128) {
    launch_rolling_attn<T, 128>(p, stream);
  } else {
    launch_rolling_attn<T, 256>(p, stream);
  }
}

// Splits of each row's window. A block serves one (batch row, query row, KV head, tile of kHeadsPerBlock query
// heads); kMinResidentBlocks of them fit an SM (128 threads at <= 128 registers, see rolling_attn_kernel.cuh).
// When the programs cannot fill the GPU once (small batches), the window is split so that all blocks are
// still resident in one wave (no partial second wave), keeping >= 64 keys per split. Batch 64 at 8 KV heads
// (512 programs) runs unsplit: splitting would only add the combine pass.
constexpr int64_t kMinResidentBlocks = 4;

int choose_num_splits(int64_t programs, int window, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t resident = kMinResidentBlocks * sms;
  if (programs >= resident / 2) return 1;
  const int64_t want = resident / programs;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, (window + 63) / 64));
  return static_cast<int>(std::clamp<int64_t>(want, 1, most));
}

at::Tensor rolling_window_attn_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& k_ring, const at::Tensor& v_ring, const at::Tensor& seqlens,
                                    double softmax_scale, double softcap) {
  constexpr const char* op = "rolling_window_attn";
  const Dims dims = check_attn_args(op, q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap, c10::DeviceType::CUDA);
  check_cuda_dims(op, k, dims);
  check_vector_aligned(op, "q", q);
  check_vector_aligned(op, "k", k);
  check_vector_aligned(op, "v", v);
  check_vector_aligned(op, "k_ring", k_ring);
  check_vector_aligned(op, "v_ring", v_ring);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous; every element written by the kernels

  const int64_t rows = dims.batch * dims.chunk * dims.nheads;
  LLMK_CHECK_ARG(rows < (1LL << 31), op, "q", "has too many (batch, seqlen, head) rows for one launch: ", rows);
  RollingAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_ring = k_ring.data_ptr();
  p.v_ring = v_ring.data_ptr();
  p.out = out.data_ptr();
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_ss = out.stride(1), p.o_sh = out.stride(2);
  p.batch = static_cast<int>(dims.batch);
  p.chunk = static_cast<int>(dims.chunk);
  p.nheads = static_cast<int>(dims.nheads);
  p.nheads_k = static_cast<int>(dims.nheads_k);
  p.head_dim = static_cast<int>(dims.head_dim);
  p.window = static_cast<int>(dims.window);
  p.scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  if (rows == 0) return out;

  const int64_t programs = rolling_attn_programs(dims.batch, dims.chunk, dims.nheads, dims.nheads_k);
  int splits = choose_num_splits(programs, p.window, q.get_device());
  p.keys_per_split = (p.window + splits - 1) / splits;
  splits = (p.window + p.keys_per_split - 1) / p.keys_per_split;  // no split that is empty for every row
  p.num_splits = splits;
  at::Tensor out_partial, lse_partial;
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_partial = at::empty({splits, rows, dims.head_dim}, f32);
    lse_partial = at::empty({splits, rows}, f32);
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kHalf) {
    launch_for_head_dim<__half>(p, stream);
  } else {
    launch_for_head_dim<__nv_bfloat16>(p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// One thread per 16-byte piece of the (batch, count, nheads_k, row bytes / 16) tokens being written; any dtype.
__global__ void rolling_cache_append_kernel(uint4* k_ring, uint4* v_ring, const char* k, const char* v,
                                            const int32_t* seqlens, int64_t k_sb, int64_t k_ss, int64_t k_sh,
                                            int64_t v_sb, int64_t v_ss, int64_t v_sh, int first, int count,
                                            int nheads_k, int vecs_per_row, int window, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int vec = static_cast<int>(i % vecs_per_row);
  const int h = static_cast<int>((i / vecs_per_row) % nheads_k);
  const int tt = static_cast<int>((i / (static_cast<int64_t>(vecs_per_row) * nheads_k)) % count);
  const int b = static_cast<int>(i / (static_cast<int64_t>(vecs_per_row) * nheads_k * count));
  const int t = first + tt;
  // seqlens stays on the device, so the host cannot refuse a negative length as the CPU op does: a negative
  // slot would write before the row (and seqlens + t could wrap in int). Such a row is left untouched.
  const int64_t n = seqlens[b];
  if (n < 0) return;
  const int slot = static_cast<int>((n + t) % window);
  const int64_t dst = ((static_cast<int64_t>(b) * window + slot) * nheads_k + h) * vecs_per_row + vec;
  // Strides are in bytes here; each source row is 16-byte aligned (checked on the host).
  k_ring[dst] = *reinterpret_cast<const uint4*>(k + b * k_sb + t * k_ss + h * k_sh + vec * 16);
  v_ring[dst] = *reinterpret_cast<const uint4*>(v + b * v_sb + t * v_ss + h * v_sh + vec * 16);
}

void rolling_cache_append_cuda(at::Tensor& k_ring, at::Tensor& v_ring, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& seqlens) {
  constexpr const char* op = "rolling_cache_append";
  const Dims dims = check_chunk_and_ring(op, k, v, k_ring, v_ring, seqlens, c10::DeviceType::CUDA);
  const int64_t row_bytes = dims.head_dim * k.element_size();
  LLMK_CHECK_ARG(row_bytes % 16 == 0, op, "k", "must have rows of a multiple of 16 bytes on CUDA (head_dim ",
                 dims.head_dim, " of ", k.scalar_type(), ")");
  check_vector_aligned(op, "k", k);
  check_vector_aligned(op, "v", v);
  check_vector_aligned(op, "k_ring", k_ring);
  check_vector_aligned(op, "v_ring", v_ring);
  const c10::cuda::CUDAGuard guard(k.device());
  const int first = static_cast<int>(std::max<int64_t>(0, dims.chunk - dims.window));
  const int count = static_cast<int>(dims.chunk - first);
  const int vecs_per_row = static_cast<int>(row_bytes / 16);
  const int64_t total = dims.batch * count * dims.nheads_k * vecs_per_row;
  if (total == 0) return;
  const int64_t es = k.element_size();
  constexpr int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  rolling_cache_append_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint4*>(k_ring.data_ptr()), reinterpret_cast<uint4*>(v_ring.data_ptr()),
      static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr()), seqlens.data_ptr<int32_t>(),
      k.stride(0) * es, k.stride(1) * es, k.stride(2) * es, v.stride(0) * es, v.stride(1) * es, v.stride(2) * es,
      first, count, static_cast<int>(dims.nheads_k), vecs_per_row, static_cast<int>(dims.window), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("rolling_window_attn", &rolling_window_attn_cuda);
  m.impl("rolling_cache_append", &rolling_cache_append_cuda);
}

}  // namespace llmkernels::sliding_window
