// Flash attention on the CPU: forward, backward, and (through per-batch key counts) the KV-cache op. This file
// holds what both passes use (element conversion, the KV copy, the band, scores, dropout factors); the forward
// is flash_attn_fwd.inc, the backward flash_attn_bwd.inc, both included at its end.
// Included once by each per-instruction-set file (kernel_avx512.cpp, kernel_avx512bf16.cpp, kernel_avx2.cpp,
// kernel_scalar.cpp) after it has defined `struct Vec` (a SIMD register of Vec::W floats and its operations,
// exp2 and a W x W transpose among them) and switched the compiler's target; everything here has internal
// linkage, so the copies never mix. LLMK_ATTN_BF16_DOT (kernel_avx512bf16.cpp) adds the bf16 forward and
// backward on vdpbf16ps.
//
// Math (batch b, query head h, KV head h / group; shift = seqlen_k - seqlen_q):
//   s_ij = scale * q_i . k_j, soft-capped s_ij <- c * tanh(s_ij / c) when c > 0;
//   key j visible from query i iff  i + shift - window_left <= j <= i + shift + window_right;
//   lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j  (0 and -inf for a row that sees nothing).
//   Backward (D_i = do_i . o_i): p_ij = exp(s_ij - lse_i), dv_j = sum_i p_ij do_i, dp_ij = do_i . v_j,
//   ds_ij = p_ij (dp_ij - D_i) (* (1 - (s_ij / c)^2) when soft-capped), dq_i = scale sum_j ds_ij k_j,
//   dk_j = scale sum_i ds_ij q_i.
//   Dropout (AttnParams::dropout), keep factors z_ij in {0, 1 / (1 - p)} drawn per tile from the seed: o_i uses
//   p_ij z_ij (lse, the row sums, untouched); backward dv_j = sum_i p_ij z_ij do_i, dp_ij = z_ij do_i . v_j, the rest
//   as above. The AMX tile kernels draw the same masks (amx_common.h dropout_keep_row).
//
// Tiling: the forward runs one task per (batch, block of 64 rows), a row being a (query, head) pair of one GQA
// group (so a K/V block, once loaded, serves the whole group), and streams 64-key blocks through an online
// softmax (FlashAttention-2) in base 2 (log2 e folded into the query scale), never holding more than a 64 x 64
// score tile. Only key blocks that intersect the causal / window band are visited, and only blocks the band
// cuts pay for masking. The block's queries lie across SIMD lanes: scores are computed transposed (keys x
// queries) and the output accumulates transposed (headdim x queries), so the softmax bookkeeping and the
// rescale of O are vectorised across queries and both products broadcast from K / V rows: fp32 rows of a
// per-thread copy of the (batch, KV head)'s K and V, made as its first query block needs them (KVPack: in place,
// strided rows fall into few cache sets), else read in place when fp32 or converted per block into small
// per-thread buffers. A rolling KV cache's chunk (AttnParams::ring_seen) is always read through the copy. Their
// register tiles (up to 6 rows x 4 registers, fp32 FMA) also take the block max (score tile) and apply the
// rescale (output tile) on the way.
// Blocks of at most 4 rows (decode) take per-key dot products and a row-major O through the shared
// micro-kernel (`gemm`: broadcasting A, streaming B) instead. The backward recomputes P from lse once per
// tile in a single race-free pass: a task owns a (batch, KV head) pair, or a share of its key blocks, and
// computes dK, dV and dQ together (see bwd_tasks_impl; bwd_tasks_bf16 is the same pass on vdpbf16ps, with
// dK and dV accumulated transposed so that all five products stream bf16 pairs).
//
// Speed: for head dims >= 64 the forward is bound by the FMA throughput of its two products per tile (their loops
// run at the fp32 FMA peak of a Sapphire Rapids core, ~210 GFLOP/s, and take ~76% of the time at seqlen 2k, d 64;
// one vector exp2 per score ~8%, the rest tile edges and softmax bookkeeping); decode (a few rows
// per block) by reading K and V, which are strided by nheads_k * headdim. The backward's five products run at
// about the same rate (~80% of peak overall, ~90% inside the products). On bf16 inputs with AVX512-BF16 both
// passes run their products on vdpbf16ps: the bf16 backward takes ~0.6x the time of the fp32 one (d 64 and
// 128, seqlen 2048, 2 threads: ~750 against ~440 GFLOP/s); its products are ~85% of its time, the exp2,
// dS and bf16 roundings between them most of the rest.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "attention/cpu/flash_attn_cpu.h"
#include "common/philox.h"

