// 8 fp32 lanes of AVX2 + FMA: the SIMD operations the C++ CPU attention kernels (flash attention, the sliding-window chunk
// kernel) are written against. Include it INSIDE the per-instruction-set anonymous namespace of a kernel
// file, under that file's `#pragma GCC target`, after <immintrin.h>; the file then adds its register-tile
// shape: `struct Vec : SimdAvx2 { static constexpr int MR = ...; };`. Internal linkage keeps each copy on
// its own instruction set, which is why this header includes nothing itself.

struct SimdAvx2 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  // 8 bf16 values widened to fp32 (exactly: the bits move to the top half of each lane)
  static reg load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static float hmax(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // As in cpu_simd_avx512.h: 2^round(x log2 e) built in the exponent bits times a degree-7 polynomial of the
  // remainder; x < -87 (including -inf) gives exactly 0.
  static reg exp(reg x) {
    const reg t = _mm256_max_ps(set1(-126.f), _mm256_mul_ps(x, set1(1.4426950408889634f)));  // NaN stays NaN
    const reg n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm256_sub_ps(t, n);
    reg poly = set1(1.52527338040598e-05f);
    poly = fmadd(poly, f, set1(1.54035303933816e-04f));
    poly = fmadd(poly, f, set1(1.33335581464284e-03f));
    poly = fmadd(poly, f, set1(9.61812910762848e-03f));
    poly = fmadd(poly, f, set1(5.55041086648216e-02f));
    poly = fmadd(poly, f, set1(2.40226506959101e-01f));
    poly = fmadd(poly, f, set1(6.93147180559945e-01f));
    poly = fmadd(poly, f, set1(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const reg result = _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-87.f), _CMP_LT_OQ), result);
  }
};
