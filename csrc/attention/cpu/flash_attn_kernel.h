// Flash attention on the CPU: forward, backward, and (through per-batch key counts) the KV-cache op.
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

// ---------------------------------------------------------------------------------------------------
// Forward: task = (batch, pack of query heads, block of 64 (position, head) rows)
// ---------------------------------------------------------------------------------------------------
// Everything runs in "query-lane" layout: the block's queries lie across SIMD lanes, so the online softmax's
// per-query max, exp, sum and rescale are plain vector operations. Scores S^T (keys x queries) = K (scale Q)^T
// and the output O^T (headdim x queries) += V^T P^T are both products whose streamed operand is a lane-wide
// tile of this thread's buffers (Q^T, P^T) and whose broadcast operand is read from K / V in place (or from
// the fp32 copy of a low-precision block), so no K or V tile is ever transposed or padded. The score tile's
// epilogue also takes the per-query block max (no separate pass over S for blocks the mask does not cut), and
// the PV tile's prologue applies the online-softmax rescale to O as it loads it (no separate pass over O).
// Blocks of at most kMaxDotRows rows (decode) instead take per-key dot products and a row-major O.
using VReg = typename Vec::reg;

// Calls f.template operator()<R>(m) over rows [0, M) in tiles of MR rows, then once for the remainder.
template <int R, typename F>
inline void row_tail(int64_t rest, int64_t m, F& f) {
  if constexpr (R > 0) {
    if (rest == R) {
      f.template operator()<R>(m);
    } else {
      row_tail<R - 1>(rest, m, f);
    }
  }
}
template <int MR, typename F>
inline void for_row_tiles(int64_t M, F& f) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) f.template operator()<MR>(m);
  row_tail<MR - 1>(M - m, m, f);
}

// Calls f.template operator()<MR, NV>(lane0) for strips of NV registers covering lanes [0, nlanes), a multiple
// of Vec::W: 4 registers wide (Vec::MR4 rows per tile) where the ISA has the registers, then 2, then 1.
template <typename F>
inline void for_lane_strips(int64_t nlanes, F&& f) {
  constexpr int W = Vec::W;
  int64_t n = 0;
  if constexpr (Vec::MR4 > 0) {
    for (; n + 4 * W <= nlanes; n += 4 * W) f.template operator()<Vec::MR4, 4>(n);
  }
  for (; n + 2 * W <= nlanes; n += 2 * W) f.template operator()<Vec::MR, 2>(n);
  if (n < nlanes) f.template operator()<Vec::MR, 1>(n);
}

// S^T rows (keys) [0, R) x NV registers of query lanes = K rows . Q^T columns over the head dim d; the tile is
// stored to st (lane stride kBlockQ) and folded into the running column maxima mx.
template <int R, int NV>
inline void qk_tile(int64_t d, const float* k, int64_t k_ld, const float* qt, float* st, VReg* mx) {
  constexpr int W = Vec::W;
  VReg c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) c[r][v] = Vec::zero();
  }
  for (int64_t e = 0; e < d; ++e) {
    VReg b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(qt + e * kBlockQ + v * W);
    for (int r = 0; r < R; ++r) {
      const VReg a = Vec::set1(k[r * k_ld + e]);
      for (int v = 0; v < NV; ++v) c[r][v] = Vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      Vec::store(st + r * kBlockQ + v * W, c[r][v]);
      mx[v] = Vec::max(mx[v], c[r][v]);
    }
  }
}

// O^T rows (head dims) [0, R) x NV registers of query lanes: ot = ot * alpha (per lane, when given) + V^T P^T
// over the block's keys, V^T(r, j) = v[j * v_ld + r].
template <int R, int NV>
inline void pv_tile(int64_t cols, const float* v, int64_t v_ld, const float* pt, float* ot, const VReg* alpha) {
  constexpr int W = Vec::W;
  VReg c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) c[r][u] = Vec::load(ot + r * kBlockQ + u * W);
  }
  if (alpha != nullptr) {
    for (int r = 0; r < R; ++r) {
      for (int u = 0; u < NV; ++u) c[r][u] = Vec::mul(c[r][u], alpha[u]);
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    VReg b[NV];
    for (int u = 0; u < NV; ++u) b[u] = Vec::load(pt + j * kBlockQ + u * W);
    for (int r = 0; r < R; ++r) {
      const VReg a = Vec::set1(v[j * v_ld + r]);
      for (int u = 0; u < NV; ++u) c[r][u] = Vec::fmadd(a, b[u], c[r][u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) Vec::store(ot + r * kBlockQ + u * W, c[r][u]);
  }
}

// S^T (cols x nlanes) = K (scale Q)^T and its column maxima m_blk.
inline void block_scores(int64_t cols, int64_t nlanes, int64_t d, const float* k, int64_t k_ld, const float* qt,
                         float* st, float* m_blk) {
  for_lane_strips(nlanes, [&]<int MR, int NV>(int64_t n) {
    VReg mx[NV];
    for (int v = 0; v < NV; ++v) mx[v] = Vec::set1(kNegInf);
    auto tile = [&]<int R>(int64_t c) { qk_tile<R, NV>(d, k + c * k_ld, k_ld, qt + n, st + c * kBlockQ + n, mx); };
    for_row_tiles<MR>(cols, tile);
    for (int v = 0; v < NV; ++v) Vec::store(m_blk + n + v * Vec::W, mx[v]);
  });
}

// O^T (d x nlanes) = O^T * alpha (when given) + V^T P^T over cols keys.
inline void block_output(int64_t cols, int64_t nlanes, int64_t d, const float* v, int64_t v_ld, const float* pt,
                         float* ot, const float* alpha) {
  for_lane_strips(nlanes, [&]<int MR, int NV>(int64_t n) {
    VReg a[NV];
    if (alpha != nullptr) {
      for (int u = 0; u < NV; ++u) a[u] = Vec::load(alpha + n + u * Vec::W);
    }
    const VReg* ap = alpha != nullptr ? a : nullptr;
    auto tile = [&]<int R>(int64_t e) { pv_tile<R, NV>(cols, v + e, v_ld, pt + n, ot + e * kBlockQ + n, ap); };
    for_row_tiles<MR>(d, tile);
  });
}

#ifdef LLMK_ATTN_BF16_DOT
// ---------------------------------------------------------------------------------------------------
// bf16 forward on vdpbf16ps (kernel_avx512bf16.cpp only)
// ---------------------------------------------------------------------------------------------------
// Both products take bf16 pairs along their reduction dimension, one pair per 32-bit lane: S^T pairs the head
// dim, which is how Q and K rows already lie in memory (K is read in place, Q transposed as 32-bit words);
// O^T pairs keys, so each block of V is interleaved row by row into (key pair, head dim) words, and the
// probabilities are rounded to bf16 into (key pair, query) words. Accumulation stays fp32.
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
inline __m512i bcast_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return _mm512_set1_epi32(static_cast<int>(w));
}

// S^T rows (keys) [0, R) x NV registers of query lanes = scale * K rows . Q^T over d2 = d / 2 pairs.
template <int R, int NV>
inline void qk_tile_bf16(int64_t d2, const uint16_t* k, int64_t k_ld, const uint32_t* qw, float scale, float* st,
                         VReg* mx) {
  VReg c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) c[r][v] = Vec::zero();
  }
  for (int64_t e = 0; e < d2; ++e) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(qw + e * kBlockQ + v * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = as_bh(bcast_word(k + r * k_ld + 2 * e));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, as_bh(b[v]));
    }
  }
  const VReg sc = Vec::set1(scale);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = Vec::mul(c[r][v], sc);
      Vec::store(st + r * kBlockQ + v * 16, c[r][v]);
      mx[v] = Vec::max(mx[v], c[r][v]);
    }
  }
}

