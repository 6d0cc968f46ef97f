// Register-tiled ternary GEMMs for several tokens on AVX-512: the int8 one (BitNet's act_bits=8, on VNNI
// vpdpbusd) and the weight-only one for bf16 activations (on AVX512-BF16 vdpbf16ps). The fused GEMVs of
// ternary_cpu_kernels.cpp unpack every weight again for each tile of 4 tokens and load an activation vector
// per multiply; here the weights are unpacked once per call and each loaded weight vector serves 6 tokens.
//
// Layout: a strip of 64 output features is unpacked, one packed block (256 weights) at a time, into 32-bit words,
// strip[i][n] = the weights of feature n that one multiply-add takes together: 4 consecutive codes c = w + 1 as
// u8 (vpdpbusd's unsigned operand; sum_k c x = sum_k w x + sum_k x, the activation sum subtracted at the end,
// exact in int32), or 2 consecutive weights as a bf16 pair (vdpbf16ps). An activation row's words (4 int8 /
// 2 bf16) are read in place and broadcast. A tile of up to 6 tokens x 64 features (24 zmm accumulators + 4
// weight registers) walks the block's words while they sit in L1; sums carry over to the next block through a
// per-thread buffer, and the last block's go through the epilogue. Tokens go in panels (see strip_gemm).
//
// Speed (1 core of the 2-core Zen 4 VM): int8 0.75-0.8 TOPS at 16-24 tokens, 0.95 from ~128 (the per-row GEMV:
// 0.55-0.7 at any count); bf16 weight-only ~0.46 TFLOP/s, about bf16 F.linear (oneDNN). Unpacking costs about as
// much as a 4-token product, hence the token thresholds of the callers.
//
// Why bf16 is special: a bf16 activation and a weight in {-1, 0, 1} are both exact bf16 numbers, so their
// product is exact in fp32 and vdpbf16ps computes the very sum of the fp32 reference, x.float() @ W.float().T,
// up to summation order, at twice the rate of fp32 FMAs (converting x to fp32 for an fp32 GEMM, as other
// dtypes do, ran at a fifth of the speed of bf16 F.linear). (vdpbf16ps treats subnormal bf16 inputs, below 1.2e-38,
// as zero: a difference from the reference only for outputs of that size times gamma.)
//
// Unpacking: a 16 x 16 word transpose (SimdAvx512::transpose_words) of one packed block of 16 weight rows (64
// bytes each) brings the same 4 bytes of the 16 rows into the 16 lanes of a register (a dword gather per register
// instead took ~1.7x as long on Zen 4). Byte j of a block holds its weights 64 s + j at bits 2 s, so bytes
// 4 q .. 4 q + 3 hold weights 64 s + 4 q + (0..3) for each s: a shift and a mask give the 4 codes as u8; the bf16
// pairs take one 16-entry table lookup (vpermd) on the two codes of each pair.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "ternary/cpu/ternary_cpu_kernels.h"

// Everything below is compiled for AVX-512 with VNNI and BF16 (one target for both kinds, as templates share
// it); each kind is only called where the CPU has its own extension, and the int8 code uses no bf16
// instructions (nor the bf16 code VNNI ones).
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,avx2,fma")
#endif