#ifndef LLMK_ISA
#error "define LLMK_ISA (the entry-point suffix) and struct Vec before including flash_attn_kernel.h"
#endif

namespace {

using llmkernels::attention_cpu::AttnParams;
using llmkernels::attention_cpu::ElemType;
using llmkernels::attention_cpu::kBlockK;
using llmkernels::attention_cpu::kBlockQ;
using llmkernels::attention_cpu::kMaxKVPackBytes;
using llmkernels::attention_cpu::Tensor4;

constexpr float kNegInf = -__builtin_inff();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up_to_vec(int64_t n) { return (n + Vec::W - 1) / Vec::W * Vec::W; }

// The i-th block of n in the order 0, n-1, 1, n-2, ...: under a causal mask block costs rise (or fall) with
// the index, so alternating cheap and dear blocks keeps the contiguous task ranges of at::parallel_for balanced.
inline int64_t interleaved_block(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

// ---------------------------------------------------------------------------------------------------
// Element conversion (per row, while packing a tile)
// ---------------------------------------------------------------------------------------------------
inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    float f = float(mantissa) * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24
    std::memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Start of row (batch b, position s, head h) of `t`, elements of `bytes` bytes.
inline const void* row_start(const Tensor4& t, int64_t b, int64_t s, int64_t h, int64_t bytes) {
  return static_cast<const char*>(t.data) + (b * t.batch_stride + s * t.seq_stride + h * t.head_stride) * bytes;
}

// Keys j0 .. j0 + kBlockK - 1 of batch b in K or V (`t`, elements of `bytes` bytes) as a view whose row (0, c, h) is
// key j0 + c, head h: through cache_batch_idx or the page table of the KV-cache op (see AttnParams).
inline Tensor4 key_block(const AttnParams& p, const Tensor4& t, int64_t b, int64_t j0, int64_t bytes) {
  int64_t outer = p.kv_batch != nullptr ? p.kv_batch[b] : b, row = j0;
  if (p.block_table != nullptr) {
    outer = p.block_table[b * p.table_stride + j0 / p.page_size];
    row = j0 % p.page_size;
  }
  return {static_cast<const char*>(t.data) + (outer * t.batch_stride + row * t.seq_stride) * bytes, 0, t.seq_stride,
          t.head_stride};
}

// dst[0:n] = mul * row in fp32, the row's elements of `dtype` from `row`.
inline void convert_row(ElemType dtype, const void* row, int64_t n, float mul, float* dst) {
  switch (dtype) {
    case ElemType::kFloat32: {
      const float* src = static_cast<const float*>(row);
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
      break;
    }
    case ElemType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]) * mul;
      break;
    }
    case ElemType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]) * mul;
      break;
    }
  }
}

// dst[0:n] = mul * row (batch b, position s, head h) of `t`, in fp32.
inline void load_row(ElemType dtype, const Tensor4& t, int64_t b, int64_t s, int64_t h, int64_t n, float mul,
                     float* dst) {
  const int64_t bytes = dtype == ElemType::kFloat32 ? 4 : 2;
  convert_row(dtype, row_start(t, b, s, h, bytes), n, mul, dst);
}

#include "common/cpu_microkernel.h"  // Scratch, gemm_tile, gemm_strip: see its comment on where to include it

// How far ahead the decode paths fetch K and V rows (cpu_microkernel.h prefetch_row): 48 keys, 24-48 KB in flight at
// head_dim 128. Measured against 16 and 32 (flash_attn_with_kvcache, 1 token, 32 / 8 heads, d 128, 2 threads, this
// Xeon VM): bf16 +17-20% at 1k-16k keys, fp32 +10%. (The rolling cache's decode keeps kPrefetchKeys = 16: 48 was
// 12% slower there in fp32.)
constexpr int64_t kDecodePrefetchKeys = 48;