// O^T rows (head dims) [0, R) x NV registers of query lanes = ot * alpha (when given) + V^T P^T over c2 key pairs;
// vw holds (key pair, head dim) words with row length d, pw (key pair, query) words.
template <int R, int NV>
inline void pv_tile_bf16(int64_t c2, const uint32_t* vw, int64_t d, const uint32_t* pw, float* ot, const VReg* alpha) {
  VReg c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) c[r][u] = Vec::load(ot + r * kBlockQ + u * 16);
  }
  if (alpha != nullptr) {
    for (int r = 0; r < R; ++r) {
      for (int u = 0; u < NV; ++u) c[r][u] = Vec::mul(c[r][u], alpha[u]);
    }
  }
  for (int64_t j = 0; j < c2; ++j) {
    __m512i b[NV];
    for (int u = 0; u < NV; ++u) b[u] = _mm512_loadu_si512(pw + j * kBlockQ + u * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(vw[j * d + r])));
      for (int u = 0; u < NV; ++u) c[r][u] = _mm512_dpbf16_ps(c[r][u], a, as_bh(b[u]));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) Vec::store(ot + r * kBlockQ + u * 16, c[r][u]);
  }
}

inline void block_scores_bf16(int64_t cols, int64_t nlanes, int64_t d, const uint16_t* k, int64_t k_ld,
                              const uint32_t* qw, float scale, float* st, float* m_blk) {
  for_lane_strips(nlanes, [&]<int MR, int NV>(int64_t n) {
    VReg mx[NV];
    for (int v = 0; v < NV; ++v) mx[v] = Vec::set1(kNegInf);
    auto tile = [&]<int R>(int64_t c) {
      qk_tile_bf16<R, NV>(d / 2, k + c * k_ld, k_ld, qw + n, scale, st + c * kBlockQ + n, mx);
    };
    for_row_tiles<MR>(cols, tile);
    for (int v = 0; v < NV; ++v) Vec::store(m_blk + n + v * 16, mx[v]);
  });
}

inline void block_output_bf16(int64_t cols, int64_t nlanes, int64_t d, const uint32_t* vw, const uint32_t* pw,
                              float* ot, const float* alpha) {
  const int64_t c2 = (cols + 1) / 2;
  for_lane_strips(nlanes, [&]<int MR, int NV>(int64_t n) {
    VReg a[NV];
    if (alpha != nullptr) {
      for (int u = 0; u < NV; ++u) a[u] = Vec::load(alpha + n + u * 16);
    }
    const VReg* ap = alpha != nullptr ? a : nullptr;
    auto tile = [&]<int R>(int64_t e) { pv_tile_bf16<R, NV>(c2, vw + e, d, pw + n, ot + e * kBlockQ + n, ap); };
    for_row_tiles<MR>(d, tile);
  });
}

// vw[j][e] = (v row 2j, v row 2j + 1)[e] as one word (vw rows vw_ld words apart), a missing row 2j + 1 zero;
// v rows v_ld elements apart. Also pairs the rows of Q, dO and K for the bf16 backward.
inline void interleave_value_pairs(const uint16_t* v, int64_t v_ld, int64_t cols, int64_t d, uint32_t* vw,
                                   int64_t vw_ld) {
  for (int64_t j = 0; j < cols; j += 2) {
    const uint16_t* lo = v + j * v_ld;
    const uint16_t* hi = j + 1 < cols ? lo + v_ld : nullptr;
    uint32_t* dst = vw + (j / 2) * vw_ld;
    for (int64_t e = 0; e < d; e += 16) {
      const __mmask16 m = e + 16 <= d ? __mmask16(0xffff) : __mmask16((1u << (d - e)) - 1);
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + e));
      const __m512i b =
          hi != nullptr ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + e)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + e, m, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// P^T = 2^(S^T - shift) for one register of query lanes r: rounded to bf16 into (key pair, query) words of pw,
// the fp32 values summed into the returned register; then (dropout) times the keep factors zt (layout of st), or not
// when zt is null.
inline VReg exp_pairs(const float* st, int64_t cols, int64_t r, VReg sh, uint32_t* pw, const float* zt) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  VReg sum = Vec::zero();
  for (int64_t c = 0; c < cols; c += 2) {
    VReg e0 = Vec::exp2(Vec::sub(Vec::load(st + c * kBlockQ + r), sh));
    VReg e1 = c + 1 < cols ? Vec::exp2(Vec::sub(Vec::load(st + (c + 1) * kBlockQ + r), sh)) : Vec::zero();
    sum = Vec::add(sum, Vec::add(e0, e1));
    if (zt != nullptr) {  // (zt's row c + 1 exists only below cols)
      e0 = Vec::mul(e0, Vec::load(zt + c * kBlockQ + r));
      if (c + 1 < cols) e1 = Vec::mul(e1, Vec::load(zt + (c + 1) * kBlockQ + r));
    }
    // words 0..15 from e0, 16..31 from e1, then interleaved so that each 32-bit lane holds its query's pair
    const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
    _mm512_storeu_si512(pw + (c / 2) * kBlockQ + r, _mm512_permutexvar_epi16(order, packed));
  }
  return sum;
}
#endif  // LLMK_ATTN_BF16_DOT