namespace llmkernels::ternary_cpu {

namespace {

#include "common/cpu_simd_avx512.h"

constexpr int kLanes = 16;
constexpr int kStripRegs = 4;
constexpr int64_t kStripFeatures = kLanes * kStripRegs;  // 64 output features per strip
constexpr int kTileTokens = 6;
constexpr int64_t kTokenPanel = 32 * kTileTokens;  // tokens whose activations and running sums stay in L2

// The activations (int8 or bf16 rows) read as 32-bit words: may alias any type, and rows of views may start at
// any 2-byte boundary.
typedef uint32_t __attribute__((may_alias, aligned(2))) word_t;

// vpdpbusd on codes: words of 4 codes, int32 accumulators, out = acc - the token's activation sum.
struct Int8Codes {
  using acc_t = __m512i;
  static constexpr int kWeightsPerWord = 4;
  struct Epilogue {
    const int32_t* xsum;  // per token
    int32_t* out;         // (m, N) row-major
  };
  static acc_t zero() { return _mm512_setzero_si512(); }
  // acc += codes (u8) . x (s8) per 4 bytes: vpdpbusd in inline asm, because GCC 12 copies the accumulator of
  // _mm512_dpbusd_epi32 into a fresh register each time, which with 24 accumulators spills them all to the stack
  static acc_t step(acc_t acc, __m512i x, __m512i w) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
  }
  static acc_t load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void keep(uint32_t* p, acc_t acc) { _mm512_storeu_si512(p, acc); }
  // one group of 16 features: the 4 words of dword q of the block, per s, are its words 16 s + q
  static void unpack(__m512i v, int q, uint32_t* strip, int64_t lane0) {
    const __m512i two_bits = _mm512_set1_epi8(3);
    for (int s = 0; s < 4; ++s) {
      const int64_t word = 16 * s + q;
      _mm512_storeu_si512(strip + word * kStripFeatures + lane0,
                          _mm512_and_si512(_mm512_srli_epi32(v, 2 * s), two_bits));
    }
  }
  static void store(const Epilogue& e, acc_t acc, int64_t t, int64_t n, __mmask16 mask, int64_t N) {
    _mm512_mask_storeu_epi32(e.out + t * N + n, mask, _mm512_sub_epi32(acc, _mm512_set1_epi32(e.xsum[t])));
  }
};

// The bf16 pair word of table index lo | hi << 2 (two 2-bit codes; code 3, not ternary, decodes to 2).
constexpr int32_t pair_word(int i) {
  constexpr uint32_t bf16_of_code[4] = {0xBF80u, 0x0000u, 0x3F80u, 0x4000u};
  return static_cast<int32_t>(bf16_of_code[i & 3] | (bf16_of_code[i >> 2] << 16));
}

// vdpbf16ps on bf16 pairs, fp32 accumulators, out = bf16(acc * gamma + bias) in the reference's order.
struct Bf16Pairs {
  using acc_t = __m512;
  static constexpr int kWeightsPerWord = 2;
  struct Epilogue {
    float gamma;
    const float* bias;  // (N,) or null
    uint16_t* out;      // (m, N) bf16 row-major
  };
  static acc_t zero() { return _mm512_setzero_ps(); }
  static acc_t step(acc_t acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  static acc_t load(const uint32_t* p) { return _mm512_loadu_ps(p); }
  static void keep(uint32_t* p, acc_t acc) { _mm512_storeu_ps(p, acc); }
  // the block's pair (64 s + 4 q + 2 h, + 1) is its word 32 s + 2 q + h; its codes sit at bits 16 h + 2 s and
  // 16 h + 8 + 2 s, and lo | hi << 2 indexes the table of pair words
  static void unpack(__m512i v, int q, uint32_t* strip, int64_t lane0) {
    const __m512i table = _mm512_setr_epi32(pair_word(0), pair_word(1), pair_word(2), pair_word(3), pair_word(4),
                                            pair_word(5), pair_word(6), pair_word(7), pair_word(8), pair_word(9),
                                            pair_word(10), pair_word(11), pair_word(12), pair_word(13),
                                            pair_word(14), pair_word(15));
    const __m512i two_bits = _mm512_set1_epi32(3), high_bits = _mm512_set1_epi32(12);
    for (int s = 0; s < 4; ++s) {
      for (int h = 0; h < 2; ++h) {
        const int shift = 16 * h + 2 * s;
        const __m512i idx = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v, shift), two_bits),
                                            _mm512_and_si512(_mm512_srli_epi32(v, shift + 6), high_bits));
        const int64_t word = 32 * s + 2 * q + h;
        _mm512_storeu_si512(strip + word * kStripFeatures + lane0, _mm512_permutexvar_epi32(idx, table));
      }
    }
  }
  static void store(const Epilogue& e, acc_t acc, int64_t t, int64_t n, __mmask16 mask, int64_t N) {
    const __m512 b = e.bias != nullptr ? _mm512_maskz_loadu_ps(mask, e.bias + n) : _mm512_setzero_ps();
    // the reference's order, * gamma then + bias, each rounded: the explicit-rounding forms are never fused into
    // an FMA (GCC contracts a plain mul and add)
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 y = _mm512_add_round_ps(_mm512_mul_round_ps(acc, _mm512_set1_ps(e.gamma), kRound), b, kRound);
    _mm256_mask_storeu_epi16(e.out + t * N + n, mask, (__m256i)_mm512_cvtneps_pbh(y));
  }
};

