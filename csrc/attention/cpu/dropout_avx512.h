// Attention dropout masks (llmkernels/reference/dropout.py) on AVX-512: Philox4x32-10 (common/philox.h) on 16
// counters at once, one per 32-bit lane. flash_attn_kernel.h runs one query row per lane (its transposed score
// tiles); the AMX kernels (amx_forward.h, kernel_amx_bwd.cpp) one group of eight keys per lane, for their row-major
// P (DropoutRows). GCC leaves plain per-lane loops scalar under AVX-512, hence the explicit form. Include inside the
// anonymous namespace of a file compiled for AVX-512F/BW, after <immintrin.h>, common/philox.h and
// attention/cpu/flash_attn_cpu.h.

// (hi, lo) 32-bit halves of the products x * m, lane by lane: vpmuludq multiplies the even lanes, the odd ones after
// a shift into the even positions; one masked swap of neighbouring lanes then moves each half where it belongs.
inline void mulhilo_lanes(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
}

// The ten rounds on the counters x[0..3] (word w of lane l: x[w] lane l) under key (k0, k1), in place: x becomes
// the four output words of each lane's call.
inline void philox_lanes(__m512i x[4], uint32_t k0, uint32_t k1) {
  namespace ph = llmkernels::philox;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(ph::kM0)), m1 = _mm512_set1_epi32(static_cast<int>(ph::kM1));
  for (int round = 0; round < ph::kRounds; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_lanes(x[0], m0, hi0, lo0);
    mulhilo_lanes(x[2], m1, hi1, lo1);
    x[0] = _mm512_xor_si512(_mm512_xor_si512(hi1, x[1]), _mm512_set1_epi32(static_cast<int>(k0)));
    x[2] = _mm512_xor_si512(_mm512_xor_si512(hi0, x[3]), _mm512_set1_epi32(static_cast<int>(k1)));
    x[1] = lo1;
    x[3] = lo0;
    k0 += ph::kW0;
    k1 += ph::kW1;
  }
}

// The mask of one (batch row, query head) in row-major order, as keep bits: P_ij (times scale) is kept where the
// bit of (i, j) is set.
struct DropoutRows {
  static constexpr bool kOn = true;  // (amx_forward.h's NoDropout: false)
  uint32_t key0, key1, threshold;
  uint32_t bh;  // the counter's head word: (drop_batch0 + b) * nheads + h
  float scale;  // 1 / P(kept)

  // Bit l of keep[c / 16] for key j0 + c + l, query i, for the keys [j0 + c_lo, j0 + c_hi) (j0 a multiple of 8,
  // the bits drawn by whole chunks of 128 keys from c_lo rounded down to one; keep sized for them). One call per
  // chunk: lane l draws keys 8l .. 8l + 7 of it; the 4 x 16 words are transposed so that each lane's four words,
  // eight 16-bit draws in key order, lie one after another, and a register then holds 32 consecutive draws.
  void keep_bits(int64_t i, int64_t j0, int64_t c_lo, int64_t c_hi, __mmask16* keep) const {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i thresh = _mm512_set1_epi16(static_cast<short>(threshold));
    for (int64_t c0 = c_lo / 128 * 128; c0 < c_hi; c0 += 128) {
      __m512i x[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>((j0 + c0) / 8)), lane),
                      _mm512_set1_epi32(static_cast<int>(i)), _mm512_set1_epi32(static_cast<int>(bh)),
                      _mm512_setzero_si512()};
      philox_lanes(x, key0, key1);
      // within each 128-bit quarter q: t[n] holds the words 0..3 of lane 4q + n
      const __m512i a = _mm512_unpacklo_epi32(x[0], x[1]), b = _mm512_unpackhi_epi32(x[0], x[1]);
      const __m512i c = _mm512_unpacklo_epi32(x[2], x[3]), d = _mm512_unpackhi_epi32(x[2], x[3]);
      const __m512i t0 = _mm512_unpacklo_epi64(a, c), t1 = _mm512_unpackhi_epi64(a, c);
      const __m512i t2 = _mm512_unpacklo_epi64(b, d), t3 = _mm512_unpackhi_epi64(b, d);
      // quarters regrouped: draws[q] = lanes 4q .. 4q + 3, keys 32q .. 32q + 31 of the chunk
      const __m512i u0 = _mm512_shuffle_i64x2(t0, t1, 0x44), u1 = _mm512_shuffle_i64x2(t2, t3, 0x44);
      const __m512i u2 = _mm512_shuffle_i64x2(t0, t1, 0xEE), u3 = _mm512_shuffle_i64x2(t2, t3, 0xEE);
      const __m512i draws[4] = {_mm512_shuffle_i64x2(u0, u1, 0x88), _mm512_shuffle_i64x2(u0, u1, 0xDD),
                                _mm512_shuffle_i64x2(u2, u3, 0x88), _mm512_shuffle_i64x2(u2, u3, 0xDD)};
      for (int q = 0; q < 4; ++q) {
        const __mmask32 kept = _mm512_cmpge_epu16_mask(draws[q], thresh);
        keep[(c0 + 32 * q) / 16] = static_cast<__mmask16>(kept);
        keep[(c0 + 32 * q) / 16 + 1] = static_cast<__mmask16>(kept >> 16);
      }
    }
  }
};

// The mask of (batch row b, query head h) of p (p.dropout set).
inline DropoutRows dropout_rows(const llmkernels::attention_cpu::AttnParams& p, int64_t b, int64_t h) {
  return {p.drop_key0, p.drop_key1, p.drop_threshold, static_cast<uint32_t>((p.drop_batch0 + b) * p.nheads + h),
          p.drop_scale};
}