void fwd_tasks_impl(const AttnParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.headdim, dp = round_up_to_vec(d);
  const int64_t group = p.nheads / p.nheads_k, pack = p.heads_per_block, packed_rows = p.seqlen_q * pack;
  const int64_t nqb = (packed_rows + kBlockQ - 1) / kBlockQ, npacks = p.nheads / pack;
  const bool fp32 = p.dtype == ElemType::kFloat32;
  // Scores are kept in log2 units (times log2 e, folded into the query scale, or into the soft-cap when there
  // is one) so that the probabilities are plain powers of 2; lse is converted back at the end.
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  constexpr float kLazyMax = 8.f;  // see the running max below
  const float q_scale = p.softmax_scale * (p.softcap > 0.f ? 1.f : kLog2e);
  Scratch scratch(dp * kBlockQ + 2 * kBlockQ * dp + 2 * kBlockK * dp + kBlockK * kBlockQ + 6 * kBlockQ +
                  kBlockK / 2 * kBlockQ + (p.dropout ? kBlockK * kBlockQ : 0));
  float* qt = scratch.data;             // (d, kBlockQ) scaled queries, transposed (bf16 words: (d / 2, kBlockQ))
  float* qr = qt + dp * kBlockQ;        // (kBlockQ, dp) row-major staging: the queries, then the output rows;
                                        // the padding [d, dp) of its rows is kept zero (see the output)
  float* ob = qr + kBlockQ * dp;        // unnormalised output: (d, kBlockQ) transposed, or (kBlockQ, dp) for few rows
  float* kb = ob + kBlockQ * dp;        // (kBlockK, dp) keys in fp32 when not read in place
  float* vb = kb + kBlockK * dp;        // (kBlockK, dp) values likewise
  float* st = vb + kBlockK * dp;        // (kBlockK, kBlockQ) scores, then probabilities, transposed
  float* m_run = st + kBlockK * kBlockQ;  // per query: running max, running sum, this block's max / sum,
  float* l_run = m_run + kBlockQ;         // the max used as exp's shift, and the rescale factor of the
  float* m_blk = l_run + kBlockQ;         // running output
  float* l_blk = m_blk + kBlockQ;
  float* shift = l_blk + kBlockQ;
  float* alpha = shift + kBlockQ;
  int64_t row_pos[kBlockQ], row_head[kBlockQ];  // query position and head of each row of the block
  // Dropout: keep factors (kBlockK, kBlockQ), transposed like st, and each row's Philox counter words (query,
  // b * nheads + h; padding rows 0)
  float* zt = alpha + kBlockQ + kBlockK / 2 * kBlockQ;
  alignas(64) uint32_t drop_qi[kBlockQ], drop_bh[kBlockQ];
#ifdef LLMK_ATTN_BF16_DOT
  // bf16 pairs (even head dims: K rows are read as whole words): Q^T words in qt, V words in vb, P^T words here
  uint32_t* pw = reinterpret_cast<uint32_t*>(alpha + kBlockQ);
  const bool dot_dtype = p.dtype == ElemType::kBFloat16 && d % 2 == 0;
  const int64_t dw = round_up_to_vec(d / 2);  // words per staged Q row
#else
  constexpr bool dot_dtype = false;
#endif

  // Copy K and V (fp32 rows, or bf16 for the vdpbf16ps products) when this thread's tasks hold more than one query
  // block per KV head. Key positions stay below p.seqlen_k (the KV-cache op: the cache's capacity, or its pages'
  // when paged), and rows are read through key_block, so a KV cache's row map and pages apply. A rolling cache's
  // chunk is always read through the copy (the host checks that it fits kMaxKVPackBytes).
  static thread_local KVPack kv_pack;
  const bool ring = p.ring_seen != nullptr;
  const int64_t pack_elem = dot_dtype ? 2 : 4;
  const bool use_pack = ring || (end - begin >= 2 && nqb * (group / pack) >= 2 && packed_rows / pack > kMaxDotRows &&
                                 2 * p.seqlen_k * d * pack_elem <= kMaxKVPackBytes);
  if (use_pack) kv_pack.reset(p.seqlen_k, d, !dot_dtype, pack_elem);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t qblock = interleaved_block(task % nqb, nqb), head_pack = (task / nqb) % npacks;
    const int64_t b = task / (nqb * npacks), hk = head_pack * pack / group;
    const Band band(p, b);
    const int64_t r0 = qblock * kBlockQ, rows = imin(kBlockQ, packed_rows - r0), nrows = round_up_to_vec(rows);
    // (a rolling cache's chunk reads its keys only through the copy: never the few-row path, which reads in place)
    const bool few = rows <= kMaxDotRows && !ring, dot = dot_dtype && !few;
    // K and V rows are read in place when fp32, except by the few-row path, whose loads span whole registers;
    // that path also reads bf16 rows in place (widened in registers: no staging copy, the decode's main cost).
    const bool kv_in_place = fp32 && (!few || d == dp);
    const bool bf16_in_place = few && d == dp && p.dtype == ElemType::kBFloat16;
    for (int64_t r = 0; r < rows; ++r) {
      row_pos[r] = (r0 + r) / pack;
      row_head[r] = head_pack * pack + (r0 + r) % pack;
    }
    if (p.dropout) {
      for (int64_t r = 0; r < kBlockQ; ++r) {
        drop_qi[r] = r < rows ? static_cast<uint32_t>(row_pos[r]) : 0u;
        drop_bh[r] = r < rows ? static_cast<uint32_t>((p.drop_batch0 + b) * p.nheads + row_head[r]) : 0u;
      }
    }

    if (few) {
      for (int64_t r = 0; r < rows; ++r) {  // padding [d, dp) stays zero
        load_row(p.dtype, p.q, b, row_pos[r], row_head[r], d, q_scale, qr + r * dp);
        std::memset(ob + r * dp, 0, sizeof(float) * dp);
      }
    } else if (dot) {
#ifdef LLMK_ATTN_BF16_DOT
      // Q rows as raw bf16 words (unscaled: the scale is applied to the fp32 scores), zero-padded, transposed.
      uint32_t* qw = reinterpret_cast<uint32_t*>(qr);
      for (int64_t r = 0; r < nrows; ++r) {
        uint32_t* dst = qw + r * dw;
        int64_t e = 0;
        if (r < rows) {
          const uint16_t* src = static_cast<const uint16_t*>(p.q.data) + b * p.q.batch_stride +
                                row_pos[r] * p.q.seq_stride + row_head[r] * p.q.head_stride;
          std::memcpy(dst, src, sizeof(uint16_t) * d);
          e = d / 2;
        }
        std::memset(dst + e, 0, sizeof(uint32_t) * (dw - e));
      }
      for (int64_t r = 0; r < nrows; r += Vec::W) {
        for (int64_t e = 0; e < dw; e += Vec::W) {
          VReg col[Vec::W];
          Vec::transpose(reinterpret_cast<const float*>(qw + r * dw + e), dw, col);
          for (int i = 0; i < Vec::W; ++i) Vec::store(qt + (e + i) * kBlockQ + r, col[i]);
        }
      }
      for (int64_t e = 0; e < dp; ++e) std::memset(ob + e * kBlockQ, 0, sizeof(float) * nrows);
#endif
    } else {
      // All rows first (their cache misses overlap), then the transpose in registers. Padding queries (and the
      // zero padding [d, dp) of each row) score 0 against every key: finite, never read back.
      for (int64_t r = 0; r < rows; ++r) load_row(p.dtype, p.q, b, row_pos[r], row_head[r], d, q_scale, qr + r * dp);
      std::memset(qr + rows * dp, 0, sizeof(float) * (nrows - rows) * dp);
      for (int64_t r = 0; r < nrows; r += Vec::W) {
        for (int64_t e = 0; e < dp; e += Vec::W) {
          VReg col[Vec::W];
          Vec::transpose(qr + r * dp + e, dp, col);
          for (int i = 0; i < Vec::W; ++i) Vec::store(qt + (e + i) * kBlockQ + r, col[i]);
        }
      }
      // All dp rows: those past d stay zero through the products and land in qr's padding at the end.
      for (int64_t e = 0; e < dp; ++e) std::memset(ob + e * kBlockQ, 0, sizeof(float) * nrows);
    }
    for (int64_t r = 0; r < nrows; ++r) {
      m_run[r] = kNegInf;
      l_run[r] = 0.f;
    }
    int64_t klo, khi;
    band.keys_for(row_pos[0], row_pos[rows - 1] + 1, klo, khi);
    if (p.block_table != nullptr) klo -= klo % kBlockK;  // blocks within pages; the mask hides the keys added
    const int64_t elem = p.dtype == ElemType::kFloat32 ? 4 : 2;
    for (int64_t j0 = klo; j0 < khi; j0 += kBlockK) {
      const int64_t cols = imin(kBlockK, khi - j0);
      // (a ring's key positions are not rows of k / v: no block view for them)
      const Tensor4 kblk = ring ? p.k : key_block(p, p.k, b, j0, elem);
      const Tensor4 vblk = ring ? p.v : key_block(p, p.v, b, j0, elem);
      auto rows_at = [&](int64_t j) -> KVRows {  // key j's K and V rows, for the copy
        if (ring) {
          const int64_t seen = p.ring_seen[b], pos = imax(0, seen - p.ring_window + 1) + j;
          if (pos < seen) {
            return {row_start(p.k_ring, b, pos % p.ring_window, hk, elem),
                    row_start(p.v_ring, b, pos % p.ring_window, hk, elem)};
          }
          return {row_start(p.k, b, pos - seen, hk, elem), row_start(p.v, b, pos - seen, hk, elem)};
        }
        return {row_start(kblk, 0, j - j0, hk, elem), row_start(vblk, 0, j - j0, hk, elem)};
      };
      const float *kp = kb, *vp = vb;
      const uint16_t *kh = nullptr, *vh = nullptr;  // bf16_in_place: the block's rows of this KV head
      int64_t k_ld = dp, v_ld = dp;
      if (dot) {
#ifdef LLMK_ATTN_BF16_DOT
        const uint16_t* k16 = static_cast<const uint16_t*>(kblk.data) + hk * p.k.head_stride;
        const uint16_t* v16 = static_cast<const uint16_t*>(vblk.data) + hk * p.v.head_stride;
        int64_t k_ld16 = p.k.seq_stride, v_ld16 = p.v.seq_stride;
        if (use_pack) {  // bf16 rows, copied as they are
          kv_pack.fill(p.dtype, b, hk, j0, cols, d, rows_at);
          k16 = kv_pack.k_row<uint16_t>(j0);
          v16 = kv_pack.v_row<uint16_t>(j0);
          k_ld16 = v_ld16 = d;
        }
        interleave_value_pairs(v16, v_ld16, cols, d, reinterpret_cast<uint32_t*>(vb), d);
        block_scores_bf16(cols, nrows, d, k16, k_ld16, reinterpret_cast<const uint32_t*>(qt), q_scale, st, m_blk);
#endif
      } else if (use_pack && !few) {
        kv_pack.fill(p.dtype, b, hk, j0, cols, d, rows_at);
        kp = kv_pack.k_row<float>(j0);
        vp = kv_pack.v_row<float>(j0);
        k_ld = v_ld = d;
      } else if (kv_in_place) {
        kp = static_cast<const float*>(kblk.data) + hk * p.k.head_stride;
        vp = static_cast<const float*>(vblk.data) + hk * p.v.head_stride;
        k_ld = p.k.seq_stride;
        v_ld = p.v.seq_stride;
      } else if (bf16_in_place) {
        kh = static_cast<const uint16_t*>(kblk.data) + hk * p.k.head_stride;
        vh = static_cast<const uint16_t*>(vblk.data) + hk * p.v.head_stride;
        k_ld = p.k.seq_stride;
        v_ld = p.v.seq_stride;
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          // (Past the block's end in a paged cache these addresses may lie outside it: prefetches never fault.)
          if (few && j0 + c + kDecodePrefetchKeys < khi) {
            prefetch_row(row_start(kblk, 0, c + kDecodePrefetchKeys, hk, elem), d * elem);
            prefetch_row(row_start(vblk, 0, c + kDecodePrefetchKeys, hk, elem), d * elem);
          }
          load_row(p.dtype, kblk, 0, c, hk, d, 1.f, kb + c * dp);
          load_row(p.dtype, vblk, 0, c, hk, d, 1.f, vb + c * dp);
        }
      }
      if (bf16_in_place) {  // as below, from the bf16 rows
        dot_scores(rows, nrows, cols, dp, qr,
                   [&](int64_t c) {
                     if (j0 + c + kDecodePrefetchKeys < khi) {
                       prefetch_row(kh + (c + kDecodePrefetchKeys) * k_ld, d * 2);
                       prefetch_row(vh + (c + kDecodePrefetchKeys) * v_ld, d * 2);
                     }
                     return kh + c * k_ld;
                   },
                   st, kBlockQ);
      } else if (few) {  // per-key dot products; in place, also fetching K and V rows ahead
        const bool ahead = kv_in_place;
        dot_scores(rows, nrows, cols, dp, qr,
                   [&](int64_t c) {
                     if (ahead && j0 + c + kDecodePrefetchKeys < khi) {
                       prefetch_row(kp + (c + kDecodePrefetchKeys) * k_ld, d * 4);
                       prefetch_row(vp + (c + kDecodePrefetchKeys) * v_ld, d * 4);
                     }
                     return kp + c * k_ld;
                   },
                   st, kBlockQ);
      } else if (!dot) {
        block_scores(cols, nrows, d, kp, k_ld, qt, st, m_blk);  // S^T = K (scale Q)^T, with its column maxima
      }

      bool max_stale = few;  // m_blk misses the soft-cap and the mask
      if (p.softcap > 0.f) {
        const float cap2 = p.softcap * kLog2e, inv_cap = 1.f / p.softcap;
        for (int64_t c = 0; c < cols; ++c) {
          for (int64_t r = 0; r < nrows; ++r) st[c * kBlockQ + r] = cap2 * std::tanh(st[c * kBlockQ + r] * inv_cap);
        }
        max_stale = true;
      }
      if (p.alibi != nullptr) {
        // Vectors over the block's queries (the tile's lanes), one key row at a time: -slope (log2 units, as the
        // scores here) and the distance to key j0 per query. (A scalar pass down each query's column, strided by
        // kBlockQ, had cost half of a causal fp32 forward at d 64.)
        alignas(64) float neg_slope[kBlockQ], dist0[kBlockQ];
        for (int64_t r = 0; r < nrows; ++r) {
          neg_slope[r] = r < rows ? -kLog2e * alibi_slope(p, b, row_head[r]) : 0.f;
          dist0[r] = r < rows ? static_cast<float>(row_pos[r] + band.shift - j0) : 0.f;
        }
        for (int64_t r = 0; r < nrows; r += Vec::W) {
          const VReg ns = Vec::load(neg_slope + r), d0 = Vec::load(dist0 + r);
          for (int64_t c = 0; c < cols; ++c) {
            const VReg d = Vec::sub(d0, Vec::set1(static_cast<float>(c)));
            float* s = st + c * kBlockQ + r;
            Vec::store(s, Vec::fmadd(ns, Vec::max(d, Vec::sub(Vec::zero(), d)), Vec::load(s)));
          }
        }
        max_stale = true;
      }
      for (int64_t r = 0; r < rows; ++r) {  // -inf outside the band (only the blocks it cuts do any work)
        const int64_t i = row_pos[r];
        int64_t lo = 0, hi = cols;  // (keys before band.first_key: keys_for starts the blocks after them)
        if (band.left >= 0) lo = imin(cols, imax(lo, i + band.shift - band.left - j0));
        if (band.right >= 0) hi = imax(lo, imin(hi, i + band.shift + band.right - j0 + 1));
        for (int64_t c = 0; c < lo; ++c) st[c * kBlockQ + r] = kNegInf;
        for (int64_t c = hi; c < cols; ++c) st[c * kBlockQ + r] = kNegInf;
        max_stale |= lo > 0 || hi < cols;
      }
      if (max_stale) {
        for (int64_t r = 0; r < nrows; r += Vec::W) {  // column maxima
          VReg mx = Vec::set1(kNegInf);
          for (int64_t c = 0; c < cols; ++c) mx = Vec::max(mx, Vec::load(st + c * kBlockQ + r));
          Vec::store(m_blk + r, mx);
        }
      }
      // The running max only moves when a block beats it by more than kLazyMax (to the block max minus kLazyMax):
      // probabilities then stay <= 2^kLazyMax, and most blocks keep alpha = 1, which spares the rescale of O.
      // shift = that max, or the lowest finite float while a query has seen nothing (so that 2^(-inf - shift)
      // = 0, never NaN); alpha = 2^(old max - shift) rescales what was accumulated.
      // Dropout: P^T is multiplied by the keep factors after its sums went into l and before the product with V.
      if (p.dropout) dropout_factors(p, nrows, drop_qi, drop_bh, j0, cols, zt);
      bool rescale = false;
      for (int64_t r = 0; r < nrows; r += Vec::W) {
        const VReg m_old = Vec::load(m_run + r);
        const VReg m_new = Vec::max(m_old, Vec::sub(Vec::load(m_blk + r), Vec::set1(kLazyMax)));
        const VReg sh = Vec::max(m_new, Vec::set1(-__FLT_MAX__));
        Vec::store(m_run + r, m_new);
        Vec::store(shift + r, sh);
        Vec::store(alpha + r, Vec::exp2(Vec::sub(m_old, sh)));
      }
      for (int64_t r = 0; r < nrows; ++r) rescale |= alpha[r] != 1.f;
      for (int64_t r = 0; r < nrows; r += Vec::W) {  // P^T = 2^(S^T - shift) and its column sums
        const VReg sh = Vec::load(shift + r);
        VReg sum = Vec::zero();
#ifdef LLMK_ATTN_BF16_DOT
        if (dot) sum = exp_pairs(st, cols, r, sh, pw, p.dropout ? zt : nullptr);
#endif
        for (int64_t c = 0; c < cols && !dot; ++c) {
          const VReg e = Vec::exp2(Vec::sub(Vec::load(st + c * kBlockQ + r), sh));
          Vec::store(st + c * kBlockQ + r, e);
          sum = Vec::add(sum, e);
        }
        Vec::store(l_blk + r, Vec::fmadd(Vec::load(l_run + r), Vec::load(alpha + r), sum));
      }
      std::memcpy(l_run, l_blk, sizeof(float) * nrows);
      if (p.dropout && !dot) mul_tile(st, st, zt, cols, nrows, kBlockQ);  // (dot: exp_pairs applied them)
      if (few) {
        for (int64_t r = 0; r < rows; ++r) {
          if (alpha[r] != 1.f) scale_row(ob + r * dp, dp, alpha[r]);
        }
        if (bf16_in_place) {
          gemm(rows, dp, cols, st, 1, kBlockQ, vh, v_ld, ob, dp, true);  // O += P V
        } else {
          gemm(rows, dp, cols, st, 1, kBlockQ, vp, v_ld, ob, dp, true);
        }
      } else if (dot) {
#ifdef LLMK_ATTN_BF16_DOT
        block_output_bf16(cols, nrows, d, reinterpret_cast<const uint32_t*>(vb), pw, ob, rescale ? alpha : nullptr);
#endif
      } else {
        block_output(cols, nrows, d, vp, v_ld, st, ob, rescale ? alpha : nullptr);  // O^T = alpha O^T + V^T P^T
      }
    }

    if (!few) {  // O^T back to row-major (into qr, free by now), so that the rows below are contiguous
      for (int64_t r = 0; r < nrows; r += Vec::W) {
        for (int64_t e = 0; e < dp; e += Vec::W) {  // rows [d, dp) of O^T are zero: qr's padding stays zero
          VReg col[Vec::W];
          Vec::transpose(ob + e * kBlockQ + r, kBlockQ, col);
          for (int i = 0; i < Vec::W; ++i) Vec::store(qr + (r + i) * dp + e, col[i]);
        }
      }
    }
    const float* o_rows = few ? ob : qr;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = row_pos[r], h = row_head[r];
      float* out = p.out + ((b * p.seqlen_q + i) * p.nheads + h) * d;
      float* lse = p.lse + (b * p.nheads + h) * p.seqlen_q + i;
      if (l_run[r] == 0.f) {
        for (int64_t e = 0; e < d; ++e) out[e] = 0.f;
        *lse = kNegInf;
      } else {
        const float inv = 1.f / l_run[r];
        const float* o_row = o_rows + r * dp;
        int64_t e = 0;
        for (; e + Vec::W <= d; e += Vec::W) Vec::store(out + e, Vec::mul(Vec::load(o_row + e), Vec::set1(inv)));
        for (; e < d; ++e) out[e] = o_row[e] * inv;
        *lse = (m_run[r] + std::log2(l_run[r])) * kLn2;
      }
    }
  }
  if (use_pack && 2 * kv_pack.capacity > kKeepPackBytes) kv_pack.release();
}

