// The blocked chunk kernel of rolling_window_attn compiled for AVX-512 (16 fp32 lanes; 6 x 4-register tile:
// 24 accumulators of 32 registers). Chosen at run time by sliding_window_cpu.cpp when the CPU has AVX-512F/BW.
#include "sliding_window/cpu/chunk_attn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx2,fma")
#endif

namespace {

struct Vec {
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 6;  // register tile: MR rows x NV registers
  static constexpr int NV = 4;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  // e^x = 2^i 2^f with i = round(x log2 e), |f| <= 1/2, 2^f from its degree-7 Taylor series (relative error
  // below 1e-8), scaled by 2^i with vscalefps. x < -87 (and -inf, a masked score) gives exactly 0.
  static reg exp(reg x) {
    const reg t = _mm512_max_ps(_mm512_mul_ps(x, set1(1.4426950408889634f)), set1(-127.f));
    const reg i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(t, i);
    reg y = set1(1.525273380405984e-05f);  // (ln 2)^k / k!, k = 7 .. 0
    y = fmadd(y, f, set1(1.540353039338161e-04f));
    y = fmadd(y, f, set1(1.333355814642844e-03f));
    y = fmadd(y, f, set1(9.618129107628477e-03f));
    y = fmadd(y, f, set1(5.550410866482158e-02f));
    y = fmadd(y, f, set1(2.402265069591007e-01f));
    y = fmadd(y, f, set1(6.931471805599453e-01f));
    y = fmadd(y, f, set1(1.f));
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, set1(-87.f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(_mm512_scalef_ps(y, i), underflow, zero());
  }
};

}  // namespace

#define LLMK_CHUNK_ISA avx512
#include "sliding_window/cpu/chunk_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (sliding_window_cpu.cpp keeps the per-row kernel)
namespace llmkernels::sliding_window::cpu {
void chunk_attn_avx512(const ChunkParams&, int64_t, int64_t) {}
}  // namespace llmkernels::sliding_window::cpu
#endif
