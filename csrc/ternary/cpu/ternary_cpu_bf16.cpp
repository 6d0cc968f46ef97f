// Weight-only ternary linear for bf16 activations on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later).
//
// Why bf16 is special: a bf16 activation and a weight in {-1, 0, 1} are both exact bf16 numbers, so their
// product is exact in fp32, and vdpbf16ps (two bf16 products per fp32 lane, added in fp32) computes the very
// sum of the fp32 reference, x.float() @ W.float().T, up to summation order, at twice the rate of fp32 FMAs.
// (Converting x to fp32 for an fp32 GEMM, as other dtypes do, ran at a fifth of the speed of bf16 F.linear.)
//
// Layout: the weights of a strip of 64 output features are unpacked into pair words, strip[p][n] = the bf16
// pair (W[n][2p], W[n][2p + 1]) as one 32-bit lane, which is vdpbf16ps's operand shape; an activation row's
// bf16 pairs are read in place as 32-bit words and broadcast. A tile of up to 6 tokens x 64 features (24 zmm
// accumulators) walks all pairs, so the strip is unpacked once per call and reused by every token tile from
// L2, and each accumulator lands once, scaled by gamma (+ bias) and rounded to bf16, in the output.
//
// Unpacking: one dword gather per (16 features, 4 packed bytes) brings the same 4 bytes of 16 weight rows
// into the 16 lanes (no transpose); the 8 pairs those bytes hold each turn into a vector of pair words by
// one 16-entry table lookup (vpermd) on the two 2-bit codes of the pair.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "ternary/cpu/ternary_cpu_kernels.h"

namespace llmkernels::ternary_cpu {

namespace {

constexpr int kLanes = 16;
constexpr int kStripRegs = 4;
constexpr int64_t kStripFeatures = kLanes * kStripRegs;  // 64 output features per strip
constexpr int kTileTokens = 6;                           // 6 x 4 accumulators + 4 weight registers

#define LLMK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// bf16 bit patterns of the weight of each 2-bit code (code 3 is not ternary: it decodes to 2 like elsewhere).
constexpr uint32_t kCodeToBf16[4] = {0xBF80u, 0x0000u, 0x3F80u, 0x4000u};

// Pair word of a 4-bit index lo | hi << 2: bf16(code lo) in the low half, bf16(code hi) in the high half.
LLMK_BF16_TARGET __m512i pair_word_table() {
  alignas(64) uint32_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = kCodeToBf16[i & 3] | (kCodeToBf16[i >> 2] << 16);
  return _mm512_load_si512(t);
}

// strip[p * 64 + lane0 + i] for features f0 + i (i < valid; the rest weight 0) and every pair p of the packed
// row. Byte j of block b holds weights 256 b + 64 s + j at bits 2 s, so the dword of bytes 4 q .. 4 q + 3 holds
// the pairs (256 b + 64 s + 4 q + 2 h, + 1), h = 0, 1, at bits 16 h + 2 s (low weight) and 16 h + 8 + 2 s (high).
LLMK_BF16_TARGET void unpack_strip_lanes(const uint8_t* w, int64_t row_bytes, int64_t nblocks, int valid,
                                         uint32_t* strip, int64_t lane0) {
  const __m512i table = pair_word_table();
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  const __mmask16 rows = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512i weight_zero = _mm512_set1_epi32(0x55555555);  // code 1 in every field
  const __m512i two_bits = _mm512_set1_epi32(3), high_bits = _mm512_set1_epi32(12);
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int q = 0; q < kBlockBytes / 4; ++q) {
      const __m512i v =
          _mm512_mask_i32gather_epi32(weight_zero, rows, row_offsets, w + b * kBlockBytes + 4 * q, 1);
      for (int s = 0; s < 4; ++s) {
        for (int h = 0; h < 2; ++h) {
          const int shift = 16 * h + 2 * s;
          // lo | hi << 2, the hi code shifted down to bits 2..3 (vpermd reads the low 4 bits)
          const __m512i idx = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v, shift), two_bits),
                                              _mm512_and_si512(_mm512_srli_epi32(v, shift + 6), high_bits));
          const int64_t p = 128 * b + 32 * s + 2 * q + h;
          _mm512_storeu_si512(strip + p * kStripFeatures + lane0, _mm512_permutexvar_epi32(idx, table));
        }
      }
    }
  }
}