// ---------------------------------------------------------------------------------------------------
// Backward: task = (batch, KV head, split) -> dK, dV of the split's key blocks, the split's share of dQ
// ---------------------------------------------------------------------------------------------------
// One pass, five products per (query block, key block) tile: S = Q (scale K)^T, dP = dO V^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS (scale K). A task owns every query head of its GQA group, so dK and dV (summed over
// the group) and the dQ rows it touches belong to it alone: no atomics, no reduction inside the loop. Splits
// (only when the (batch, KV head) pairs do not divide evenly among the threads) share a head's key blocks, each
// writing dQ into its own buffer, which the host sums in a fixed order. The group's heads take turns (dK and dV
// add up in the task's own output rows); each one's Q, dO and dQ rows live in per-thread fp32 buffers with
// contiguous rows, filled once (converting bf16 / fp16 and taking D = rowsum(dO * O) on the way), so every
// product reads fp32 rows of whole registers. Within a head, key blocks are the outer loop: K^T, V^T and
// scale K are packed once per block and serve all of its query blocks. bf16 inputs in kernel_avx512bf16.cpp
// take bwd_tasks_bf16 (below) instead.

// The backward's keep factors: Z (rows x kBlockK, row-major like P) of queries i0.. of head h against keys j0..
// (dP *= Z, dV takes P * Z; dS = P (dP - D) as without dropout), drawn transposed (dropout_factors) and transposed
// back by W x W blocks.
struct DropRows {
  alignas(64) uint32_t qi[kBlockQ], bh[kBlockQ];
  float* zt;  // (kBlockK, kBlockQ) scratch

