// CPU kernels of the ternary linear layers: integer dot products of int8 activations with 2-bit weights.
//
// Math: with codes c = w + 1 in {0, 1, 2} (what the packed bytes hold), sum_k x_q[k] w[k] =
// sum_k c[k] x_q[k] - sum_k x_q[k]. The first sum is an unsigned-by-signed byte dot product, the native
// shape of AVX2 `vpmaddubsw` and AVX-512 VNNI `vpdpbusd`; the second is computed once per token.
//
// Tiling: a 64-byte packed block (256 weights) is loaded once and shifted / masked into four vectors of
// 64 consecutive codes; each is multiplied with up to 4 tokens (MT) so the unpacking is shared. Output
// rows are split across threads (at::parallel_for) and walked in tiles of 64 rows per token tile, so a
// tile of weights stays in L2 while it is reused by every token tile.
//
// Speed: for 1 token this is a stream over the packed weights (K / 4 bytes a row), 16x fewer bytes than
// fp32 F.linear; unpacking costs ~2 ALU ops per 32 weights, so a core runs near its memory / L2 bandwidth.
#include "ternary/cpu/ternary_cpu_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"

namespace llmkernels::ternary_cpu {

namespace {

constexpr int kMaxTokensPerTile = 4;
// Smallest task worth another thread: 4M int8 MACs, ~0.1 ms of one core (a 1-token GEMV streams ~10 GB/s of
// packed weights a core). It was 16M on the worry that a pool thread costs a scheduler quantum on a busy machine,
// but that kept a 4096 x 4096 decode on one core at 0.39 ms; two threads take 0.13 ms (2-core VM, idle).
constexpr int64_t kMinMacsPerTask = 4 << 20;

int64_t row_grain(int64_t m, int64_t k_pad, int64_t at_least) {
  return std::max(at_least, kMinMacsPerTask / std::max<int64_t>(1, m * k_pad));
}
constexpr int64_t kRowTile = 64;  // rows of weights reused across token tiles while they sit in L2
constexpr int64_t kTiledMinTokens = 12;  // from here matmul_int8 takes the register-tiled GEMM (see there)

// ---- scalar fallback ------------------------------------------------------------------------------
template <int MT>
void dot_codes_scalar(const uint8_t* w, const int8_t* x, int64_t x_stride, int64_t nblocks, int32_t* out) {
  int32_t acc[MT] = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int j = 0; j < kBlockBytes; ++j) {
      const uint8_t byte = w[b * kBlockBytes + j];
      for (int s = 0; s < 4; ++s) {
        const int32_t c = (byte >> (2 * s)) & 3;
        const int64_t k = b * kBlockWeights + 64 * s + j;
        for (int t = 0; t < MT; ++t) acc[t] += c * x[t * x_stride + k];
      }
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = acc[t];
}

// ---- AVX2: vpmaddubsw (u8 codes x s8 activations -> s16 pairs), vpmaddwd to s32 ---------------------
__attribute__((target("avx2,fma"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <int MT>
__attribute__((target("avx2,fma"))) void dot_codes_avx2(const uint8_t* w, const int8_t* x, int64_t x_stride,
                                                        int64_t nblocks, int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int h = 0; h < 2; ++h) {  // the block's two 32-byte halves: weights 64 s + 32 h + (0..31)
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes + 32 * h));
      // 16-bit shifts are fine: the mask keeps only bits that stayed inside their own byte.
      const __m256i c0 = _mm256_and_si256(wb, mask);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(wb, 2), mask);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(wb, 6), mask);
      for (int t = 0; t < MT; ++t) {
        const int8_t* xb = x + t * x_stride + b * kBlockWeights + 32 * h;
        // each pair sum is <= 2 * 2 * 128 = 512 in magnitude, four of them fit s16 without saturating
        __m256i p = _mm256_maddubs_epi16(c0, load32(xb));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c1, load32(xb + 64)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c2, load32(xb + 128)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c3, load32(xb + 192)));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
      }
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = hsum_epi32_avx2(acc[t]);
}

