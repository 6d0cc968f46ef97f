// The CPU attention kernels compiled for AVX2 + FMA (8 fp32 lanes; 4 x 2 register micro-kernel, 8 accumulators
// of 16 registers). Chosen at run time by attention_cpu.cpp when AVX-512 is absent (or LLMKERNELS_CPU_ISA=avx2).
#include "attention/cpu/flash_attn_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace {

#include "common/cpu_simd_avx2.h"

struct Vec : SimdAvx2 {
  static constexpr int MR4 = 0;  // rows of a 4-register-wide tile (0: none)
  static constexpr int MR = 4;

  // 2^x for the forward's probabilities (x <= 0 there): 2^round(x) built in the exponent bits times a degree-5
  // polynomial of the remainder (relative error < 2e-7, exactly 1 at 0). x = -inf (masked scores) clamps to
  // -127, whose biased exponent 0 makes the power exactly +0.
  static reg exp2(reg x) {
    const reg t = _mm256_max_ps(set1(-127.f), x);  // (a NaN x is the second operand: it stays NaN)
    const reg n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm256_sub_ps(t, n);
    reg poly = set1(1.326472614891827e-03f);
    poly = fmadd(poly, f, set1(9.671512991189957e-03f));
    poly = fmadd(poly, f, set1(5.550733581185341e-02f));
    poly = fmadd(poly, f, set1(2.4022242426872253e-01f));
    poly = fmadd(poly, f, set1(6.931470036506653e-01f));
    poly = fmadd(poly, f, set1(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
  }

  // out[i][j] = src[j * lds + i] for an 8 x 8 block: pairs, then quads, then the 128-bit halves are interleaved.
  static void transpose(const float* src, int64_t lds, reg* out) {
    reg r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      const __m256d a = _mm256_castps_pd(t[i]), b = _mm256_castps_pd(t[i + 1]);
      const __m256d c = _mm256_castps_pd(t[i + 2]), d = _mm256_castps_pd(t[i + 3]);
      r[i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
      r[i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
      r[i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
      r[i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 4; ++i) {
      out[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
      out[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
  }
};

}  // namespace

#define LLMK_ISA avx2
#include "attention/cpu/flash_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (attention_cpu.cpp picks the scalar kernels)
namespace llmkernels::attention_cpu {
void fwd_tasks_avx2(const AttnParams&, int64_t, int64_t) {}
void bwd_tasks_avx2(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
