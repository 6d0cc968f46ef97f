// CPU kernels of the ternary (BitNet b1.58) linear layers. Packed layout: see llmkernels/reference/ternary.py
// (256-weight blocks of 64 bytes; byte j of block b holds weights 256 b + 64 s + j, s = 0..3, at bits 2s as
// the code w + 1). Activation rows handed to the kernels are padded with zeros to K_pad = 64 * bytes_per_row.
#pragma once

#include <cstdint>

namespace llmkernels::ternary_cpu {

constexpr int64_t kBlockWeights = 256;
constexpr int64_t kBlockBytes = 64;

// One token row: s = max(max|x|, 1e-5), x_q[k] = clamp(rint((x[k] * 127) / s), -128, 127) for k < K, 0 for
// K <= k < k_pad. Returns s; *sum gets sum(x_q) (the kernels use codes w + 1 and subtract it).
template <typename scalar_t>
float quantize_row(const scalar_t* x, int64_t K, int64_t k_pad, int8_t* x_q, int32_t* sum);

// acc[t][n] = sum_k x_q[t][k] * W_t[n][k] for t < m, n < N, exact in int32.
// x_q: (m, k_pad) int8 row-major (zero-padded); w: (N, k_pad / 4) packed; acc: (m, N) row-major.
// xsum: (m,) sum of each x_q row. Parallel over output rows (at::parallel_for).
void matmul_int8(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
                 int32_t* acc);

// y[t][n] = sum_k x[t][k] * W_t[n][k] in fp32 (weight-only). x: (m, k_pad) fp32 zero-padded; y: (m, N).
void matmul_f32(const float* x, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad, float* y);

// Packed (N, k_pad / 4) -> fp32 (N, k_pad) dense weights in {-1, 0, 1} (for prefill through a BLAS GEMM).
void unpack_f32(const uint8_t* w, int64_t N, int64_t k_pad, float* out);
// The same as bf16 words (exact): out (N, k_pad) uint16_t.
void unpack_bf16(const uint8_t* w, int64_t N, int64_t k_pad, uint16_t* out);

// Register-tiled GEMMs for several tokens (cpu/ternary_cpu_tiled.cpp), each only where its *_available() says.
// matmul_int8_tiled: as matmul_int8, on AVX-512 VNNI. linear_w2_bf16: weight-only for bf16 x, on AVX512-BF16:
// out (m, N) bf16 = gamma * (x W_t^T) (+ bias), accumulated in fp32; x: (m, k_even) bf16 row-major, k_even =
// in_features rounded up to even (a zero column added when odd); bias: (N,) fp32 or null. Each thread holds one
// packed block of 64 rows unpacked (16 or 32 KB) and the running sums of up to 192 tokens (48 KB).
bool tiled_int8_available();
void matmul_int8_tiled(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
                       int32_t* acc);
bool bf16_linear_w2_available();
void linear_w2_bf16(const uint16_t* x, int64_t m, int64_t k_even, const uint8_t* w, int64_t N, int64_t k_pad,
                    float gamma, const float* bias, uint16_t* out);

// The GEMMs on AMX tiles (cpu/ternary_cpu_amx.cpp), only where common/cpu_amx.h says so (use_amx_int8_tiles,
// use_amx_tiles for bf16). activations_as_amx_b lays the activations out as the tiles' B operand: each of
// `planes` arrays is m rows of `words` 32-bit words (int8 x_q (m, k_pad): k_pad / 4 words; bf16 x zero-padded to
// (m, k_pad): k_pad / 2; fp32 / fp16 x as 3 / 2 such bf16 planes summing to x); xt gets panels of 32 tokens (zero
// past m), each the planes' (words, 32) in turn: 4 * planes * words * m32 bytes, m32 = m rounded up to 32.
// amx_strip then writes the output features [n0, n0 + features) (features a multiple of 32; those from N on
// are skipped) of `out`, given amx_strip_scratch_bytes of 64-aligned scratch:
//   out.acc set (int8 only): acc (m, N) int32, as matmul_int8;
//   else the layer's outputs y (m, N) in `dtype`: y = dtype(sum * scale_t (+ bias[n])), scale_t = row_scale[t]
//   (act_bits=8: s[t] * gamma / 127) or, without row_scale, `scale` (weight-only: gamma); bias fp32 or null.
enum class AmxKind { kInt8, kBf16 };
struct TileOut {
  int32_t* acc;
  void* y;
  int dtype;  // of y: 0 fp32, 1 bf16, 2 fp16
  const float* row_scale;
  float scale;
  const float* bias;
};
void activations_as_amx_b(const void* const* x_planes, int planes, int64_t m, int64_t words, uint32_t* xt);
inline int64_t amx_strip_scratch_bytes(AmxKind kind, int64_t features, int64_t k_pad) {
  return features * ((kind == AmxKind::kInt8 ? k_pad : 2 * k_pad) + 64 + 128);
}
void amx_strip(AmxKind kind, const uint32_t* xt, int planes, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
               int64_t n0, int64_t features, uint8_t* scratch, const TileOut& out);

}  // namespace llmkernels::ternary_cpu