// out[t][f0 + 16 v + i] for R tokens: gamma * sum_p x[t] pair p . strip[p] (+ bias), rounded to bf16.
template <int R>
LLMK_BF16_TARGET void tile_tokens(const uint32_t* x, int64_t x_words, int64_t pairs, const uint32_t* strip,
                                  float gamma, const float* bias, int64_t features, uint16_t* out, int64_t N) {
  __m512 acc[R][kStripRegs];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kStripRegs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[kStripRegs];
    for (int v = 0; v < kStripRegs; ++v) {
      wv[v] = (__m512bh)_mm512_loadu_si512(strip + p * kStripFeatures + kLanes * v);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[r * x_words + p]));
      for (int v = 0; v < kStripRegs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, wv[v]);
    }
  }
  const __m512 g = _mm512_set1_ps(gamma);
  for (int v = 0; v < kStripRegs; ++v) {
    const int64_t lanes = std::min<int64_t>(kLanes, features - kLanes * v);
    if (lanes <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + kLanes * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(acc[r][v], g), b);  // the reference's order: * gamma, + bias
      _mm256_mask_storeu_epi16(out + r * N + kLanes * v, mask, (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

template <int R>
LLMK_BF16_TARGET void tile_tail(int rest, const uint32_t* x, int64_t x_words, int64_t pairs, const uint32_t* strip,
                                float gamma, const float* bias, int64_t features, uint16_t* out, int64_t N) {
  if constexpr (R > 0) {
    if (rest == R) {
      tile_tokens<R>(x, x_words, pairs, strip, gamma, bias, features, out, N);
    } else {
      tile_tail<R - 1>(rest, x, x_words, pairs, strip, gamma, bias, features, out, N);
    }
  }
}

}  // namespace

bool bf16_linear_w2_available() { return use_avx512() && cpu_features().avx512bf16; }

void linear_w2_bf16(const uint16_t* x, int64_t m, int64_t k_even, const uint8_t* w, int64_t N, int64_t k_pad,
                    float gamma, const float* bias, uint16_t* out) {
  const int64_t row_bytes = k_pad / 4, nblocks = k_pad / kBlockWeights, pairs = k_even / 2;
  const int64_t nstrips = (N + kStripFeatures - 1) / kStripFeatures;
  const auto* xw = reinterpret_cast<const uint32_t*>(x);
  // a strip is worth a thread from ~1M MACs on (its unpacking alone is ~k_pad / 4 gathers)
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, m * k_pad * kStripFeatures));
  at::parallel_for(0, nstrips, grain, [&](int64_t s_begin, int64_t s_end) {
    std::vector<uint32_t> strip(static_cast<size_t>(k_pad / 2 * kStripFeatures));
    for (int64_t s = s_begin; s < s_end; ++s) {
      const int64_t f0 = s * kStripFeatures, features = std::min(kStripFeatures, N - f0);
      for (int64_t g = 0; g < kStripRegs; ++g) {
        const int valid = static_cast<int>(std::clamp<int64_t>(features - kLanes * g, 0, kLanes));
        unpack_strip_lanes(w + (f0 + kLanes * g) * row_bytes, row_bytes, nblocks, valid, strip.data(), kLanes * g);
      }
      const float* strip_bias = bias != nullptr ? bias + f0 : nullptr;
      int64_t t = 0;
      for (; t + kTileTokens <= m; t += kTileTokens) {
        tile_tokens<kTileTokens>(xw + t * pairs, pairs, pairs, strip.data(), gamma, strip_bias, features,
                                 out + t * N + f0, N);
      }
      tile_tail<kTileTokens - 1>(static_cast<int>(m - t), xw + t * pairs, pairs, pairs, strip.data(), gamma,
                                 strip_bias, features, out + t * N + f0, N);
    }
  });
}

}  // namespace llmkernels::ternary_cpu
