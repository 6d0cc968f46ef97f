// The ternary GEMMs for several tokens on AMX tiles (Sapphire Rapids and later): BitNet's int8 product (tdpbssd:
// 16 x 64 int8 by 64 x 16 int8 into 16 x 16 int32 in one instruction, exactly) and the weight-only product for
// bf16 activations (tdpbf16ps: 16 x 32 bf16 pairs into fp32; a bf16 activation times a weight in {-1, 0, 1} is
// exact, so this is the fp32 reference up to summation order).
//
// The product is taken transposed, y^T = W x^T, so that the weights are the tiles' A operand: A wants rows of
// consecutive K values, which is what one 64-byte packed block gives for each of its 4 two-bit fields (bytes j
// of a block hold weights 64 s + j at bits 2 s), as int8 {-1, 0, 1} or as bf16 words. A strip of output features
// is unpacked once and serves every token. The activations become the B operand once per call: 32-bit words of
// 4 int8 / 2 bf16 consecutive K values of one token, in panels of 32 tokens, (K words, 32) each (16 x 16 word
// transposes). fp32 / fp16 activations go to the bf16 tiles as 3 / 2 bf16 planes whose sum is x exactly (x_hi =
// bf16(x), then the same of the remainders): every product with a ternary weight stays exact, so the sums are
// an fp32 GEMM's up to order; each A tile, loaded once, meets every plane's B tiles. K goes in chunks whose slice of a panel (16 KB) stays in L1 while the strip's features pass it,
// the sums carried over in memory; each finished 32 x 32 block (2 x 2 tiles) is transposed back and stored
// through the epilogue: int32 sums, or the layer's outputs (scale, bias, the output dtype).
//
// The host (ternary_cpu.cpp) checks for the AMX kind and the tile permission (common/cpu_amx.h), lays out B once,
// and runs the strips over its threads; each call here configures its thread's tiles.
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

using llmkernels::ternary_cpu::AmxKind;
using llmkernels::ternary_cpu::kBlockBytes;
using llmkernels::ternary_cpu::kBlockWeights;
using llmkernels::ternary_cpu::TileOut;

constexpr int64_t kChunkWords = 128;  // K words of all planes per pass of a strip over a token panel (16 KB)

// Rows [n0, n0 + rows) of the packed weights unpacked for the A tiles, `ld` bytes apart (rows from N on: zero):
// k_pad int8 in {-1, 0, 1}, or k_pad bf16 words (0xbf80, 0, 0x3f80). (A code 3, which packing never writes, gives
// 2 as in the reference.)
template <AmxKind kind>
void unpack_strip(const uint8_t* w, int64_t N, int64_t k_pad, int64_t n0, int64_t rows, uint8_t* strip, int64_t ld) {
  const int64_t row_bytes = k_pad / 4;
  const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  // code c -> bf16 of c - 1; code 3 (not ternary) decodes to 2 as in the reference and the other kernels
  const __m512i bf16_of_code = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                0, 0, 0, 0, 0, 0x4000, 0x3f80, 0, static_cast<short>(0xbf80));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = strip + r * ld;
    if (n0 + r >= N) {
      std::memset(dst, 0, kind == AmxKind::kInt8 ? k_pad : 2 * k_pad);
      continue;
    }
    const uint8_t* src = w + (n0 + r) * row_bytes;
    for (int64_t b = 0; b < k_pad / kBlockWeights; ++b) {
      const __m512i packed = _mm512_loadu_si512(src + b * kBlockBytes);
      for (int s = 0; s < 4; ++s) {  // weights 256 b + 64 s + (0..63); bits shifted in from the next byte masked off
        const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(packed, 2 * s), three);
        const int64_t k = b * kBlockWeights + 64 * s;
        if constexpr (kind == AmxKind::kInt8) {
          _mm512_storeu_si512(dst + k, _mm512_sub_epi8(codes, one));
        } else {
          uint16_t* words = reinterpret_cast<uint16_t*>(dst) + k;
          const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes));
          const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1));
          _mm512_storeu_si512(words, _mm512_permutexvar_epi16(lo, bf16_of_code));
          _mm512_storeu_si512(words + 32, _mm512_permutexvar_epi16(hi, bf16_of_code));
        }
      }
    }
  }
}

// Token t's sums for features n .. n + 15 (lanes) into `out`: as int32, or finished as the host epilogues do (a
// product by the token's or the layer's scale, then the bias: the same two fp32 roundings; then one to the output
// dtype, to nearest even).
void store_outputs(const TileOut& out, __m512 sums, int64_t t, int64_t n, int64_t N, __mmask16 lanes) {
  const int64_t at = t * N + n;
  if (out.acc != nullptr) {
    _mm512_mask_storeu_epi32(out.acc + at, lanes, _mm512_castps_si512(sums));  // (int32 sums, passed as bits)
    return;
  }
  __m512 y = _mm512_mul_ps(sums, _mm512_set1_ps(out.row_scale != nullptr ? out.row_scale[t] : out.scale));
  if (out.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(lanes, out.bias + n));
  if (out.dtype == 0) {
    _mm512_mask_storeu_ps(static_cast<float*>(out.y) + at, lanes, y);
  } else {
    const __m256i half = out.dtype == 1 ? (__m256i)_mm512_cvtneps_pbh(y)
                                        : _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + at, lanes, half);
  }
}

