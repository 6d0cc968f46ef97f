// Host side of the ternary linear ops on CUDA: checks, launches and TORCH_LIBRARY_IMPL(llmkernels, CUDA).
//
// Decode (m <= 16 tokens): one GEMV kernel reading the packed weights once, quantising the activations in
// shared memory (gemv_a8_decode, grid sized to the GPU) or, when m * k_pad exceeds that budget, after a
// quantize_rows launch (gemv_a8).
// Prefill (m > 16): quantize_rows + the int8 mma.sync GEMM with the epilogue fused (gemm_a8_mma_kernel).
// LLMKERNELS_TERNARY_GEMM=cublaslt (or a GPU below sm_80) instead unpacks the weights to int8 and runs
// at::_int_mm (cuBLASLt int8 tensor cores) + an epilogue kernel: kept as a baseline for the benchmarks.
// Weight-only prefill unpacks the weights to x's dtype and uses at::mm with an fp32 result (cuBLAS).
// Kernels and their reasoning: ternary_cuda_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "ternary/ternary_checks.h"
#include "ternary/ternary_cuda_decode.cuh"
#include "ternary/ternary_cuda_kernels.cuh"

namespace llmkernels {
namespace {

using namespace ternary_cuda;

constexpr int kQuantizeThreads = 256;
constexpr int kElementwiseThreads = 256;

// f(std::type_identity<scalar_t>{}) for the three activation dtypes
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(std::type_identity<float>{}); break;
    case at::kHalf: f(std::type_identity<at::Half>{}); break;
    case at::kBFloat16: f(std::type_identity<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, "llmkernels.", op, ": x must be float16, bfloat16 or float32, got ", t);
  }
}

// f(std::integral_constant<int, MT>{}) with MT the smallest GEMV tile in {1, 2, 4, 8, 16} holding m tokens
template <typename F>
void dispatch_tokens(int64_t m, F&& f) {
  if (m <= 1) f(std::integral_constant<int, 1>{});
  else if (m <= 2) f(std::integral_constant<int, 2>{});
  else if (m <= 4) f(std::integral_constant<int, 4>{});
  else if (m <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, kMaxGemvTokens>{});
}

// The kernels use 16-byte vector loads: a contiguous view with a storage offset may not be 16-byte aligned.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

int gemv_blocks(int64_t N) { return static_cast<int>((N + kGemvWarps - 1) / kGemvWarps); }

// gemv_a8_decode: a warp per row while rows are few, else kDecodeBlocksPerSm blocks an SM whose warps loop
int decode_blocks(int64_t N, const at::Device& device) {
  int sms = 0;  // cheap: the runtime caches device attributes
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return static_cast<int>(std::min((N + kDecodeWarps - 1) / kDecodeWarps, int64_t{sms} * kDecodeBlocksPerSm));
}

int elementwise_blocks(int64_t n) { return static_cast<int>((n + kElementwiseThreads - 1) / kElementwiseThreads); }

// x: (m, K) contiguous -> x_q (m, k_out) int8 (zero columns K..k_out-1), s (m,) fp32
void quantize(const at::Tensor& x, int64_t k_out, at::Tensor& x_q, at::Tensor& s) {
  const int64_t m = x.size(0), K = x.size(1);
  x_q = at::empty({m, k_out}, x.options().dtype(at::kChar));
  s = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "ternary_quantize_activation", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    quantize_rows_kernel<scalar_t><<<static_cast<unsigned>(m), kQuantizeThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), K, static_cast<int>(K), x_q.data_ptr<int8_t>(), k_out, static_cast<int>(k_out),
        s.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// packed (N, k_pad / 4) -> dense (rows_out, k_pad) of OutT