  void draw(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t ncols,
            float* zb) {
    const uint32_t head_row = static_cast<uint32_t>((p.drop_batch0 + b) * p.nheads + h);
    for (int64_t r = 0; r < kBlockQ; ++r) {
      qi[r] = static_cast<uint32_t>(i0 + r);
      bh[r] = head_row;
    }
    // All ncols columns: those past the block's keys meet P = 0, but must be finite.
    const int64_t nrows = (rows + kDropLanes - 1) / kDropLanes * kDropLanes;
    dropout_factors(p, nrows, qi, bh, j0, ncols, zt);
    for (int64_t r = 0; r < nrows; r += Vec::W) {
      for (int64_t c = 0; c < ncols; c += Vec::W) {
        VReg col[Vec::W];
        Vec::transpose(zt + c * kBlockQ + r, kBlockQ, col);
        for (int i = 0; i < Vec::W; ++i) Vec::store(zb + (r + i) * kBlockK + c, col[i]);
      }
    }
  }
};

// Query row i of head h: D_i = dO_i . O_i (dorow given in fp32, zero padded to dp; O loaded into orow), less the
// gradient reaching lse_i when there is one (d lse_i / d s_ij = P_ij, so it adds P_ij dlse_i to dS_ij), and
// lse_i in base 2 (+inf for a row that sees no key, so that its P is 0).
inline void row_stats(const AttnParams& p, int64_t b, int64_t h, int64_t i, const float* dorow, float* orow,
                      float* delta, float* lse2) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t dp = round_up_to_vec(p.headdim);
  load_row(p.dtype, p.out_in, b, i, h, p.headdim, 1.f, orow);
  VReg dot = Vec::zero();
  for (int64_t e = 0; e < dp; e += Vec::W) dot = Vec::fmadd(Vec::load(dorow + e), Vec::load(orow + e), dot);
  const int64_t row = (b * p.nheads + h) * p.seqlen_q + i;
  delta[i] = Vec::hsum(dot) - (p.dlse_in != nullptr ? p.dlse_in[row] : 0.f);
  const float lse = p.lse_in[row];
  lse2[i] = lse == kNegInf ? __builtin_inff() : lse * kLog2e;
}

