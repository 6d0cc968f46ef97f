// The int8 ternary GEMM (BitNet's act_bits=8) on AMX tiles (Sapphire Rapids and later): tdpbssd multiplies 16 x 64
// int8 by 64 x 16 int8 into 16 x 16 int32 in one instruction, exactly, at four times the multiply-adds per cycle of
// the bf16 tiles' fp32 sums.
//
// The product is taken transposed, acc^T = W x_q^T, so that the weights are the tiles' A operand: A wants rows of
// 64 consecutive K values, which is what one 64-byte packed block gives for each of its 4 two-bit fields (bytes j
// of a block hold weights 64 s + j at bits 2 s). A strip of 32 output features is unpacked once into signed int8
// rows ({-1, 0, 1}: no activation-sum correction), and serves every token. The activations become the B operand
// once per call: words of 4 consecutive K values of a token, as (K / 4, tokens) (a 16 x 16 word transpose of
// x_q). Each 32 x 32 block of acc^T (2 x 2 tiles) is stored, transposed back, into acc.
//
// The host (ternary_cpu.cpp) checks for AMX-INT8 and the tile permission (common/cpu_amx.h), lays out B once, and
// runs the strips over its threads; each call here configures its thread's tiles. (The target names AMX-BF16 too
// only because common/cpu_amx_tiles.h defines the bf16 product; nothing here uses it.)
#include <cstdint>
#include <cstring>

#include "ternary/cpu/ternary_cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,amx-tile,amx-int8,amx-bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,amx-tile,amx-int8,amx-bf16")
#endif

namespace {

#include "common/cpu_simd_avx512.h"

#include "common/cpu_amx_tiles.h"

using llmkernels::ternary_cpu::Int8Out;
using llmkernels::ternary_cpu::kBlockBytes;
using llmkernels::ternary_cpu::kBlockWeights;

constexpr int64_t kChunk = 512;  // K values per pass of a strip over a token panel

// Rows [n0, n0 + rows) of the packed weights as signed int8, k_pad each, `ld` bytes apart (rows from N on: zero).
void unpack_strip(const uint8_t* w, int64_t N, int64_t k_pad, int64_t n0, int64_t rows, int8_t* strip, int64_t ld) {
  const int64_t row_bytes = k_pad / 4;
  const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* dst = strip + r * ld;
    if (n0 + r >= N) {
      std::memset(dst, 0, k_pad);
      continue;
    }
    const uint8_t* src = w + (n0 + r) * row_bytes;
    for (int64_t b = 0; b < k_pad / kBlockWeights; ++b) {
      const __m512i packed = _mm512_loadu_si512(src + b * kBlockBytes);
      for (int s = 0; s < 4; ++s) {  // (bits shifted in from the next byte are masked off)
        const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(packed, 2 * s), three);
        _mm512_storeu_si512(dst + b * kBlockWeights + 64 * s, _mm512_sub_epi8(codes, one));
      }
    }
  }
}

// Token t's accumulators of features n .. n + 15 (lanes) into `out`: as int32, or finished as in linear_a8_cpu's
// epilogue (a product, then the bias: the same two fp32 roundings; then one to the output dtype, to nearest even).
void store_outputs(const Int8Out& out, __m512i acc, int64_t t, int64_t n, int64_t N, __mmask16 lanes) {
  const int64_t at = t * N + n;
  if (out.acc != nullptr) {
    _mm512_mask_storeu_epi32(out.acc + at, lanes, acc);
    return;
  }
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(out.row_scale[t]));
  if (out.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(lanes, out.bias + n));
  if (out.dtype == 0) {
    _mm512_mask_storeu_ps(static_cast<float*>(out.y) + at, lanes, y);
  } else {
    const __m256i half = out.dtype == 1 ? (__m256i)_mm512_cvtneps_pbh(y)
                                        : _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + at, lanes, half);
  }
}

}  // namespace