template <typename OutT>
at::Tensor unpack(const at::Tensor& w_packed, int64_t k_pad, int64_t rows_out, at::ScalarType dtype) {
  const int64_t N = w_packed.size(0);
  at::Tensor dense = at::empty({rows_out, k_pad}, w_packed.options().dtype(dtype));
  const int64_t threads = rows_out * (k_pad / 64);
  if (threads == 0) return dense;
  unpack_kernel<OutT><<<elementwise_blocks(threads), kElementwiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w_packed.data_ptr<uint8_t>(), static_cast<int>(N), static_cast<int>(k_pad), static_cast<int>(rows_out),
      reinterpret_cast<OutT*>(dense.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

// Whether prefill uses cuBLASLt (at::_int_mm) rather than our mma.sync GEMM: LLMKERNELS_TERNARY_GEMM=cublaslt|mma
// when set; otherwise cuBLASLt below sm_80 (no int8 mma) and from sm_90 on, where it uses wgmma and measured
// faster than our mma.sync GEMM (H100, 2048 tokens: 0.230 vs 0.275 ms at 4096x4096, 1.45 vs 2.64 ms at
// 28672x8192, 2026-11-23).
bool use_cublaslt_gemm(const at::Tensor& t) {
  const char* env = std::getenv("LLMKERNELS_TERNARY_GEMM");
  if (env != nullptr && std::strcmp(env, "cublaslt") == 0) return true;
  if (env != nullptr && std::strcmp(env, "mma") == 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  return major < 8 || major >= 9;
}

template <typename OutT>
void launch_gemm_mma(const at::Tensor& x_q, int64_t m, const float* s, const at::Tensor& w_packed, int64_t k_pad,
                     const float* w_scale, const OutT* bias, OutT* out) {
  const int64_t N = w_packed.size(0);
  // grid.y (token tiles) is limited to 65535: longer inputs are launched in slices of token rows
  constexpr int64_t kMaxRowsPerLaunch = int64_t{65535} * kMmaBM;
  for (int64_t row0 = 0; row0 < m; row0 += kMaxRowsPerLaunch) {
    const int64_t rows = std::min(m - row0, kMaxRowsPerLaunch);
    const dim3 grid(static_cast<unsigned>((N + kMmaBN - 1) / kMmaBN),
                    static_cast<unsigned>((rows + kMmaBM - 1) / kMmaBM));
    gemm_a8_mma_kernel<OutT><<<grid, kMmaThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x_q.data_ptr<int8_t>() + row0 * k_pad, static_cast<int>(rows), s != nullptr ? s + row0 : nullptr,
        w_packed.data_ptr<uint8_t>(), static_cast<int>(N), static_cast<int>(k_pad), w_scale, bias, out + row0 * N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// x_q: (m, k_pad) int8 contiguous, m > 16 -> int32 (m, round_up(N, 8)) on the int8 tensor cores (cuBLASLt)
at::Tensor int8_gemm(const at::Tensor& x_q, const at::Tensor& w_packed, int64_t k_pad) {
  const int64_t n8 = (w_packed.size(0) + 7) / 8 * 8;  // cuBLASLt int8 wants out_features % 8 == 0
  const at::Tensor w_dense = unpack<int8_t>(w_packed, k_pad, n8, at::kChar);
  return at::_int_mm(x_q, w_dense.t());
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "ternary_quantize_activation";
  LLMK_CHECK_DEVICE(op, x_in, at::kCUDA);
  LLMK_CHECK_ARG(x_in.dim() >= 1 && x_in.size(-1) > 0, op, "x", "must have a non-empty last dimension, got ",
                 x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  at::Tensor x_q, s;
  quantize(x.view({-1, K}), K, x_q, s);
  return {x_q.view(x.sizes()), s.view(x.sizes().slice(0, x.dim() - 1))};
}

at::Tensor matmul_int8_cuda(const at::Tensor& x_q, const at::Tensor& w_packed_in, int64_t in_features) {
  constexpr const char* op = "ternary_matmul_int8";
  LLMK_CHECK_DEVICE(op, x_q, at::kCUDA);
  LLMK_CHECK_DTYPE(op, x_q, at::kChar);
  LLMK_CHECK_DIM(op, x_q, 2);
  LLMK_CHECK_ARG(x_q.size(1) == in_features, op, "x_q", "must have in_features = ", in_features,
                 " columns, got ", x_q.sizes());
  const int64_t k_pad = ternary::check_packed_weight(op, w_packed_in, x_q, in_features);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const at::Tensor w_packed = aligned16(w_packed_in);
  const int64_t m = x_q.size(0), N = w_packed.size(0);
  at::Tensor xp = x_q.contiguous();
  xp = k_pad != in_features ? at::constant_pad_nd(xp, {0, k_pad - in_features}, 0) : aligned16(xp);
  if (m == 0 || N == 0) return at::empty({m, N}, x_q.options().dtype(at::kInt));
  if (m > kMaxGemvTokens && use_cublaslt_gemm(xp)) {
    const at::Tensor acc = int8_gemm(xp, w_packed, k_pad);
    return acc.size(1) == N ? acc : acc.narrow(1, 0, N).contiguous();
  }
  at::Tensor out = at::empty({m, N}, x_q.options().dtype(at::kInt));
  if (m > kMaxGemvTokens) {
    launch_gemm_mma<int32_t>(xp, m, nullptr, w_packed, k_pad, nullptr, nullptr, out.data_ptr<int32_t>());
    return out;
  }
  dispatch_tokens(m, [&](auto mt) {
    gemv_a8_kernel<decltype(mt)::value, int32_t>
        <<<gemv_blocks(N), kGemvWarps * kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
            xp.data_ptr<int8_t>(), static_cast<int>(m), nullptr, w_packed.data_ptr<uint8_t>(), static_cast<int>(N),
            static_cast<int>(k_pad), nullptr, nullptr, out.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor linear_a8_cuda(const at::Tensor& x_in, const at::Tensor& w_packed_in, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "ternary_linear_a8";
  LLMK_CHECK_DEVICE(op, x_in, at::kCUDA);
  ternary::check_linear_args(op, x_in, w_packed_in, w_scale, bias, in_features);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t k_pad = ternary::padded_in_features(in_features);
  const at::Tensor w_packed = aligned16(w_packed_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), N = w_packed.size(0);
  at::Tensor out = at::empty({m, N}, x.options());
  if (m == 0 || N == 0) return out;
  const at::Tensor scale = w_scale.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fused = m <= kMaxGemvTokens && m * k_pad <= kDecodeMaxSmemBytes;
  at::Tensor x_q, s;
  if (!fused) quantize(x, k_pad, x_q, s);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (fused) {
      const size_t smem = static_cast<size_t>(m * k_pad);
      const unsigned blocks = static_cast<unsigned>(decode_blocks(N, x.device()));
      dispatch_tokens(m, [&](auto mt) {
        gemv_a8_decode_kernel<decltype(mt)::value, scalar_t><<<blocks, kDecodeWarps * kWarp, smem, stream>>>(
            x.data_ptr<scalar_t>(), static_cast<int>(m), static_cast<int>(in_features), w_packed.data_ptr<uint8_t>(),
            static_cast<int>(N), static_cast<int>(k_pad), scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
      });
    } else if (m <= kMaxGemvTokens) {
      dispatch_tokens(m, [&](auto mt) {
        gemv_a8_kernel<decltype(mt)::value, scalar_t><<<gemv_blocks(N), kGemvWarps * kWarp, 0, stream>>>(
            x_q.data_ptr<int8_t>(), static_cast<int>(m), s.data_ptr<float>(), w_packed.data_ptr<uint8_t>(),
            static_cast<int>(N), static_cast<int>(k_pad), scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
      });
    } else if (!use_cublaslt_gemm(x)) {
      launch_gemm_mma<scalar_t>(x_q, m, s.data_ptr<float>(), w_packed, k_pad, scale.data_ptr<float>(), bp,
                                out.data_ptr<scalar_t>());
    } else {
      const at::Tensor acc = int8_gemm(x_q, w_packed, k_pad);
      epilogue_kernel<int32_t, scalar_t><<<elementwise_blocks(m * N), kElementwiseThreads, 0, stream>>>(
          acc.data_ptr<int32_t>(), acc.size(1), static_cast<int>(m), static_cast<int>(N), s.data_ptr<float>(),
          scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor linear_w2_cuda(const at::Tensor& x_in, const at::Tensor& w_packed_in, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "ternary_linear_w2";
  LLMK_CHECK_DEVICE(op, x_in, at::kCUDA);
  ternary::check_linear_args(op, x_in, w_packed_in, w_scale, bias, in_features);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t k_pad = ternary::padded_in_features(in_features);
  const at::Tensor w_packed = aligned16(w_packed_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), N = w_packed.size(0);
  at::Tensor out = at::empty({m, N}, x.options());
  if (m == 0 || N == 0) return out;
  const at::Tensor scale = w_scale.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (m <= kMaxGemvTokens) {
      // fp32, zero-padded to whole 256-weight blocks so the GEMV never reads past a row
      const at::Tensor xf = aligned16(at::constant_pad_nd(x.to(at::kFloat), {0, k_pad - in_features}, 0).contiguous());
      dispatch_tokens(m, [&](auto mt) {
        gemv_w2_kernel<decltype(mt)::value, scalar_t><<<gemv_blocks(N), kGemvWarps * kWarp, 0, stream>>>(
            xf.data_ptr<float>(), static_cast<int>(m), w_packed.data_ptr<uint8_t>(), static_cast<int>(N),
            static_cast<int>(k_pad), scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
      });
    } else {
      // ternary values are exact in every float dtype; cuBLAS accumulates in fp32 and, with out_dtype fp32,
      // also returns fp32: an fp16 result would be rounded twice and overflow (x @ W_t^T is ~1 / gamma times y)
      const at::Tensor w_dense = unpack<scalar_t>(w_packed, k_pad, N, x.scalar_type());
      const at::Tensor y = at::mm(x, w_dense.narrow(1, 0, in_features).t(), at::kFloat);
      epilogue_kernel<float, scalar_t><<<elementwise_blocks(m * N), kElementwiseThreads, 0, stream>>>(
          y.data_ptr<float>(), y.stride(0), static_cast<int>(m), static_cast<int>(N), nullptr,
          scale.data_ptr<float>(), bp, out.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("ternary_quantize_activation", &quantize_activation_cuda);
  m.impl("ternary_matmul_int8", &matmul_int8_cuda);
  m.impl("ternary_linear_a8", &linear_a8_cuda);
  m.impl("ternary_linear_w2", &linear_w2_cuda);
}

}  // namespace llmkernels