#ifdef LLMK_ATTN_BF16_DOT
void bwd_tasks_bf16(const AttnParams& p, int64_t begin, int64_t end);
#endif

void bwd_tasks_impl(const AttnParams& p, int64_t begin, int64_t end) {
#ifdef LLMK_ATTN_BF16_DOT
  if (p.dtype == ElemType::kBFloat16) return bwd_tasks_bf16(p, begin, end);
#endif
  const int64_t d = p.headdim, dp = round_up_to_vec(d), sq = p.seqlen_q;
  const int64_t nkb = llmkernels::attention_cpu::num_key_blocks(p), group = p.nheads / p.nheads_k;
  const int64_t splits = p.bwd_splits;
  const float scale = p.softmax_scale;
  Scratch scratch(2 * dp * kBlockK + 3 * kBlockK * dp + 3 * kBlockQ * kBlockK + 3 * sq * dp + 2 * sq + dp +
                  (p.dropout ? 3 * kBlockQ * kBlockK : 0));
  float* kt = scratch.data;               // (dp, kBlockK) scale K^T
  float* vt = kt + dp * kBlockK;          // (dp, kBlockK) V^T
  float* ks = vt + dp * kBlockK;          // (kBlockK, dp) scale K, row-major
  float* dk_acc = ks + kBlockK * dp;      // (kBlockK, dp)
  float* dv_acc = dk_acc + kBlockK * dp;  // (kBlockK, dp)
  float* sb = dv_acc + kBlockK * dp;      // (kBlockQ, kBlockK) scores
  float* pb = sb + kBlockQ * kBlockK;     // probabilities
  float* dsb = pb + kBlockQ * kBlockK;    // dP, then dS
  float* qh = dsb + kBlockQ * kBlockK;    // (sq, dp) the head's Q rows, zero padded
  float* doh = qh + sq * dp;              // (sq, dp) dO rows likewise
  float* dqh = doh + sq * dp;             // (sq, dp) dQ accumulators
  float* lse2 = dqh + sq * dp;            // (sq) lse in base 2 (+inf: the row sees no key)
  float* delta = lse2 + sq;               // (sq) D = rowsum(dO * O)
  float* orow = delta + sq;               // (dp) one output row, zero padded
  float* zb = orow + dp;                  // dropout: (kBlockQ, kBlockK) keep factors Z
  float* pzb = zb + kBlockQ * kBlockK;    // dropout: P * Z
  DropRows drop_rows;
  drop_rows.zt = pzb + kBlockQ * kBlockK;

  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % splits, hk = (task / splits) % p.nheads_k, b = task / (splits * p.nheads_k);
    const Band band(p, b);
    for (int64_t g = 0; g < group; ++g) {  // dK and dV sum over the group in this order
      const int64_t h = hk * group + g;
      for (int64_t i = 0; i < sq; ++i) {
        load_row(p.dtype, p.q, b, i, h, d, 1.f, qh + i * dp);
        load_row(p.dtype, p.dout, b, i, h, d, 1.f, doh + i * dp);
        row_stats(p, b, h, i, doh + i * dp, orow, delta, lse2);
      }
      std::memset(dqh, 0, sizeof(float) * sq * dp);

      for (int64_t base = 0; base < nkb; base += splits) {
        // Dealt back and forth (0 .. splits - 1, then splits - 1 .. 0): causal block costs fall steadily with the
        // index, so each split gets pairs of equal total cost.
        const int64_t kblock = base + ((base / splits) % 2 == 0 ? split : splits - 1 - split);
        if (kblock >= nkb) continue;
        const int64_t j0 = kblock * kBlockK, cols = imin(kBlockK, p.seqlen_k - j0), ncols = round_up_to_vec(cols);
        // Columns [cols, ncols) of kt / vt keep the previous block's (finite) keys: their scores are masked.
        for (int64_t c = 0; c < cols; ++c) {
          load_row(p.dtype, p.k, b, j0 + c, hk, d, scale, ks + c * dp);
          for (int64_t e = 0; e < d; ++e) kt[e * kBlockK + c] = ks[c * dp + e];
          load_row(p.dtype, p.v, b, j0 + c, hk, d, 1.f, dv_acc);  // dv_acc is free until zeroed below
          for (int64_t e = 0; e < d; ++e) vt[e * kBlockK + c] = dv_acc[e];
        }
        std::memset(dk_acc, 0, sizeof(float) * kBlockK * dp);
        std::memset(dv_acc, 0, sizeof(float) * kBlockK * dp);

        int64_t qlo, qhi;
        band.queries_for(j0, j0 + cols, qlo, qhi);
        for (int64_t i0 = qlo; i0 < qhi; i0 += kBlockQ) {
          const int64_t rows = imin(kBlockQ, qhi - i0);
          const float *qr = qh + i0 * dp, *dor = doh + i0 * dp;
          gemm(rows, ncols, d, qr, dp, 1, kt, kBlockK, sb, kBlockK, false);  // S = Q (scale K)^T
          finish_scores(p, band, sb, kBlockK, rows, i0, j0, cols, ncols, alibi_slope(p, b, h));
          probs_from_lse(sb, pb, rows, ncols, lse2 + i0);
          const float* pv = pb;  // P, or P * Z with dropout
          if (p.dropout) {
            drop_rows.draw(p, b, h, i0, rows, j0, ncols, zb);
            mul_tile(pzb, pb, zb, rows, ncols, kBlockK);
            pv = pzb;
          }
          gemm(cols, dp, rows, pv, 1, kBlockK, dor, dp, dv_acc, dp, true);     // dV += (P * Z)^T dO
          gemm(rows, ncols, d, dor, dp, 1, vt, kBlockK, dsb, kBlockK, false);  // dP = dO V^T
          if (p.dropout) mul_tile(dsb, dsb, zb, rows, ncols, kBlockK);         // dP *= Z
          grad_scores(p, band, sb, pb, dsb, rows, ncols, delta + i0, i0, j0, alibi_slope(p, b, h));
          gemm(cols, dp, rows, dsb, 1, kBlockK, qr, dp, dk_acc, dp, true);          // dK += dS^T Q
          gemm(rows, dp, cols, dsb, kBlockK, 1, ks, dp, dqh + i0 * dp, dp, true);  // dQ += dS (scale K)
        }
        for (int64_t c = 0; c < cols; ++c) {  // the task's own rows of dK and dV: set by the first head, then added
          float* dk = p.dk + ((b * p.seqlen_k + j0 + c) * p.nheads_k + hk) * d;
          float* dv = p.dv + ((b * p.seqlen_k + j0 + c) * p.nheads_k + hk) * d;
          for (int64_t e = 0; e < d; ++e) {
            dk[e] = (g == 0 ? 0.f : dk[e]) + dk_acc[c * dp + e] * scale;
            dv[e] = (g == 0 ? 0.f : dv[e]) + dv_acc[c * dp + e];
          }
        }
      }
      float* dq = p.dq + split * p.batch * sq * p.nheads * d;  // this split's (batch, seqlen_q, nheads, d) buffer
      for (int64_t i = 0; i < sq; ++i) {
        std::memcpy(dq + ((b * sq + i) * p.nheads + h) * d, dqh + i * dp, sizeof(float) * d);
      }
    }
  }
}