// C[M x N] (+)= A[M x K] B[K x N], N a multiple of Vec::W: strips 4 registers wide (Vec::MR4 rows per tile),
// then 2 (Vec::MR rows), then 1.
template <typename BT>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_m, int64_t a_k, const BT* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec::W;
  int64_t n = 0;
  if constexpr (Vec::MR4 > 0) {
    for (; n + 4 * W <= N; n += 4 * W) gemm_strip<Vec::MR4, 4>(M, K, A, a_m, a_k, B + n, ldb, C + n, ldc, accumulate);
  }
  for (; n + 2 * W <= N; n += 2 * W) gemm_strip<Vec::MR, 2>(M, K, A, a_m, a_k, B + n, ldb, C + n, ldc, accumulate);
  if (n < N) gemm_strip<Vec::MR, 1>(M, K, A, a_m, a_k, B + n, ldb, C + n, ldc, accumulate);
}

// K and V rows of one (batch, KV head), copied into contiguous rows the first time one of the thread's query blocks
// needs them and read from there by its later query blocks of that head: in fp32 (converted once from bf16 / fp16),
// or as bf16 for the vdpbf16ps products. In place, rows nheads_k * headdim elements apart fall into few cache sets
// (4 KB pages fix the low 6 bits of the set index): at d 64 and 8 KV heads a head's K and V use an eighth of the L2
// sets and a block of V rows 8 of L1's 64, so the 1 MB a head has at 2k keys (fp32) streamed from L3 for every
// query block, and every broadcast of the P V product missed L1. Contiguous, a head stays in L2 and a block in L1.
struct KVRows {  // one key's K and V rows
  const void* k;
  const void* v;
};

struct KVPack {
  void* k = nullptr;  // (seqlen_k, d) rows of `bytes`-byte elements
  void* v = nullptr;
  unsigned char* ready = nullptr;  // per key row: copied for the current (batch, KV head)
  int64_t capacity = 0, rows = 0;  // bytes of k / v, entries of ready
  int64_t row_bytes = 0, b = -1, hk = -1;
  bool to_fp32 = true;  // rows converted to fp32, or kept in the input's dtype (the bf16 products)

  // Room for `want_rows` rows of d elements of elem_bytes each (4: converted to fp32, else copied as they are);
  // forgets what was copied.
  void reset(int64_t want_rows, int64_t d, bool convert, int64_t elem_bytes) {
    to_fp32 = convert;
    row_bytes = d * elem_bytes;
    if (want_rows * row_bytes > capacity || want_rows > rows) {
      release();
      k = ::operator new[](want_rows * row_bytes, std::align_val_t(64));
      v = ::operator new[](want_rows * row_bytes, std::align_val_t(64));
      ready = new unsigned char[want_rows];
      capacity = want_rows * row_bytes;
      rows = want_rows;
    }
    b = hk = -1;
  }
  // Rows [j0, j0 + cols) of (batch bb, KV head h), d elements of `dtype` each; rows_at(j) gives key j's K and V
  // rows (KVRows).
  template <typename RowsAt>
  void fill(ElemType dtype, int64_t bb, int64_t h, int64_t j0, int64_t cols, int64_t d, RowsAt&& rows_at) {
    if (bb != b || h != hk) {
      std::memset(ready, 0, rows);
      b = bb;
      hk = h;
    }
    const int64_t bytes = dtype == ElemType::kFloat32 ? 4 : 2;
    for (int64_t c = 0; c < cols; ++c) {
      if (ready[j0 + c]) continue;
      if (c + 8 < cols) {  // the source rows are strided: keep a few in flight
        const KVRows ahead = rows_at(j0 + c + 8);
        prefetch_row(ahead.k, d * bytes);
        prefetch_row(ahead.v, d * bytes);
      }
      const KVRows src = rows_at(j0 + c);
      char* kd = static_cast<char*>(k) + (j0 + c) * row_bytes;
      char* vd = static_cast<char*>(v) + (j0 + c) * row_bytes;
      if (to_fp32) {
        convert_row(dtype, src.k, d, 1.f, reinterpret_cast<float*>(kd));
        convert_row(dtype, src.v, d, 1.f, reinterpret_cast<float*>(vd));
      } else {
        std::memcpy(kd, src.k, row_bytes);
        std::memcpy(vd, src.v, row_bytes);
      }
      ready[j0 + c] = 1;
    }
  }
  template <typename T>
  const T* k_row(int64_t j) const {
    return reinterpret_cast<const T*>(static_cast<const char*>(k) + j * row_bytes);
  }
  template <typename T>
  const T* v_row(int64_t j) const {
    return reinterpret_cast<const T*>(static_cast<const char*>(v) + j * row_bytes);
  }
  void release() {
    if (k != nullptr) ::operator delete[](k, std::align_val_t(64));
    if (v != nullptr) ::operator delete[](v, std::align_val_t(64));
    delete[] ready;
    k = v = nullptr;
    ready = nullptr;
    capacity = rows = 0;
  }
  ~KVPack() { release(); }
};
// Packs above this many bytes (K and V) are freed after the call rather than kept for the next one.
constexpr int64_t kKeepPackBytes = int64_t(4) << 20;