// ---- AVX-512 VNNI: vpdpbusd accumulates u8 x s8 quads straight into s32 ----------------------------
template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dot_codes_vnni(const uint8_t* w, const int8_t* x,
                                                                           int64_t x_stride, int64_t nblocks,
                                                                           int32_t* out) {
  const __m512i mask = _mm512_set1_epi8(3);
  // two accumulators per token (s even / odd) halve the vpdpbusd dependency chain
  __m512i acc0[MT], acc1[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm512_setzero_si512();
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512i wb = _mm512_loadu_si512(w + b * kBlockBytes);
    const __m512i c0 = _mm512_and_si512(wb, mask);  // weights 256 b + 0..63
    const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(wb, 2), mask);
    const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
    const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(wb, 6), mask);
    for (int t = 0; t < MT; ++t) {
      const int8_t* xb = x + t * x_stride + b * kBlockWeights;
      acc0[t] = _mm512_dpbusd_epi32(acc0[t], c0, _mm512_loadu_si512(xb));
      acc1[t] = _mm512_dpbusd_epi32(acc1[t], c1, _mm512_loadu_si512(xb + 64));
      acc0[t] = _mm512_dpbusd_epi32(acc0[t], c2, _mm512_loadu_si512(xb + 128));
      acc1[t] = _mm512_dpbusd_epi32(acc1[t], c3, _mm512_loadu_si512(xb + 192));
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0[t], acc1[t]));
}

using DotCodesFn = void (*)(const uint8_t*, const int8_t*, int64_t, int64_t, int32_t*);

// dot[mt - 1] handles a tile of mt tokens, for the widest instruction set allowed here.
struct DotTable {
  DotCodesFn fn[kMaxTokensPerTile];
};

const DotTable& dot_table() {
  static const DotTable table = [] {
    if (use_avx512_vnni()) {
      return DotTable{{dot_codes_vnni<1>, dot_codes_vnni<2>, dot_codes_vnni<3>, dot_codes_vnni<4>}};
    }
    if (use_avx2()) {
      return DotTable{{dot_codes_avx2<1>, dot_codes_avx2<2>, dot_codes_avx2<3>, dot_codes_avx2<4>}};
    }
    return DotTable{{dot_codes_scalar<1>, dot_codes_scalar<2>, dot_codes_scalar<3>, dot_codes_scalar<4>}};
  }();
  return table;
}

// ---- weight-only (fp32 activations) ---------------------------------------------------------------
void unpack_row_f32(const uint8_t* w, int64_t nblocks, float* out) {
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int s = 0; s < 4; ++s) {
      for (int j = 0; j < kBlockBytes; ++j) {
        out[b * kBlockWeights + 64 * s + j] = static_cast<float>(((w[b * kBlockBytes + j] >> (2 * s)) & 3) - 1);
      }
    }
  }
}

// 32 packed bytes (half a block) -> the 4 x 32 weights 64 s + 32 h + (0..31) of block b, as fp32 {-1, 0, 1}
__attribute__((target("avx2,fma"))) void unpack_row_f32_avx2(const uint8_t* w, int64_t nblocks, float* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes + 32 * h));
      const __m256i codes[4] = {_mm256_and_si256(wb, mask), _mm256_and_si256(_mm256_srli_epi16(wb, 2), mask),
                                _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask),
                                _mm256_and_si256(_mm256_srli_epi16(wb, 6), mask)};
      for (int sidx = 0; sidx < 4; ++sidx) {
        alignas(32) uint8_t c[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(c), codes[sidx]);
        float* dst = out + b * kBlockWeights + 64 * sidx + 32 * h;
        for (int q = 0; q < 4; ++q) {
          const __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * q));
          _mm256_storeu_ps(dst + 8 * q, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8)), one));
        }
      }
    }
  }
}

// The same weights as bf16 words: -1, 0, 1 are 0xBF80, 0, 0x3F80 (exact), each byte from a 4-entry table (code 3,
// not ternary, decodes to 2 = 0x4000 as in the reference and every other kernel).
void unpack_row_bf16(const uint8_t* w, int64_t nblocks, uint16_t* out) {
  constexpr uint16_t kWord[4] = {0xBF80, 0x0000, 0x3F80, 0x4000};
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int s = 0; s < 4; ++s) {
      for (int j = 0; j < kBlockBytes; ++j) {
        out[b * kBlockWeights + 64 * s + j] = kWord[(w[b * kBlockBytes + j] >> (2 * s)) & 3];
      }
    }
  }
}