#ifdef LLMK_ATTN_BF16_DOT
// ---------------------------------------------------------------------------------------------------
// bf16 backward on vdpbf16ps (kernel_avx512bf16.cpp only)
// ---------------------------------------------------------------------------------------------------
// The same pass as bwd_tasks_impl, with every product on bf16 pairs (one pair per 32-bit word, fp32
// accumulation) taken along its reduction dimension:
//   S = Q K^T, dP = dO V^T         pairs of head dims: Q / dO rows as they lie in memory (broadcast), K^T / V^T
//                                  as (head-dim pair, key) words (streamed across key lanes);
//   dV^T += dO^T P, dK^T += Q^T dS pairs of queries: (query pair, head dim) words of dO / Q (broadcast), P / dS
//                                  rounded to bf16 into (query pair, key) words (streamed across key lanes);
//   dQ += dS K                     pairs of keys: dS rounded to bf16 rows (broadcast), K as (key pair, head dim)
//                                  words (streamed across head-dim lanes).
// Q, K, V and dO are bf16 already, so only P and dS are rounded (as on the GPU), and only as operands: S, dP,
// D, lse and the accumulators stay fp32. The scale is applied to the fp32 scores and to dK, dQ at the end
// (a scaled bf16 K would be rounded again). Query blocks start at even positions so that pairs never straddle
// two blocks; a pair's missing second row (odd block end) is zero in P and dS.

// C[M x N] (+)= A[M x K2] B[K2 x N] over bf16 pairs: A(m, k) = the word A[m * a_m + k * a_k] (broadcast), B rows
// of N words ldb apart (N a multiple of 16), C fp32. Tiles as in gemm (up to 6 rows x 4 registers).
template <int R, int NV>
inline void dot_tile_bf16(int64_t k2, const uint32_t* a, int64_t a_m, int64_t a_k, const uint32_t* b, int64_t ldb,
                          float* c, int64_t ldc, bool accumulate) {
  VReg acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::load(c + r * ldc + v * 16) : Vec::zero();
  }
  for (int64_t k = 0; k < k2; ++k) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + k * ldb + v * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = as_bh(_mm512_set1_epi32(static_cast<int>(a[r * a_m + k * a_k])));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, as_bh(bv[v]));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) Vec::store(c + r * ldc + v * 16, acc[r][v]);
  }
}

inline void gemm_bf16(int64_t M, int64_t N, int64_t k2, const uint32_t* A, int64_t a_m, int64_t a_k, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for_lane_strips(N, [&]<int MR, int NV>(int64_t n) {
    auto tile = [&]<int R>(int64_t m) {
      dot_tile_bf16<R, NV>(k2, A + m * a_m, a_m, a_k, B + n, ldb, C + m * ldc + n, ldc, accumulate);
    };
    for_row_tiles<MR>(M, tile);
  });
}

// dst row r (ld words) = bf16 row r of src (rows src_ld elements apart) as d2 = ceil(d / 2) words, an odd d's
// last word completed by a zero.
inline void copy_rows_bf16(const uint16_t* src, int64_t src_ld, int64_t rows, int64_t d, uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* row = reinterpret_cast<uint16_t*>(dst + r * ld);
    std::memcpy(row, src + r * src_ld, sizeof(uint16_t) * d);
    if (d % 2 != 0) row[d] = 0;
  }
}

// Rows [0, rows) of an fp32 tile (kBlockK floats per row, ncols used) rounded to bf16: pairs of rows into
// (row pair, column) words (rows2 x kBlockK; row `rows` taken as zero), and, when `plain` is given, each row as
// kBlockK contiguous bf16 (kBlockK / 2 words per row).
inline void round_tile_bf16(const float* x, int64_t rows, int64_t ncols, uint32_t* pairs, uint32_t* plain) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t r = 0; r < rows; r += 2) {
    const float* lo = x + r * kBlockK;
    for (int64_t c = 0; c < ncols; c += 16) {
      const VReg a = Vec::load(lo + c), b = r + 1 < rows ? Vec::load(lo + kBlockK + c) : Vec::zero();
      const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // words 0..15 row r, 16..31 row r + 1
      _mm512_storeu_si512(pairs + (r / 2) * kBlockK + c, _mm512_permutexvar_epi16(order, packed));
      if (plain != nullptr) {
        // the same roundings, de-interleaved: row r's halves to its plain row, row r + 1's to the next
        uint16_t* p0 = reinterpret_cast<uint16_t*>(plain + r * (kBlockK / 2)) + c;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0), _mm512_castsi512_si256(packed));
        if (r + 1 < rows) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0 + kBlockK), _mm512_extracti64x4_epi64(packed, 1));
        }
      }
    }
  }
}

// Rows (keys) [0, cols) of a transposed (dp x kBlockK) accumulator, times mul, into rows of out (ld elements
// apart, d used): stored when `first`, else added. By 16 x 16 transposes: a column-wise scalar loop over the
// accumulator costs more than its size suggests (every load a new cache line).
inline void store_transposed(const float* acc_t, int64_t cols, int64_t d, float mul, float* out, int64_t ld,
                             bool first) {
  const VReg m = Vec::set1(mul);
  for (int64_t c = 0; c < cols; c += 16) {
    for (int64_t e = 0; e < d; e += 16) {
      VReg row[16];
      Vec::transpose(acc_t + e * kBlockK + c, kBlockK, row);
      const __mmask16 lanes = e + 16 <= d ? __mmask16(0xffff) : __mmask16((1u << (d - e)) - 1);
      for (int64_t i = 0; i < 16 && c + i < cols; ++i) {
        float* dst = out + (c + i) * ld + e;
        const VReg x = first ? Vec::mul(row[i], m) : Vec::fmadd(row[i], m, _mm512_maskz_loadu_ps(lanes, dst));
        _mm512_mask_storeu_ps(dst, lanes, x);
      }
    }
  }
}