namespace llmkernels::ternary_cpu {

void activations_as_amx_b(const int8_t* x_q, int64_t m, int64_t k_pad, uint32_t* xt) {
  const int64_t quads = k_pad / 4, m32 = (m + 31) / 32 * 32;  // words per token row
  for (int64_t t0 = 0; t0 < m32; t0 += 16) {
    uint32_t* panel = xt + (t0 / 32) * quads * 32 + t0 % 32;
    for (int64_t q0 = 0; q0 < quads; q0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = t0 + i < m ? _mm512_loadu_si512(x_q + (t0 + i) * k_pad + 4 * q0) : _mm512_setzero_si512();
      }
      SimdAvx512::transpose_words(r);  // r[j]: word q0 + j of tokens t0 .. t0 + 15
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (q0 + j) * 32, r[j]);
    }
  }
}

void matmul_int8_amx_strip(const uint32_t* xt, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad, int64_t n0,
                           int64_t features, int8_t* strip, const Int8Out& out) {
  const AmxTiles tiles;
  const int64_t quads = k_pad / 4, lda = k_pad + 64;  // (rows k_pad apart would share L1 sets when it is 2^k)
  unpack_strip(w, N, k_pad, n0, features, strip, lda);
  int32_t* partial = reinterpret_cast<int32_t*>(strip + features * lda);  // (features / 32) blocks of 4 tiles
  alignas(64) int32_t block[4][16][16];
  for (int64_t t0 = 0; t0 < m; t0 += 32) {
    const uint32_t* panel = xt + (t0 / 32) * quads * 32;  // this panel's 32 tokens, (quads, 32) words
    // K in chunks whose slice of the panel (32 tokens x kChunk bytes, 16 KB) stays in L1 while the strip's
    // features pass it; sums carry over between chunks in `partial`.
    for (int64_t kc = 0; kc < k_pad; kc += kChunk) {
      const int64_t kend = kc + kChunk < k_pad ? kc + kChunk : k_pad;
      for (int64_t f = 0; f < features; f += 32) {
        const int8_t* a = strip + f * lda;
        int32_t* carry = partial + f * 32;  // 4 tiles of 16 x 16
        if (kc == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, carry, 64);
          _tile_loadd(1, carry + 256, 64);
          _tile_loadd(2, carry + 512, 64);
          _tile_loadd(3, carry + 768, 64);
        }
        for (int64_t k = kc; k < kend; k += 64) {
          _tile_loadd(4, a + k, lda);                     // features n0 + f .. + 15
          _tile_loadd(5, a + 16 * lda + k, lda);          // features n0 + f + 16 .. + 31
          _tile_loadd(6, panel + (k / 4) * 32, 128);       // tokens t0 .. t0 + 15
          _tile_loadd(7, panel + (k / 4) * 32 + 16, 128);  // tokens t0 + 16 .. t0 + 31
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        if (kend < k_pad) {
          _tile_stored(0, carry, 64);
          _tile_stored(1, carry + 256, 64);
          _tile_stored(2, carry + 512, 64);
          _tile_stored(3, carry + 768, 64);
          continue;
        }
        _tile_stored(0, block[0], 64);
        _tile_stored(1, block[1], 64);
        _tile_stored(2, block[2], 64);
        _tile_stored(3, block[3], 64);
        for (int c = 0; c < 4; ++c) {  // tile c: features n0 + f + 16 (c / 2) .., tokens t0 + 16 (c % 2) ..
          __m512i r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(block[c][i]);
          SimdAvx512::transpose_words(r);  // r[j]: token j's 16 features
          const int64_t n = n0 + f + 16 * (c / 2), t = t0 + 16 * (c % 2);
          if (n >= N) continue;
          const __mmask16 lanes = N - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
          for (int j = 0; j < 16 && t + j < m; ++j) store_outputs(out, r[j], t + j, n, N, lanes);
        }
      }
    }
  }
}

}  // namespace llmkernels::ternary_cpu

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the host finds no AMX)
namespace llmkernels::ternary_cpu {
void activations_as_amx_b(const int8_t*, int64_t, int64_t, uint32_t*) {}
void matmul_int8_amx_strip(const uint32_t*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*,
                           const Int8Out&) {}
}  // namespace llmkernels::ternary_cpu
#endif