// 32 packed bytes -> 4 x 32 bf16 words: codes look up their low and high bytes (vpshufb), which interleave into
// words; the quadwords are reordered first so that the in-lane interleave leaves the words in order.
__attribute__((target("avx2"))) void unpack_row_bf16_avx2(const uint8_t* w, int64_t nblocks, uint16_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i low = _mm256_setr_epi8(static_cast<char>(0x80), 0, static_cast<char>(0x80), 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0, 0, 0, static_cast<char>(0x80), 0, static_cast<char>(0x80), 0, 0, 0, 0, 0,
                                       0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i high = _mm256_setr_epi8(static_cast<char>(0xBF), 0, 0x3F, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        static_cast<char>(0xBF), 0, 0x3F, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes + 32 * h));
      for (int s = 0; s < 4; ++s) {
        const __m256i codes = _mm256_permute4x64_epi64(
            _mm256_and_si256(_mm256_srli_epi16(wb, 2 * s), mask), 0xD8);  // quadwords 0 2 1 3
        const __m256i lo = _mm256_shuffle_epi8(low, codes), hi = _mm256_shuffle_epi8(high, codes);
        uint16_t* dst = out + b * kBlockWeights + 64 * s + 32 * h;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_unpacklo_epi8(lo, hi));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm256_unpackhi_epi8(lo, hi));
      }
    }
  }
}

// AVX-512, fused: no fp32 weights are materialised. 16 packed bytes widen to 16 int32 lanes; shifted right by
// 2s, each lane's low 4 bits index a 16-entry table whose entry is (index & 3) - 1, so one vpermps turns codes
// into the fp32 weights {-1, 0, 1} (exact) for the FMAs with x: 3 shared ops and one FMA per token for 16 weights.
template <int MT>
__attribute__((target("avx512f,avx512bw"))) void dot_w2_avx512(const uint8_t* w, const float* x, int64_t x_stride,
                                                              int64_t nblocks, float* out) {
  const __m512 code_to_weight = _mm512_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2);
  __m512 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int i = 0; i < 4; ++i) {  // bytes 16 i .. 16 i + 15 of the block: weights 256 b + 64 s + 16 i + (0..15)
      const __m512i bytes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * kBlockBytes + 16 * i)));
      for (int s = 0; s < 4; ++s) {
        const __m512 wv = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 2 * s), code_to_weight);
        for (int t = 0; t < MT; ++t) {
          const __m512 xv = _mm512_loadu_ps(x + t * x_stride + b * kBlockWeights + 64 * s + 16 * i);
          acc[t][s] = _mm512_fmadd_ps(wv, xv, acc[t][s]);
        }
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    out[t] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
  }
}

// The same with 8 lanes: vpermps on AVX2 reads 3 index bits, and the 8-entry table repeats with period 4.
template <int MT>
__attribute__((target("avx2,fma"))) void dot_w2_avx2(const uint8_t* w, const float* x, int64_t x_stride,
                                                     int64_t nblocks, float* out) {
  const __m256 code_to_weight = _mm256_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2);
  __m256 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int s = 0; s < 4; ++s) acc[t][s] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int i = 0; i < 8; ++i) {  // bytes 8 i .. 8 i + 7: weights 256 b + 64 s + 8 i + (0..7)
      const __m256i bytes = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b * kBlockBytes + 8 * i)));
      for (int s = 0; s < 4; ++s) {
        const __m256 wv = _mm256_permutevar8x32_ps(code_to_weight, _mm256_srli_epi32(bytes, 2 * s));
        for (int t = 0; t < MT; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * x_stride + b * kBlockWeights + 64 * s + 8 * i);
          acc[t][s] = _mm256_fmadd_ps(wv, xv, acc[t][s]);
        }
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    const __m256 v = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    out[t] = _mm_cvtss_f32(h);
  }
}

template <int MT>
void dot_w2_scalar(const uint8_t* w, const float* x, int64_t x_stride, int64_t nblocks, float* out) {
  float acc[MT] = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int j = 0; j < kBlockBytes; ++j) {
      const uint8_t byte = w[b * kBlockBytes + j];
      for (int s = 0; s < 4; ++s) {
        const float wv = static_cast<float>(((byte >> (2 * s)) & 3) - 1);
        const int64_t k = b * kBlockWeights + 64 * s + j;
        for (int t = 0; t < MT; ++t) acc[t] += wv * x[t * x_stride + k];
      }
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = acc[t];
}