template <AmxKind kind>
void strip_product(const uint32_t* xt, int planes, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad, int64_t n0,
                   int64_t features, uint8_t* scratch, const TileOut& out) {
  const AmxTiles tiles;
  // K in 32-bit words: 4 int8 or 2 bf16 weights each; a tile row holds 16 of them.
  const int64_t words = kind == AmxKind::kInt8 ? k_pad / 4 : k_pad / 2;
  const int64_t lda = 4 * words + 64;  // bytes (rows 4 * words apart would share L1 sets when that is 2^k)
  unpack_strip<kind>(w, N, k_pad, n0, features, scratch, lda);
  int32_t* partial = reinterpret_cast<int32_t*>(scratch + features * lda);  // (features / 32) blocks of 4 tiles
  const int64_t chunk = kChunkWords / planes / 16 * 16;  // (the panel's slice of every plane stays in L1)
  alignas(64) int32_t block[4][16][16];
  for (int64_t t0 = 0; t0 < m; t0 += 32) {
    const uint32_t* panel = xt + (t0 / 32) * planes * words * 32;  // this panel's 32 tokens, planes of (words, 32)
    for (int64_t kc = 0; kc < words; kc += chunk) {
      const int64_t kend = kc + chunk < words ? kc + chunk : words;
      for (int64_t f = 0; f < features; f += 32) {
        const uint8_t* a = scratch + f * lda;
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
        for (int64_t k = kc; k < kend; k += 16) {
          _tile_loadd(4, a + 4 * k, lda);             // features n0 + f .. + 15
          _tile_loadd(5, a + 16 * lda + 4 * k, lda);  // features n0 + f + 16 .. + 31
          for (int plane = 0; plane < planes; ++plane) {  // (the same weights times each plane of x)
            const uint32_t* b = panel + plane * words * 32 + k * 32;
            _tile_loadd(6, b, 128);       // tokens t0 .. t0 + 15
            _tile_loadd(7, b + 16, 128);  // tokens t0 + 16 .. t0 + 31
            if constexpr (kind == AmxKind::kInt8) {
              _tile_dpbssd(0, 4, 6);
              _tile_dpbssd(1, 4, 7);
              _tile_dpbssd(2, 5, 6);
              _tile_dpbssd(3, 5, 7);
            } else {
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
        }
        if (kend < words) {
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
          for (int j = 0; j < 16 && t + j < m; ++j) {
            const __m512 sums = kind == AmxKind::kInt8 && out.acc == nullptr ? _mm512_cvtepi32_ps(r[j])
                                                                             : _mm512_castsi512_ps(r[j]);
            store_outputs(out, sums, t + j, n, N, lanes);
          }
        }
      }
    }
  }
}

}  // namespace

namespace llmkernels::ternary_cpu {

void activations_as_amx_b(const void* const* x_planes, int planes, int64_t m, int64_t words, uint32_t* xt) {
  const int64_t m32 = (m + 31) / 32 * 32;
  for (int plane = 0; plane < planes; ++plane) {
    const uint32_t* rows = static_cast<const uint32_t*>(x_planes[plane]);
    for (int64_t t0 = 0; t0 < m32; t0 += 16) {
      uint32_t* panel = xt + ((t0 / 32) * planes + plane) * words * 32 + t0 % 32;
      for (int64_t q0 = 0; q0 < words; q0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = t0 + i < m ? _mm512_loadu_si512(rows + (t0 + i) * words + q0) : _mm512_setzero_si512();
        }
        SimdAvx512::transpose_words(r);  // r[j]: word q0 + j of tokens t0 .. t0 + 15
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (q0 + j) * 32, r[j]);
      }
    }
  }
}

void amx_strip(AmxKind kind, const uint32_t* xt, int planes, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
               int64_t n0, int64_t features, uint8_t* scratch, const TileOut& out) {
  if (kind == AmxKind::kInt8) {
    strip_product<AmxKind::kInt8>(xt, planes, m, w, N, k_pad, n0, features, scratch, out);
  } else {
    strip_product<AmxKind::kBf16>(xt, planes, m, w, N, k_pad, n0, features, scratch, out);
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
void activations_as_amx_b(const void* const*, int, int64_t, int64_t, uint32_t*) {}
void amx_strip(AmxKind, const uint32_t*, int, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*,
               const TileOut&) {}
}  // namespace llmkernels::ternary_cpu
#endif