// ---------------------------------------------------------------------------------------------------
// Row operations on score tiles (n a multiple of Vec::W)
// ---------------------------------------------------------------------------------------------------
inline void scale_row(float* x, int64_t n, float a) {
  const typename Vec::reg av = Vec::set1(a);
  for (int64_t i = 0; i < n; i += Vec::W) Vec::store(x + i, Vec::mul(Vec::load(x + i), av));
}

// ---------------------------------------------------------------------------------------------------
// Geometry of the band for one batch row
// ---------------------------------------------------------------------------------------------------
struct Band {
  int64_t seqlen_q, seqlen_k, shift, left, right;
  int64_t first_key;  // keys before it are none (the KV-cache op's cache_leftpad; forward only)

  Band(const AttnParams& p, int64_t b)
      : seqlen_q(p.seqlen_q),
        seqlen_k(p.seqlens_k != nullptr ? p.seqlens_k[b] : p.seqlen_k),
        shift(seqlen_k - p.seqlen_q),
        left(p.window_left),
        right(p.window_right),
        first_key(p.keys_start != nullptr ? p.keys_start[b] : 0) {}

  // Keys [lo, hi) that some query of [i0, i1) sees.
  void keys_for(int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) const {
    lo = imax(first_key, left >= 0 ? i0 + shift - left : 0);
    hi = right >= 0 ? imin(seqlen_k, i1 - 1 + shift + right + 1) : seqlen_k;
  }
  // Queries [lo, hi) that see some key of [j0, j1).
  void queries_for(int64_t j0, int64_t j1, int64_t& lo, int64_t& hi) const {
    lo = right >= 0 ? imax(0, j0 - shift - right) : 0;
    hi = left >= 0 ? imin(seqlen_q, j1 - 1 - shift + left + 1) : seqlen_q;
  }
};

// The ALiBi slope of (batch b, query head h), 0 without ALiBi.
inline float alibi_slope(const AttnParams& p, int64_t b, int64_t h) {
  return p.alibi != nullptr ? p.alibi[b * p.alibi_batch_stride + h] : 0.f;
}

// row[c] -= slope * |pos - c| for c in [0, cols): the ALiBi bias of a query at distance pos from key j0 (pos = i +
// shift - j0), in the row's units.
inline float key_distance(int64_t pos, int64_t c) { return static_cast<float>(pos >= c ? pos - c : c - pos); }
inline void add_alibi(float* row, int64_t cols, float slope, int64_t pos) {
  for (int64_t c = 0; c < cols; ++c) row[c] -= slope * key_distance(pos, c);
}

// Scores s (rows x ld, columns [0, ncols) used) of queries i0.. against keys j0 .. j0 + cols - 1: soft-cap, the
// ALiBi bias of `slope` (0: none), then -inf outside the band and in the padding columns [cols, ncols).
inline void finish_scores(const AttnParams& p, const Band& band, float* s, int64_t ld, int64_t rows, int64_t i0,
                          int64_t j0, int64_t cols, int64_t ncols, float slope) {
  const float cap = p.softcap;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    if (cap > 0.f) {
      const float inv_cap = 1.f / cap;
      for (int64_t c = 0; c < cols; ++c) row[c] = cap * std::tanh(row[c] * inv_cap);
    }
    const int64_t i = i0 + r;
    if (slope != 0.f) add_alibi(row, cols, slope, i + band.shift - j0);
    int64_t lo = 0, hi = cols;
    if (band.left >= 0) lo = imax(lo, i + band.shift - band.left - j0);
    if (band.right >= 0) hi = imin(hi, i + band.shift + band.right - j0 + 1);
    lo = imin(lo, ncols);
    hi = imax(hi, lo);
    for (int64_t c = 0; c < lo; ++c) row[c] = kNegInf;
    for (int64_t c = hi; c < ncols; ++c) row[c] = kNegInf;
  }
}