// One packed block (64 bytes a row, at w, rows row_bytes apart) of features f0 .. f0 + valid - 1 (valid <= 16)
// into lanes lane0 .. lane0 + 15 of the block's strip; rows >= valid read as code 1 (weight 0) in every field.
template <typename Kind>
void unpack_group(const uint8_t* w, int64_t row_bytes, int valid, uint32_t* strip, int64_t lane0) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < valid ? _mm512_loadu_si512(w + i * row_bytes) : _mm512_set1_epi32(0x55555555);
  }
  SimdAvx512::transpose_words(r);
  for (int q = 0; q < kBlockBytes / 4; ++q) Kind::unpack(r[q], q, strip, lane0);
}

// Tokens t0 .. t0 + R - 1 against one block's strip of features f0 .. f0 + features - 1 (features <= 64): x and
// `words` point at the block's first word. Running sums between blocks live in `partial` (64 per token, rows
// of the tile); the first block starts from zero and the last one hands its sums to the epilogue.
template <typename Kind, int R>
void tile(const word_t* x, int64_t x_words, int64_t words, const uint32_t* strip, uint32_t* partial, bool first,
          bool last, const typename Kind::Epilogue& e, int64_t t0, int64_t f0, int64_t features, int64_t N) {
  // Every loop over r and v unrolls (no early exit), so that GCC keeps the accumulators in registers instead of
  // an array on the stack written back each step (which halved the speed).
  typename Kind::acc_t acc[R][kStripRegs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kStripRegs; ++v) {
      acc[r][v] = first ? Kind::zero() : Kind::load(partial + r * kStripFeatures + kLanes * v);
    }
  }
  for (int64_t i = 0; i < words; ++i) {
    __m512i wv[kStripRegs];
#pragma GCC unroll 4
    for (int v = 0; v < kStripRegs; ++v) wv[v] = _mm512_loadu_si512(strip + i * kStripFeatures + kLanes * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int32_t>(x[(t0 + r) * x_words + i]));
#pragma GCC unroll 4
      for (int v = 0; v < kStripRegs; ++v) acc[r][v] = Kind::step(acc[r][v], xv, wv[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kStripRegs; ++v) {
    const int64_t lanes = std::clamp<int64_t>(features - kLanes * v, 0, kLanes);  // 0: an all-false mask
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (last) {
        Kind::store(e, acc[r][v], t0 + r, f0 + kLanes * v, mask, N);
      } else {
        Kind::keep(partial + r * kStripFeatures + kLanes * v, acc[r][v]);
      }
    }
  }
}

template <typename Kind, int R, typename... Args>
void tile_tail(int rest, Args... args) {
  if constexpr (R > 0) {
    if (rest == R) {
      tile<Kind, R>(args...);
    } else {
      tile_tail<Kind, R - 1>(rest, args...);
    }
  }
}

