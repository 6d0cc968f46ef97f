// What the AMX attention kernels (kernel_amx.cpp forward, kernel_amx_bwd.cpp backward) share: growable scratch,
// bf16 rounding, and the packing of bf16 rows into the operand layouts of the tile products. Include it inside the
// anonymous namespace of those files, under their target switch, after common/cpu_simd_avx512.h.
//
// The tiles compute C (fp32, M x N) (+)= A (bf16, M x K, row-major) B (bf16, K x N), B packed with pairs of its
// rows interleaved: a (K / 2, N) matrix of 32-bit words, word (k, n) = B[2k][n] | B[2k + 1][n] << 16 (the layout
// ATen's brgemm packer writes too).

// No std containers or algorithms here: their inline instantiations, compiled for AVX-512 in these files, could
// be the copies the linker keeps for the whole library.
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// At least n elements, grown on demand; 64-byte aligned: a tile row that straddles two cache lines costs two loads,
// and new[]'s 16-byte alignment had made the P V product 3x and Q K^T 1.7x slower (measured on the attention
// shapes: 1.54 against 0.52 TFLOP/s, 1.41 against 0.83).
template <typename T>
struct Buffer {
  T* data = nullptr;
  int64_t n = 0;
  void reserve(int64_t want) {
    if (want <= n) return;
    free();
    data = static_cast<T*>(::operator new[](sizeof(T) * want, std::align_val_t(64)));
    n = want;
  }
  void release_above(int64_t limit) {  // frees the storage when it holds more than `limit` elements
    if (n > limit) free();
  }
  void free() {
    if (data != nullptr) ::operator delete[](data, std::align_val_t(64));
    data = nullptr;
    n = 0;
  }
  ~Buffer() { free(); }
};

// Visible keys of query i among keys [j0, j0 + width), as offsets from j0: [lo, hi) (none when hi <= lo). shift =
// seqlen_k - seqlen_q of the batch row, sk its seqlen_k; the window's left / right reach (-1: unbounded).
struct Visible {
  int64_t lo, hi;
};
inline Visible visible(int64_t left, int64_t right, int64_t shift, int64_t sk, int64_t i, int64_t j0, int64_t width) {
  Visible v{0, imin(width, sk - j0)};
  if (left >= 0) v.lo = imax(v.lo, i + shift - left - j0);
  if (right >= 0) v.hi = imin(v.hi, i + shift + right - j0 + 1);
  return v;
}
inline Visible visible(const llmkernels::attention_cpu::AttnParams& p, int64_t shift, int64_t sk, int64_t i,
                       int64_t j0, int64_t width) {
  return visible(p.window_left, p.window_right, shift, sk, i, j0, width);
}

// Lanes of the 16 keys from offset c that lie in [vis.lo, vis.hi).
inline __mmask16 visible_lanes(int64_t c, Visible vis) {
  const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(vis.lo))) &
         _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(vis.hi)));
}

// |pos - lane| for lanes 0..15: the ALiBi distances of the 16 keys from column c of a row (pos = i + shift - j0 - c).
inline Vec::reg lane_distances(int64_t pos) {
  const Vec::reg lane =
      _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  return _mm512_abs_ps(Vec::sub(Vec::set1(static_cast<float>(pos)), lane));
}

// 2^x to 7.5e-5 relative (a degree-3 fit of 2^f, f in [-1/2, 1/2]), for probabilities rounded to bf16 (2^-9) next;
// x finite (a very negative x scales to exactly 0; no clamp needed).
inline Vec::reg exp2_coarse(Vec::reg x) {
  const Vec::reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec::reg f = _mm512_sub_ps(x, n);
  Vec::reg p = Vec::set1(0.0551716685295105f);
  p = Vec::fmadd(p, f, Vec::set1(0.2426111400127411f));
  p = Vec::fmadd(p, f, Vec::set1(0.6932609677314758f));
  p = Vec::fmadd(p, f, Vec::set1(0.9999280571937561f));
  return _mm512_scalef_ps(p, n);
}

// 16 fp32 lanes rounded to bf16 (round to nearest even), stored as 16 words.
void store_bf16(uint16_t* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

// The packers below read rows through any source with `const uint16_t* row(int64_t j) const`: Rows (one head of a
// (batch, seqlen, heads, d) tensor), or the rolling KV cache's ring-then-chunk rows (sliding_window/cpu).
struct Rows {  // one head's rows of a (batch, seqlen, heads, d) tensor: row j at base + j * ld (elements)
  const uint16_t* base;
  int64_t ld;
  const uint16_t* row(int64_t j) const { return base + j * ld; }
};

// Words (e, e + 1) of rows j and j + 1 interleaved, for 16 head dims from e: row pair -> 16 words; a row at or
// past `end` reads as zero.
template <typename Src>
inline __m512i row_pair_words(const Src& x, int64_t j, int64_t end, int64_t e) {
  auto widen = [&](int64_t row) {
    return row < end ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.row(row) + e)))
                     : _mm512_setzero_si512();
  };
  return _mm512_or_si512(widen(j), _mm512_slli_epi32(widen(j + 1), 16));
}

// B = X^T for rows [j0, j0 + n) of X (d wide, a multiple of 32; n a multiple of 16; rows from `end` on read as
// zero): a pair of head-dim entries of one row is a word of that row, so the packed X^T is X's rows, as words,
// transposed 16 x 16 at a time: (d / 2, n) words.
template <typename Src>
inline void pack_transposed_b(const Src& x, int64_t j0, int64_t end, int64_t n, int64_t d, uint16_t* out) {
  const int64_t cols = imin(n, end - j0), pairs = d / 2;
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = c0 + i < cols ? _mm512_loadu_si512(x.row(j0 + c0 + i) + 2 * p0) : _mm512_setzero_si512();
      }
      SimdAvx512::transpose_words(r);  // r[j]: word p0 + j of rows c0 .. c0 + 15
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(words + (p0 + j) * n + c0, r[j]);
    }
  }
}

// B = X for rows [j0, j0 + n) (n even, zero from `end` on): (n / 2, d) words of consecutive rows interleaved.
template <typename Src>
inline void pack_rows_b(const Src& x, int64_t j0, int64_t end, int64_t n, int64_t d, uint16_t* out) {
  for (int64_t c = 0; c < n; c += 2) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + c * d);
    for (int64_t e = 0; e < d; e += 16) _mm512_storeu_si512(dst + e, row_pair_words(x, j0 + c, end, e));
  }
}

// A = X^T, plain bf16 (d rows of n, row e at out + e * ld), for rows [0, n) of X (n a multiple of 32, zero from
// `end` on): pairs of rows interleaved into words, then 16 x 16 word transposes turn 16 row pairs (32 rows) by 16
// head dims into 16 head-dim rows of 32 entries.
template <typename Src>
inline void pack_transposed_a(const Src& x, int64_t end, int64_t n, int64_t d, uint16_t* out, int64_t ld) {
  for (int64_t r0 = 0; r0 < n; r0 += 32) {
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
      __m512i w[16];
      for (int i = 0; i < 16; ++i) w[i] = row_pair_words(x, r0 + 2 * i, end, e0);
      SimdAvx512::transpose_words(w);  // w[j]: head dim e0 + j of rows r0 .. r0 + 31
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + (e0 + j) * ld + r0, w[j]);
    }
  }
}
