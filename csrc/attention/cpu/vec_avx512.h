// The Vec of the AVX-512 flash attention kernels (kernel_avx512.cpp, kernel_avx512bf16.cpp): the shared
// AVX-512 operations plus the register-tile shape, a cheap exp2 and a 16 x 16 transpose. Include it inside the
// anonymous namespace of a kernel file, under its AVX-512 target, after common/cpu_simd_avx512.h.

struct Vec : SimdAvx512 {
  static constexpr int MR4 = 6;  // rows of a 4-register-wide tile (0: none)
  static constexpr int MR = 8;

  // 2^x for the forward's probabilities (x <= 0 there): 2^round(x) by vscalefps times a degree-5 polynomial of
  // the remainder (relative error < 2e-7, exactly 1 at 0). Cheaper than exp() (no log2(e) multiply, no mask):
  // x = -inf (masked scores) clamps to -200, whose 2^-200 underflows to exactly 0.
  static reg exp2(reg x) {
    const reg t = _mm512_max_ps(set1(-200.f), x);  // (a NaN x is the second operand: it stays NaN)
    const reg n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(t, n);
    reg poly = set1(1.326472614891827e-03f);
    poly = fmadd(poly, f, set1(9.671512991189957e-03f));
    poly = fmadd(poly, f, set1(5.550733581185341e-02f));
    poly = fmadd(poly, f, set1(2.4022242426872253e-01f));
    poly = fmadd(poly, f, set1(6.931470036506653e-01f));
    poly = fmadd(poly, f, set1(1.f));
    return _mm512_scalef_ps(poly, n);
  }

  // out[i][j] = src[j * lds + i] for a 16 x 16 block.
  static void transpose(const float* src, int64_t lds, reg* out) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(src + i * lds));
    transpose_words(r);
    for (int i = 0; i < 16; ++i) out[i] = _mm512_castsi512_ps(r[i]);
  }
};