void bwd_tasks_bf16(const AttnParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.headdim, dp = round_up_to_vec(d), d2 = (d + 1) / 2, sq = p.seqlen_q, sq2 = (sq + 1) / 2;
  const int64_t nkb = llmkernels::attention_cpu::num_key_blocks(p), group = p.nheads / p.nheads_k;
  const int64_t splits = p.bwd_splits;
  const float scale = p.softmax_scale;
  constexpr int64_t kPairsQ = kBlockQ / 2, kPairsK = kBlockK / 2;
  Scratch scratch(2 * d2 * kBlockK + kBlockK * d2 + kPairsK * dp + 2 * dp * kBlockK + 3 * kBlockQ * kBlockK +
                  2 * kPairsQ * kBlockK + kBlockQ * kPairsK + 2 * sq * d2 + 2 * sq2 * dp + sq * dp + 2 * sq + 2 * dp +
                  (p.dropout ? 3 * kBlockQ * kBlockK : 0));
  auto words = [](float* f) { return reinterpret_cast<uint32_t*>(f); };
  uint32_t* kt = words(scratch.data);     // (d2, kBlockK) K^T: head-dim pairs x keys
  uint32_t* vt = kt + d2 * kBlockK;       // (d2, kBlockK) V^T likewise
  uint32_t* kst = vt + d2 * kBlockK;      // (kBlockK, d2) staging for K^T / V^T
  uint32_t* kpr = kst + kBlockK * d2;     // (kPairsK, dp) K: key pairs x head dims, zero padded
  float* dkt = reinterpret_cast<float*>(kpr + kPairsK * dp);  // (dp, kBlockK) dK^T accumulators (unscaled)
  float* dvt = dkt + dp * kBlockK;        // (dp, kBlockK) dV^T accumulators
  float* sb = dvt + dp * kBlockK;         // (kBlockQ, kBlockK) scores
  float* pb = sb + kBlockQ * kBlockK;     // probabilities
  float* dsb = pb + kBlockQ * kBlockK;    // dP, then dS
  uint32_t* pw = words(dsb + kBlockQ * kBlockK);  // (kPairsQ, kBlockK) P: query pairs x keys
  uint32_t* dsw = pw + kPairsQ * kBlockK;          // (kPairsQ, kBlockK) dS likewise
  uint32_t* dsr = dsw + kPairsQ * kBlockK;         // (kBlockQ, kPairsK) dS rows: queries x key pairs
  uint32_t* qw = dsr + kBlockQ * kPairsK;          // (sq, d2) the head's Q rows
  uint32_t* dow = qw + sq * d2;                    // (sq, d2) dO rows
  uint32_t* qpr = dow + sq * d2;                   // (sq2, dp) Q: query pairs x head dims, zero padded
  uint32_t* dopr = qpr + sq2 * dp;                 // (sq2, dp) dO likewise
  float* dqh = reinterpret_cast<float*>(dopr + sq2 * dp);  // (sq, dp) dQ accumulators (unscaled)
  float* lse2 = dqh + sq * dp;                     // (sq) lse in base 2 (+inf: the row sees no key)
  float* delta = lse2 + sq;                        // (sq) D = rowsum(dO * O)
  float* orow = delta + sq;                        // (dp) one output row, zero padded
  float* dorow = orow + dp;                        // (dp) one dO row in fp32, zero padded
  float* zb = dorow + dp;                          // dropout: (kBlockQ, kBlockK) keep factors Z
  float* pzb = zb + kBlockQ * kBlockK;             // dropout: P * Z
  DropRows drop_rows;
  drop_rows.zt = pzb + kBlockQ * kBlockK;
  auto rows_of = [&](const Tensor4& t, int64_t b, int64_t s, int64_t h) {
    return static_cast<const uint16_t*>(t.data) + b * t.batch_stride + s * t.seq_stride + h * t.head_stride;
  };

  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % splits, hk = (task / splits) % p.nheads_k, b = task / (splits * p.nheads_k);
    const Band band(p, b);
    for (int64_t g = 0; g < group; ++g) {  // dK and dV sum over the group in this order
      const int64_t h = hk * group + g;
      for (int64_t i = 0; i < sq; ++i) {
        load_row(p.dtype, p.dout, b, i, h, d, 1.f, dorow);
        row_stats(p, b, h, i, dorow, orow, delta, lse2);
      }
      copy_rows_bf16(rows_of(p.q, b, 0, h), p.q.seq_stride, sq, d, qw, d2);
      copy_rows_bf16(rows_of(p.dout, b, 0, h), p.dout.seq_stride, sq, d, dow, d2);
      interleave_value_pairs(rows_of(p.q, b, 0, h), p.q.seq_stride, sq, d, qpr, dp);
      interleave_value_pairs(rows_of(p.dout, b, 0, h), p.dout.seq_stride, sq, d, dopr, dp);
      std::memset(dqh, 0, sizeof(float) * sq * dp);

      for (int64_t base = 0; base < nkb; base += splits) {
        // Dealt back and forth as in bwd_tasks_impl (the same blocks per split).
        const int64_t kblock = base + ((base / splits) % 2 == 0 ? split : splits - 1 - split);
        if (kblock >= nkb) continue;
        const int64_t j0 = kblock * kBlockK, cols = imin(kBlockK, p.seqlen_k - j0), ncols = round_up_to_vec(cols);
        const int64_t cols2 = (cols + 1) / 2;
        // Columns [cols, ncols) of kt / vt keep the previous block's (finite) keys: their scores are masked.
        auto transpose_words = [&](const Tensor4& t, uint32_t* dst) {  // dst = the block's rows of t, transposed
          copy_rows_bf16(rows_of(t, b, j0, hk), t.seq_stride, cols, d, kst, d2);
          for (int64_t c = 0; c < cols; ++c) {
            for (int64_t e = 0; e < d2; ++e) dst[e * kBlockK + c] = kst[c * d2 + e];
          }
        };
        transpose_words(p.k, kt);
        transpose_words(p.v, vt);
        interleave_value_pairs(rows_of(p.k, b, j0, hk), p.k.seq_stride, cols, d, kpr, dp);
        std::memset(dkt, 0, sizeof(float) * dp * kBlockK);
        std::memset(dvt, 0, sizeof(float) * dp * kBlockK);

        int64_t qlo, qhi;
        band.queries_for(j0, j0 + cols, qlo, qhi);
        // From an even row (the one before qlo, if taken, sees none of these keys: its P and dS are 0).
        for (int64_t i0 = qlo - qlo % 2; i0 < qhi && qlo < qhi; i0 += kBlockQ) {
          const int64_t rows = imin(kBlockQ, qhi - i0), rows2 = (rows + 1) / 2;
          gemm_bf16(rows, ncols, d2, qw + i0 * d2, d2, 1, kt, kBlockK, sb, kBlockK, false);  // S = Q K^T
          for (int64_t r = 0; r < rows; ++r) scale_row(sb + r * kBlockK, ncols, scale);
          finish_scores(p, band, sb, kBlockK, rows, i0, j0, cols, ncols, alibi_slope(p, b, h));
          probs_from_lse(sb, pb, rows, ncols, lse2 + i0);
          const float* pv = pb;  // P, or P * Z with dropout
          if (p.dropout) {
            drop_rows.draw(p, b, h, i0, rows, j0, ncols, zb);
            mul_tile(pzb, pb, zb, rows, ncols, kBlockK);
            pv = pzb;
          }
          round_tile_bf16(pv, rows, ncols, pw, nullptr);
          gemm_bf16(d, ncols, rows2, dopr + i0 / 2 * dp, 1, dp, pw, kBlockK, dvt, kBlockK, true);  // dV^T += dO^T P
          gemm_bf16(rows, ncols, d2, dow + i0 * d2, d2, 1, vt, kBlockK, dsb, kBlockK, false);     // dP = dO V^T
          if (p.dropout) mul_tile(dsb, dsb, zb, rows, ncols, kBlockK);                             // dP *= Z
          grad_scores(p, band, sb, pb, dsb, rows, ncols, delta + i0, i0, j0, alibi_slope(p, b, h));
          round_tile_bf16(dsb, rows, ncols, dsw, dsr);
          gemm_bf16(d, ncols, rows2, qpr + i0 / 2 * dp, 1, dp, dsw, kBlockK, dkt, kBlockK, true);  // dK^T += Q^T dS
          gemm_bf16(rows, dp, cols2, dsr, kPairsK, 1, kpr, dp, dqh + i0 * dp, dp, true);           // dQ += dS K
        }
        // the task's own rows of dK and dV: set by the first head, then added
        const int64_t row0 = (b * p.seqlen_k + j0) * p.nheads_k + hk, ld = p.nheads_k * d;
        store_transposed(dkt, cols, d, scale, p.dk + row0 * d, ld, g == 0);
        store_transposed(dvt, cols, d, 1.f, p.dv + row0 * d, ld, g == 0);
      }
      float* dq = p.dq + split * p.batch * sq * p.nheads * d;  // this split's (batch, seqlen_q, nheads, d) buffer
      for (int64_t i = 0; i < sq; ++i) {
        float* dst = dq + ((b * sq + i) * p.nheads + h) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = dqh[i * dp + e] * scale;
      }
    }
  }
}
#endif  // LLMK_ATTN_BF16_DOT

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
