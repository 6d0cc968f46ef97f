// 16 fp32 lanes of AVX-512F: the SIMD operations the C++ CPU attention kernels (flash attention, the
// sliding-window chunk kernel) are written against, and a 16 x 16 word transpose (the ternary tiled GEMMs' too).
// Include it INSIDE the per-instruction-set anonymous namespace of a kernel file, under that file's
// `#pragma GCC target`, after <immintrin.h>; the file then adds its register-tile shape:
// `struct Vec : SimdAvx512 { static constexpr int MR = ...; };`. Internal linkage keeps each copy on its own
// instruction set, which is why this header includes nothing itself.

struct SimdAvx512 {
  // r[i] = the 16 32-bit words of row i  ->  r[j] = word j of rows 0..15 (a 16 x 16 transpose): pairs, then
  // quads, then 128-bit lanes interleave.
  static void transpose_words(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8) {
      for (int i = 0; i < 4; ++i) {
        t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
        t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
      }
    }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
  }

  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  // 16 bf16 values widened to fp32 (exactly: the bits move to the top half of each lane)
  static reg load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static float hmax(reg x) { return _mm512_reduce_max_ps(x); }
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  // exp(x) = 2^n * 2^f, n = round(x log2 e), |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (error < 1e-8
  // relative); x < -87 (including -inf, the masked scores) gives exactly 0.
  static reg exp(reg x) {
    const reg t = _mm512_max_ps(set1(-127.f), _mm512_mul_ps(x, set1(1.4426950408889634f)));  // NaN stays NaN
    const reg n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(t, n);
    reg poly = set1(1.52527338040598e-05f);
    poly = fmadd(poly, f, set1(1.54035303933816e-04f));
    poly = fmadd(poly, f, set1(1.33335581464284e-03f));
    poly = fmadd(poly, f, set1(9.61812910762848e-03f));
    poly = fmadd(poly, f, set1(5.55041086648216e-02f));
    poly = fmadd(poly, f, set1(2.40226506959101e-01f));
    poly = fmadd(poly, f, set1(6.93147180559945e-01f));
    poly = fmadd(poly, f, set1(1.f));
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, set1(-87.f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(_mm512_scalef_ps(poly, n), underflow, zero());
  }
};