// x: m rows of x_words 32-bit words, of which the first `words` are used (the weights past them are padding).
// Tasks are (panel of up to kTokenPanel tokens, strip of 64 features), split across threads panel-major, so a
// thread's activations and running sums stay in L2 across its strips (one pass over all m tokens per strip
// re-read them from memory per strip and per block: 2x slower at 8k tokens). Within a task the weights are
// unpacked one packed block at a time into a buffer that stays in L1 (16 KB int8, 32 KB bf16) while every token
// tile runs over it: unpacking a whole strip first instead wrote and re-read it through L2, which cost more than a
// 1-token product. A panel costs one unpacking of its strips: ~2% of a full panel's products.
template <typename Kind>
void strip_gemm(const word_t* x, int64_t m, int64_t x_words, int64_t words, const uint8_t* w, int64_t N,
                int64_t k_pad, const typename Kind::Epilogue& e) {
  constexpr int64_t kBlockWords = kBlockWeights / Kind::kWeightsPerWord;
  const int64_t row_bytes = k_pad / 4;
  const int64_t nstrips = (N + kStripFeatures - 1) / kStripFeatures, npanels = (m + kTokenPanel - 1) / kTokenPanel;
  const int64_t panel_tokens = std::min(m, kTokenPanel);
  const int64_t tasks = npanels * nstrips;
  const double macs = static_cast<double>(m) * static_cast<double>(k_pad) * static_cast<double>(N);
  at::parallel_for(0, tasks, parallel_grain(tasks, macs, 1 << 20), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> strip(static_cast<size_t>(kBlockWords * kStripFeatures));
    std::vector<uint32_t> partial(static_cast<size_t>(panel_tokens * kStripFeatures));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = task / nstrips * kTokenPanel, t1 = std::min(m, t0 + kTokenPanel);
      const int64_t f0 = task % nstrips * kStripFeatures, features = std::min(kStripFeatures, N - f0);
      for (int64_t w0 = 0; w0 < words; w0 += kBlockWords) {
        const uint8_t* block = w + f0 * row_bytes + w0 / kBlockWords * kBlockBytes;
        for (int64_t g = 0; g < kStripRegs; ++g) {
          const int valid = static_cast<int>(std::clamp<int64_t>(features - kLanes * g, 0, kLanes));
          // lanes of no feature keep whatever they hold: their sums are never stored
          if (valid > 0) unpack_group<Kind>(block + kLanes * g * row_bytes, row_bytes, valid, strip.data(), kLanes * g);
        }
        const int64_t nwords = std::min(kBlockWords, words - w0);
        const bool first = w0 == 0, last = w0 + kBlockWords >= words;
        int64_t t = t0;
        for (; t + kTileTokens <= t1; t += kTileTokens) {
          tile<Kind, kTileTokens>(x + w0, x_words, nwords, strip.data(), partial.data() + (t - t0) * kStripFeatures,
                                  first, last, e, t, f0, features, N);
        }
        tile_tail<Kind, kTileTokens - 1>(static_cast<int>(t1 - t), x + w0, x_words, nwords, strip.data(),
                                         partial.data() + (t - t0) * kStripFeatures, first, last, e, t, f0, features,
                                         N);
      }
    }
  });
}

}  // namespace

void matmul_int8_tiled(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
                       int32_t* acc) {
  const Int8Codes::Epilogue e{xsum, acc};
  strip_gemm<Int8Codes>(reinterpret_cast<const word_t*>(x_q), m, k_pad / 4, k_pad / 4, w, N, k_pad, e);
}

void linear_w2_bf16(const uint16_t* x, int64_t m, int64_t k_even, const uint8_t* w, int64_t N, int64_t k_pad,
                    float gamma, const float* bias, uint16_t* out) {
  const Bf16Pairs::Epilogue e{gamma, bias, out};
  strip_gemm<Bf16Pairs>(reinterpret_cast<const word_t*>(x), m, k_even / 2, k_even / 2, w, N, k_pad, e);
}

}  // namespace llmkernels::ternary_cpu

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace llmkernels::ternary_cpu {

// Outside the AVX-512 region: every CPU runs these (cpu_features() inlined under that target was compiled with
// AVX-512 instructions, an illegal instruction on the AVX2-only CPUs that ask).
bool tiled_int8_available() { return use_avx512_vnni(); }
bool bf16_linear_w2_available() { return use_avx512() && cpu_features().avx512bf16; }

}  // namespace llmkernels::ternary_cpu