using DotW2Fn = void (*)(const uint8_t*, const float*, int64_t, int64_t, float*);
constexpr DotW2Fn kDotW2Avx512[kMaxTokensPerTile] = {dot_w2_avx512<1>, dot_w2_avx512<2>, dot_w2_avx512<3>,
                                                     dot_w2_avx512<4>};
constexpr DotW2Fn kDotW2Avx2[kMaxTokensPerTile] = {dot_w2_avx2<1>, dot_w2_avx2<2>, dot_w2_avx2<3>, dot_w2_avx2<4>};
constexpr DotW2Fn kDotW2Scalar[kMaxTokensPerTile] = {dot_w2_scalar<1>, dot_w2_scalar<2>, dot_w2_scalar<3>,
                                                     dot_w2_scalar<4>};


// A row holding a NaN or an infinity: s is NaN (any NaN) or inf, as the reference's amax (the max instructions
// below drop NaN operands), and every x_q is 0 (round(x * 127 / s) is 0 or NaN there; NaN casts to 0), so the
// row's outputs come out NaN as the reference's do, never finite.
template <typename scalar_t>
float quantize_nonfinite_row(const scalar_t* x, int64_t K, int64_t k_pad, int8_t* x_q, int32_t* sum) {
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) nan |= std::isnan(static_cast<float>(x[k]));
  std::memset(x_q, 0, k_pad);
  if (sum != nullptr) *sum = 0;
  return nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
}

// ---- activation quantisation, AVX2 (fp32 and bf16 rows): the same IEEE mul, div and round-half-even ----
__attribute__((target("avx2,fma"))) inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8_f32(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));  // bf16 = the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) float quantize_row_avx2(const scalar_t* x, int64_t K, int64_t k_pad,
                                                            int8_t* x_q, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_and_ps(abs_mask, load8_f32(x + k));
    vmax = _mm256_max_ps(vmax, a);
    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // |x| = inf, or NaN (unordered)
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float amax = _mm_cvtss_f32(m4);
  bool bad = _mm256_movemask_ps(vbad) != 0;
  for (; k < K; ++k) {
    const float a = std::abs(static_cast<float>(x[k]));
    bad |= !std::isfinite(a);
    amax = std::max(amax, a);
  }
  if (bad) return quantize_nonfinite_row(x, K, k_pad, x_q, sum);
  const float s = std::max(amax, 1e-5f);

  const __m256 vs = _mm256_set1_ps(s), v127 = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-128.f);
  __m256i vsum = _mm256_setzero_si256();
  k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_div_ps(_mm256_mul_ps(load8_f32(x + k), v127), vs);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(v127, _mm256_max_ps(lo, v));
    const __m256i q = _mm256_cvtps_epi32(v);  // exact: v is already integral
    vsum = _mm256_add_epi32(vsum, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(x_q + k), _mm_packs_epi16(q16, q16));
  }
  int32_t total = hsum_epi32_avx2(vsum);
  for (; k < K; ++k) {
    const float v = std::nearbyint((static_cast<float>(x[k]) * 127.0f) / s);
    const int32_t q = static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, v)));
    x_q[k] = static_cast<int8_t>(q);
    total += q;
  }
  for (k = K; k < k_pad; ++k) x_q[k] = 0;
  if (sum != nullptr) *sum = total;
  return s;
}

// Output rows split across threads, walked in tiles of kRowTile rows per tile of up to kMaxTokensPerTile tokens,
// so a tile of weights stays in L2 while every token tile reuses it. row(n, t0, mt) computes one row n for
// tokens t0 .. t0 + mt - 1.
template <typename RowFn>
void for_each_row_tile(int64_t m, int64_t N, int64_t grain, const RowFn& row) {
  at::parallel_for(0, N, grain, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r0 = n_begin; r0 < n_end; r0 += kRowTile) {
      const int64_t r1 = std::min(n_end, r0 + kRowTile);
      for (int64_t t0 = 0; t0 < m; t0 += kMaxTokensPerTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kMaxTokensPerTile, m - t0));
        for (int64_t n = r0; n < r1; ++n) row(n, t0, mt);
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
float quantize_row(const scalar_t* x, int64_t K, int64_t k_pad, int8_t* x_q, int32_t* sum) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx2()) return quantize_row_avx2(x, K, k_pad, x_q, sum);
  }
  float amax = 0.f;
  bool bad = false;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::abs(static_cast<float>(x[k]));
    bad |= !std::isfinite(a);
    amax = std::max(amax, a);
  }
  if (bad) return quantize_nonfinite_row(x, K, k_pad, x_q, sum);
  const float s = std::max(amax, 1e-5f);
  int32_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    // (x * 127) / s in fp32, then round half to even: the same order and rounding as every other backend
    const float v = std::nearbyint((static_cast<float>(x[k]) * 127.0f) / s);
    const int32_t q = static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, v)));
    x_q[k] = static_cast<int8_t>(q);
    total += q;
  }
  for (int64_t k = K; k < k_pad; ++k) x_q[k] = 0;
  if (sum != nullptr) *sum = total;
  return s;
}