// P (rows x ncols) = 2^(S log2 e - lse2_row) from recomputed scores, lse2 = lse log2 e per row (+inf for a row
// that sees no key, so that its P is 0 rather than 2^(s + inf)).
inline void probs_from_lse(const float* s, float* pb, int64_t rows, int64_t ncols, const float* lse2) {
  const typename Vec::reg log2e = Vec::set1(1.4426950408889634f);
  for (int64_t r = 0; r < rows; ++r) {
    const typename Vec::reg shift = Vec::set1(-lse2[r]);
    for (int64_t c = 0; c < ncols; c += Vec::W) {
      Vec::store(pb + r * kBlockK + c, Vec::exp2(Vec::fmadd(Vec::load(s + r * kBlockK + c), log2e, shift)));
    }
  }
}

// dS = P * (dP - D) (* the soft-cap derivative 1 - (s / c)^2), in place of dP. s holds finish_scores' result for
// queries i0.. against keys j0..: with ALiBi (slope != 0) the bias is taken off again for the soft-cap's derivative.
inline void grad_scores(const AttnParams& p, const Band& band, const float* s, const float* pb, float* dpb,
                        int64_t rows, int64_t ncols, const float* delta, int64_t i0, int64_t j0, float slope) {
  const float cap = p.softcap;
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = s + r * kBlockK;
    const float* prow = pb + r * kBlockK;
    float* drow = dpb + r * kBlockK;
    if (cap > 0.f) {
      const float inv_cap = 1.f / cap;
      const int64_t pos = i0 + r + band.shift - j0;  // ALiBi distance of column 0
      for (int64_t c = 0; c < ncols; ++c) {
        // tanh of the raw score; P = 0 where masked (s = -inf)
        const float capped = srow[c] + slope * key_distance(pos, c);
        const float t = capped * inv_cap;
        drow[c] = prow[c] == 0.f ? 0.f : prow[c] * (drow[c] - delta[r]) * (1.f - t * t);
      }
    } else {
      const typename Vec::reg dv = Vec::set1(delta[r]);
      for (int64_t c = 0; c < ncols; c += Vec::W) {
        Vec::store(drow + c, Vec::mul(Vec::load(prow + c), Vec::sub(Vec::load(drow + c), dv)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Dropout (AttnParams::dropout): keep factors drawn from Philox4x32-10 (common/philox.h)
// ---------------------------------------------------------------------------------------------------
// One Philox call gives the 16-bit draws of eight consecutive keys of one (query, head) row; kDropLanes rows' calls
// run side by side, one row per 32-bit lane: explicit AVX-512 code where the including file defines
// LLMK_ATTN_PHILOX_AVX512 (GCC leaves the plain loops scalar there), else plain loops over lanes (vectorised by the
// compiler for AVX2). A 64 x 64 tile costs 32 such calls.
constexpr int kDropLanes = 16;

#ifdef LLMK_ATTN_PHILOX_AVX512
#include "attention/cpu/dropout_avx512.h"  // (philox_lanes: shared with the AMX kernels)

// z[c * kBlockQ + r0 + l] for keys c in [c_lo, c_hi) of the call on counter (g, qi[l], bh[l], 0) (keys 8g.., key j0
// at column 0), 16 lanes l.
inline void dropout_call(const AttnParams& p, int64_t g, const uint32_t* qi, const uint32_t* bh, int64_t j0,
                         int64_t c_lo, int64_t c_hi, float* z) {
  __m512i words[4] = {_mm512_set1_epi32(static_cast<int>(g)), _mm512_loadu_si512(qi), _mm512_loadu_si512(bh),
                      _mm512_setzero_si512()};
  philox_lanes(words, p.drop_key0, p.drop_key1);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(p.drop_threshold));
  const __m512 keep = _mm512_set1_ps(p.drop_scale);
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const int64_t j = j0 + c;
    const __m512i word = words[(j & 7) >> 1];
    const __m512i draw = (j & 1) != 0 ? _mm512_srli_epi32(word, 16) : _mm512_and_si512(word, low16);
    _mm512_storeu_ps(z + c * kBlockQ, _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(draw, threshold), keep));
  }
}
#else
inline void dropout_call(const AttnParams& p, int64_t g, const uint32_t* qi, const uint32_t* bh, int64_t j0,
                         int64_t c_lo, int64_t c_hi, float* z) {
  namespace ph = llmkernels::philox;
  uint32_t x0[kDropLanes], x1[kDropLanes], x2[kDropLanes], x3[kDropLanes];
  for (int l = 0; l < kDropLanes; ++l) {
    x0[l] = static_cast<uint32_t>(g);
    x1[l] = qi[l];
    x2[l] = bh[l];
    x3[l] = 0;
  }
  uint32_t k0 = p.drop_key0, k1 = p.drop_key1;
  for (int round = 0; round < ph::kRounds; ++round) {
    for (int l = 0; l < kDropLanes; ++l) ph::mix_round(x0[l], x1[l], x2[l], x3[l], k0, k1);
    k0 += ph::kW0;
    k1 += ph::kW1;
  }
  const uint32_t* words[4] = {x0, x1, x2, x3};
  const uint32_t threshold = p.drop_threshold;
  const float keep = p.drop_scale;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const int64_t j = j0 + c;
    const uint32_t* word = words[(j & 7) >> 1];
    const int shift = 16 * static_cast<int>(j & 1);
    for (int l = 0; l < kDropLanes; ++l) z[c * kBlockQ + l] = ((word[l] >> shift) & 0xFFFFu) >= threshold ? keep : 0.f;
  }
}
#endif

// Keep factors, transposed like the forward's score tile: z[c * kBlockQ + r] = drop_scale if (row r, key j0 + c) is
// kept, else 0, for rows [0, n) (n rounded up to kDropLanes) and keys [j0, j0 + cols). Row r is query qi[r] of head
// row bh[r] = b * nheads + h. Any j0 (a window's first key need not be a multiple of 8): a call's keys outside
// [j0, j0 + cols) are skipped.
inline void dropout_factors(const AttnParams& p, int64_t n, const uint32_t* qi, const uint32_t* bh, int64_t j0,
                            int64_t cols, float* z) {
  constexpr int64_t kKeys = llmkernels::philox::kKeysPerCall;
  for (int64_t g = j0 / kKeys; kKeys * g < j0 + cols; ++g) {
    const int64_t c_lo = imax(0, kKeys * g - j0), c_hi = imin(cols, kKeys * (g + 1) - j0);
    for (int64_t r0 = 0; r0 < n; r0 += kDropLanes) dropout_call(p, g, qi + r0, bh + r0, j0, c_lo, c_hi, z + r0);
  }
}

// dst = a * z elementwise over `outer` rows of `inner` (a multiple of Vec::W) elements, rows ld apart.
inline void mul_tile(float* dst, const float* a, const float* z, int64_t outer, int64_t inner, int64_t ld) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < inner; i += Vec::W) {
      Vec::store(dst + o * ld + i, Vec::mul(Vec::load(a + o * ld + i), Vec::load(z + o * ld + i)));
    }
  }
}

#include "attention/cpu/flash_attn_fwd.inc"  // fwd_tasks_impl
#include "attention/cpu/flash_attn_bwd.inc"  // bwd_tasks_impl

}  // namespace

#define LLMK_ATTN_CAT2(a, b) a##b
#define LLMK_ATTN_CAT(a, b) LLMK_ATTN_CAT2(a, b)

namespace llmkernels::attention_cpu {
void LLMK_ATTN_CAT(fwd_tasks_, LLMK_ISA)(const AttnParams& p, int64_t begin, int64_t end) {
  fwd_tasks_impl(p, begin, end);
}
void LLMK_ATTN_CAT(bwd_tasks_, LLMK_ISA)(const AttnParams& p, int64_t begin, int64_t end) {
  bwd_tasks_impl(p, begin, end);
}
}  // namespace llmkernels::attention_cpu
