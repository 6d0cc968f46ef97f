// The blocked chunk kernel of rolling_window_attn compiled for AVX2 + FMA (8 fp32 lanes; 4 x 2-register tile:
// 8 accumulators of 16 registers). Chosen at run time by sliding_window_cpu.cpp when AVX-512 is absent (or
// LLMKERNELS_CPU_ISA=avx2).
#include "sliding_window/cpu/chunk_attn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace {

struct Vec {
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 4;  // register tile: MR rows x NV registers
  static constexpr int NV = 2;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  // As in chunk_attn_avx512.cpp, with 2^i built in the exponent bits (i >= -126 keeps it a normal float).
  static reg exp(reg x) {
    const reg t = _mm256_max_ps(_mm256_mul_ps(x, set1(1.4426950408889634f)), set1(-126.f));
    const reg i = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm256_sub_ps(t, i);
    reg y = set1(1.525273380405984e-05f);  // (ln 2)^k / k!, k = 7 .. 0
    y = fmadd(y, f, set1(1.540353039338161e-04f));
    y = fmadd(y, f, set1(1.333355814642844e-03f));
    y = fmadd(y, f, set1(9.618129107628477e-03f));
    y = fmadd(y, f, set1(5.550410866482158e-02f));
    y = fmadd(y, f, set1(2.402265069591007e-01f));
    y = fmadd(y, f, set1(6.931471805599453e-01f));
    y = fmadd(y, f, set1(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
    const reg underflow = _mm256_cmp_ps(x, set1(-87.f), _CMP_LT_OQ);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
  }
};

}  // namespace

#define LLMK_CHUNK_ISA avx2
#include "sliding_window/cpu/chunk_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (sliding_window_cpu.cpp keeps the per-row kernel)
namespace llmkernels::sliding_window::cpu {
void chunk_attn_avx2(const ChunkParams&, int64_t, int64_t) {}
}  // namespace llmkernels::sliding_window::cpu
#endif