template float quantize_row<float>(const float*, int64_t, int64_t, int8_t*, int32_t*);
template float quantize_row<double>(const double*, int64_t, int64_t, int8_t*, int32_t*);  // dispatch macro needs it
template float quantize_row<c10::Half>(const c10::Half*, int64_t, int64_t, int8_t*, int32_t*);
template float quantize_row<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int8_t*, int32_t*);

void matmul_int8(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
                 int32_t* acc) {
  // From 12 tokens the register-tiled GEMM wins (it unpacks the weights once per 192 tokens, which costs about
  // a 4-token product; 1 core of Zen 4 at 4096 x 4096: 8 tokens 0.42 vs 0.40 ms, 16 tokens 0.71 vs 0.78, 128
  // tokens 4.5 vs 6.3).
  if (m >= kTiledMinTokens && tiled_int8_available()) {
    matmul_int8_tiled(x_q, xsum, m, w, N, k_pad, acc);
    return;
  }
  const int64_t nblocks = k_pad / kBlockWeights;
  const int64_t row_bytes = k_pad / 4;
  const DotTable& dot = dot_table();
  for_each_row_tile(m, N, row_grain(m, k_pad, 16), [&](int64_t n, int64_t t0, int mt) {
    int32_t out[kMaxTokensPerTile];
    dot.fn[mt - 1](w + n * row_bytes, x_q + t0 * k_pad, k_pad, nblocks, out);
    for (int t = 0; t < mt; ++t) acc[(t0 + t) * N + n] = out[t] - xsum[t0 + t];
  });
}

void matmul_f32(const float* x, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad, float* y) {
  const int64_t nblocks = k_pad / kBlockWeights;
  const int64_t row_bytes = k_pad / 4;
  const DotW2Fn* dot = use_avx512() ? kDotW2Avx512 : use_avx2() ? kDotW2Avx2 : kDotW2Scalar;
  // A weight costs ~2 fp32 ops per token here (vs 1/4 of an int8 op in matmul_int8): worth a thread sooner.
  for_each_row_tile(m, N, row_grain(4 * m, k_pad, 16), [&](int64_t n, int64_t t0, int mt) {
    float out[kMaxTokensPerTile];
    dot[mt - 1](w + n * row_bytes, x + t0 * k_pad, k_pad, nblocks, out);
    for (int t = 0; t < mt; ++t) y[(t0 + t) * N + n] = out[t];
  });
}

void unpack_f32(const uint8_t* w, int64_t N, int64_t k_pad, float* out) {
  const int64_t nblocks = k_pad / kBlockWeights;
  const bool avx2 = use_avx2();
  at::parallel_for(0, N, row_grain(1, k_pad, 1), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      avx2 ? unpack_row_f32_avx2(w + n * (k_pad / 4), nblocks, out + n * k_pad)
           : unpack_row_f32(w + n * (k_pad / 4), nblocks, out + n * k_pad);
    }
  });
}

void unpack_bf16(const uint8_t* w, int64_t N, int64_t k_pad, uint16_t* out) {
  const int64_t nblocks = k_pad / kBlockWeights;
  const bool avx2 = use_avx2();
  at::parallel_for(0, N, row_grain(1, k_pad, 1), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      avx2 ? unpack_row_bf16_avx2(w + n * (k_pad / 4), nblocks, out + n * k_pad)
           : unpack_row_bf16(w + n * (k_pad / 4), nblocks, out + n * k_pad);
    }
  });
}

}  // namespace llmkernels::ternary_cpu
