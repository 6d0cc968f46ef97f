// The bf16 attention backward for CPUs with AMX tiles, its products on the tiles (common/cpu_amx_tiles.h) as in
// the forward (kernel_amx.cpp). The vdpbf16ps backward (flash_attn_kernel.h, bwd_tasks_bf16) ran at a third of SDPA's
// AMX backward there.
//
// Task = (batch, KV head, split of the key blocks), as in the other backward kernels: it packs its key blocks once
// (K^T and V^T as the B of S = Q K^T and dP = dO V^T, K as the B of dQ = dS K) and serves the query heads of the
// GQA group in turn. Per head, Q^T and dO^T are laid out once (the A of dK^T += Q^T dS and dV^T += dO^T P, so that
// P and dS, computed a row at a time, only need their row pairs interleaved, never a transpose). Per (query block,
// key block): S and dP recomputed on tiles, P = 2^(S log2 e - lse log2 e), dS = P (dP - D), both rounded to bf16
// as product operands (as on the GPU), then the three products that accumulate dV^T, dK^T (fp32, per key block)
// and dQ (fp32, per head). Runs with flush-to-zero (attention_cpu_host.h FlushDenormals). Dropout: each row's keep
// factors Z of a block are redrawn (dropout_avx512.h DropoutRows) where P is computed; dV^T takes P * Z, and
// dS = P (dP * Z - D).
#include "attention/cpu/flash_attn_cpu.h"
#include "common/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,amx-tile,amx-bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,amx-tile,amx-bf16")
#endif

namespace {

#include "common/cpu_simd_avx512.h"

#include "attention/cpu/vec_avx512.h"

#include "attention/cpu/amx_common.h"

#include "common/cpu_amx_tiles.h"

#include "attention/cpu/dropout_avx512.h"

using llmkernels::attention_cpu::AttnParams;
using llmkernels::attention_cpu::kAmxBwdKeys;
using llmkernels::attention_cpu::Tensor4;
using reg = Vec::reg;

constexpr int64_t kRows = 128;          // query rows per block (from multiples of 32, as the tiles' products)
constexpr int64_t kKeys = kAmxBwdKeys;  // keys per block
constexpr float kLog2e = 1.4426950408889634f;

// One row's P (times Z with dropout: dV's operand) and dS for 16 keys from c: from the raw scores s and dP, its
// base-2 lse and its D. alibi: the 16 lanes' ALiBi bias in log2 units (-slope log2 e |i + shift - j|), or zero.
// kDrop: Z = keep_scale where the 16 keep bits are set, else 0; dP is taken times Z.
struct Grad {
  reg p, ds;
};
template <bool kDrop>
inline __attribute__((always_inline)) Grad row_grad(const AttnParams& p, const float* s, const float* dp, int64_t c,
                                                   Visible vis, float lse2, float delta, reg alibi, __mmask16 keep,
                                                   reg keep_scale) {
  const __mmask16 seen = vis.lo <= c && c + 16 <= vis.hi ? __mmask16(0xffff) : visible_lanes(c, vis);
  const reg dpz = kDrop ? _mm512_maskz_mul_ps(keep, Vec::load(dp + c), keep_scale) : Vec::load(dp + c);
  auto dropped = [&](reg prob) { return kDrop ? _mm512_maskz_mul_ps(keep, prob, keep_scale) : prob; };
  // (masked lanes: 0, whatever the score; rows that see no key here are never asked. P is rounded to bf16 for
  // dV and only scales dS, so the forward's degree-3 exp2 serves: amx_common.h)
  if (p.softcap <= 0.f) {  // 2^(s scale log2 e + alibi - lse2): one fma, one add
    const reg arg = Vec::fmadd(Vec::load(s + c), Vec::set1(p.softmax_scale * kLog2e), Vec::sub(alibi, Vec::set1(lse2)));
    const reg prob = _mm512_maskz_mov_ps(seen, exp2_coarse(arg));
    return {dropped(prob), Vec::mul(prob, Vec::sub(dpz, Vec::set1(delta)))};
  }
  alignas(64) float t[16], dt[16];
  Vec::store(t, Vec::mul(Vec::load(s + c), Vec::set1(p.softmax_scale)));
  for (int e = 0; e < 16; ++e) {
    const float th = std::tanh(t[e] / p.softcap);
    t[e] = p.softcap * th;
    dt[e] = 1.f - th * th;  // d (soft-capped score) / d (scaled score)
  }
  const reg arg = Vec::fmadd(Vec::load(t), Vec::set1(kLog2e), Vec::sub(alibi, Vec::set1(lse2)));
  const reg prob = _mm512_maskz_mov_ps(seen, exp2_coarse(arg));
  return {dropped(prob), Vec::mul(Vec::mul(prob, Vec::sub(dpz, Vec::set1(delta))), Vec::load(dt))};
}

// Rows [0, rows) of the block at query i0 (zeros to rows32): P (P * Z with dropout) and dS rounded to bf16, as row
// pairs interleaved into words ((kRows / 2, kKeys) words each: the B of dV^T += dO^T P and dK^T += Q^T dS; a missing
// last row of a pair is 0), and dS also as plain rows (kRows x kKeys: the A of dQ += dS K). drop: the head's mask
// (read only when kDrop).
template <bool kDrop>
void probs_and_grads(const AttnParams& p, int64_t shift, int64_t sk, int64_t i0, int64_t j0, int64_t rows,
                     int64_t rows32, const float* s, const float* dp, const float* lse2, const float* delta, uint16_t* p_pairs,
                     uint16_t* ds_pairs, uint16_t* ds_rows, float alibi_slope, const DropoutRows& drop) {
  // ALiBi of row i, lanes c..c + 15: -slope log2 e |i + shift - j0 - c - lane| (zero without slopes)
  const reg neg_slope = Vec::set1(-alibi_slope * kLog2e);
  auto alibi = [&](int64_t i, int64_t c) { return Vec::mul(neg_slope, lane_distances(i + shift - j0 - c)); };
  // bf16 words 0..15 of row a, 16..31 of row b -> (a0, b0, a1, b1, ...)
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const reg keep_scale = Vec::set1(kDrop ? drop.scale : 0.f);
  __mmask16 keep_a[kKeys / 16] = {}, keep_b[kKeys / 16] = {};  // dropout: the rows' keep bits
  for (int64_t r = 0; r < rows; r += 2) {
    const bool has_b = r + 1 < rows;
    const Visible va = visible(p, shift, sk, i0 + r, j0, kKeys);
    const Visible vb = has_b ? visible(p, shift, sk, i0 + r + 1, j0, kKeys) : Visible{0, 0};
    if constexpr (kDrop) {
      if (va.lo < va.hi) drop.keep_bits(i0 + r, j0, va.lo, va.hi, keep_a);
      if (vb.lo < vb.hi) drop.keep_bits(i0 + r + 1, j0, vb.lo, vb.hi, keep_b);
    }
    uint32_t* pw = reinterpret_cast<uint32_t*>(p_pairs) + (r / 2) * kKeys;
    uint32_t* dsw = reinterpret_cast<uint32_t*>(ds_pairs) + (r / 2) * kKeys;
    for (int64_t c = 0; c < kKeys; c += 16) {
      Grad a{Vec::zero(), Vec::zero()}, b{Vec::zero(), Vec::zero()};
      if (va.lo < va.hi) {
        a = row_grad<kDrop>(p, s + r * kKeys, dp + r * kKeys, c, va, lse2[i0 + r], delta[i0 + r], alibi(i0 + r, c),
                            keep_a[c / 16], keep_scale);
      }
      if (vb.lo < vb.hi) {
        b = row_grad<kDrop>(p, s + (r + 1) * kKeys, dp + (r + 1) * kKeys, c, vb, lse2[i0 + r + 1],
                            delta[i0 + r + 1], alibi(i0 + r + 1, c), keep_b[c / 16], keep_scale);
      }
      const __m512i probs = (__m512i)_mm512_cvtne2ps_pbh(b.p, a.p);
      const __m512i grads = (__m512i)_mm512_cvtne2ps_pbh(b.ds, a.ds);
      _mm512_storeu_si512(pw + c, _mm512_permutexvar_epi16(order, probs));
      _mm512_storeu_si512(dsw + c, _mm512_permutexvar_epi16(order, grads));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows + r * kKeys + c), _mm512_castsi512_si256(grads));
      if (has_b) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows + (r + 1) * kKeys + c),
                            _mm512_extracti64x4_epi64(grads, 1));
      }
    }
  }
  // rows [rows, rows32): zero (a pair holding row `rows - 1` was completed above)
  const int64_t pairs_done = (rows + 1) / 2;
  std::memset(p_pairs + pairs_done * 2 * kKeys, 0, sizeof(uint16_t) * (rows32 / 2 - pairs_done) * 2 * kKeys);
  std::memset(ds_pairs + pairs_done * 2 * kKeys, 0, sizeof(uint16_t) * (rows32 / 2 - pairs_done) * 2 * kKeys);
  std::memset(ds_rows + rows * kKeys, 0, sizeof(uint16_t) * (rows32 - rows) * kKeys);
}

// Rows [0, n) of x, d wide, to dst back to back, zero from `end` on.
void copy_rows(const Rows& x, int64_t end, int64_t n, int64_t d, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    if (i < end) {
      std::memcpy(dst + i * d, x.base + i * x.ld, sizeof(uint16_t) * d);
    } else {
      std::memset(dst + i * d, 0, sizeof(uint16_t) * d);
    }
  }
}

// Keys [j0, j0 + cols) of a transposed (d x kKeys) accumulator times mul, as rows (plus the rows of acc, ld_acc
// apart, unless `first`): into acc, or, when `out` is given, rounded to bf16 into its rows (ld_out apart).
void store_transposed(const float* acc_t, int64_t cols, int64_t d, float mul, float* acc, int64_t ld_acc, bool first,
                      uint16_t* out, int64_t ld_out) {
  const reg m = Vec::set1(mul);
  for (int64_t c = 0; c < cols; c += 16) {
    for (int64_t e = 0; e < d; e += 16) {
      reg row[16];
      Vec::transpose(acc_t + e * kKeys + c, kKeys, row);
      for (int64_t i = 0; i < 16 && c + i < cols; ++i) {
        float* a = first && out != nullptr ? nullptr : acc + (c + i) * ld_acc + e;  // (acc may be null then)
        const reg sum = first ? Vec::mul(row[i], m) : Vec::fmadd(row[i], m, Vec::load(a));
        if (out != nullptr) {
          store_bf16(out + (c + i) * ld_out + e, sum);
        } else {
          Vec::store(a, sum);
        }
      }
    }
  }
}

}  // namespace

namespace llmkernels::attention_cpu {

void bwd_tasks_amx(const AttnParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.headdim, sq = p.seqlen_q, sk = p.seqlen_k, shift = sk - sq, group = p.nheads / p.nheads_k;
  const int64_t splits = p.bwd_splits, nkb = (sk + kKeys - 1) / kKeys, sq_pad = (sq + 31) / 32 * 32;
  const int64_t block_elems = kKeys * d;  // one packed key block
  const float scale = p.softmax_scale;
  // Per thread and kept between calls (fresh pages cost every call its page faults); those that grow with the
  // sequence are freed at the end of a call past 1 MB each (a thread keeps at most ~10 MB).
  static thread_local Buffer<int64_t> blocks;                  // the split's key blocks
  static thread_local Buffer<uint16_t> k_t, v_t, k_rows;       // their K^T, V^T, K packed as the tiles' B
  static thread_local Buffer<uint16_t> q_rows, do_rows, q_t, do_t;  // (sq_pad, d) the head's Q and dO, (d, sq_pad)^T
  static thread_local Buffer<uint16_t> p_pairs, ds_pairs, ds_rows;  // one block's P and dS in bf16
  static thread_local Buffer<float> s, dp, dk_t, dv_t, dq, lse2, delta;
  static thread_local Buffer<float> dk_sum, dv_sum;            // a GQA group's dK and dV so far, bf16 outputs only
  blocks.reserve(nkb);
  k_t.reserve(nkb * block_elems);
  v_t.reserve(nkb * block_elems);
  k_rows.reserve(nkb * block_elems);
  q_rows.reserve(sq_pad * d);
  do_rows.reserve(sq_pad * d);
  q_t.reserve(d * sq_pad);
  do_t.reserve(d * sq_pad);
  p_pairs.reserve(kRows * kKeys);
  ds_pairs.reserve(kRows * kKeys);
  ds_rows.reserve(kRows * kKeys);
  s.reserve(kRows * kKeys);
  dp.reserve(kRows * kKeys);
  dk_t.reserve(d * kKeys);
  dv_t.reserve(d * kKeys);
  dq.reserve(sq_pad * d);
  lse2.reserve(sq);
  delta.reserve(sq);
  const bool bf16_out = p.dk_bf16 != nullptr;
  if (bf16_out && group > 1) {
    dk_sum.reserve(nkb * block_elems);
    dv_sum.reserve(nkb * block_elems);
  }
  const auto block_grads = p.dropout ? &probs_and_grads<true> : &probs_and_grads<false>;
  const AmxTiles tiles;
  auto rows_of = [&](const Tensor4& t, int64_t b, int64_t h) {
    return Rows{static_cast<const uint16_t*>(t.data) + b * t.batch_stride + h * t.head_stride, t.seq_stride};
  };

  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % splits, hk = (task / splits) % p.nheads_k, b = task / (splits * p.nheads_k);
    // The split's blocks, dealt back and forth (0 .. splits - 1, then splits - 1 .. 0) as in the other backward
    // kernels: causal block costs fall steadily with the index, so each split gets pairs of equal total cost.
    int64_t nmine = 0;
    for (int64_t base = 0; base < nkb; base += splits) {
      const int64_t kblock = base + ((base / splits) % 2 == 0 ? split : splits - 1 - split);
      if (kblock < nkb) blocks.data[nmine++] = kblock;
    }
    const Rows k = rows_of(p.k, b, hk), v = rows_of(p.v, b, hk);
    for (int64_t m = 0; m < nmine; ++m) {
      const int64_t j0 = blocks.data[m] * kKeys;
      pack_transposed_b(k, j0, sk, kKeys, d, k_t.data + m * block_elems);
      pack_transposed_b(v, j0, sk, kKeys, d, v_t.data + m * block_elems);
      pack_rows_b(k, j0, sk, kKeys, d, k_rows.data + m * block_elems);
    }

    for (int64_t g = 0; g < group; ++g) {  // dK and dV sum over the group in this order
      const int64_t h = hk * group + g;
      const float slope = p.alibi != nullptr ? p.alibi[b * p.alibi_batch_stride + h] : 0.f;
      const Rows q = rows_of(p.q, b, h), dout = rows_of(p.dout, b, h), out = rows_of(p.out_in, b, h);
      const DropoutRows drop = p.dropout ? dropout_rows(p, b, h) : DropoutRows{};
      // Contiguous copies of the head's rows (zero past sq): rows of the input lie a power of two apart, so a
      // block of them read in place would fall into a few L1 sets.
      copy_rows(q, sq, sq_pad, d, q_rows.data);
      copy_rows(dout, sq, sq_pad, d, do_rows.data);
      // (the transposes read the contiguous copies: the strided rows are read once)
      pack_transposed_a(Rows{q_rows.data, d}, sq, sq_pad, d, q_t.data, sq_pad);
      pack_transposed_a(Rows{do_rows.data, d}, sq, sq_pad, d, do_t.data, sq_pad);
      for (int64_t i = 0; i < sq; ++i) {  // D_i = dO_i . O_i (less the gradient reaching lse_i), lse_i in base 2
        reg acc = Vec::zero();
        for (int64_t e = 0; e < d; e += 16) {
          acc = Vec::fmadd(Vec::load(do_rows.data + i * d + e), Vec::load(out.base + i * out.ld + e), acc);
        }
        const int64_t row = (b * p.nheads + h) * sq + i;
        delta.data[i] = Vec::hsum(acc) - (p.dlse_in != nullptr ? p.dlse_in[row] : 0.f);
        const float lse = p.lse_in[row];
        lse2.data[i] = lse == -__builtin_inff() ? __builtin_inff() : lse * kLog2e;
      }
      std::memset(dq.data, 0, sizeof(float) * sq_pad * d);

      for (int64_t m = 0; m < nmine; ++m) {
        const int64_t j0 = blocks.data[m] * kKeys, cols = imin(kKeys, sk - j0);
        const uint16_t *kt = k_t.data + m * block_elems, *vt = v_t.data + m * block_elems;
        const uint16_t* kr = k_rows.data + m * block_elems;
        std::memset(dk_t.data, 0, sizeof(float) * d * kKeys);
        std::memset(dv_t.data, 0, sizeof(float) * d * kKeys);
        // Queries that see some key of the block: [qlo, qhi), from a multiple of 32 (rows before qlo see none
        // of these keys: their P and dS are 0).
        int64_t qlo = p.window_right >= 0 ? imax(0, j0 - shift - p.window_right) : 0;
        const int64_t qhi = p.window_left >= 0 ? imin(sq, j0 + cols - 1 - shift + p.window_left + 1) : sq;
        qlo -= qlo % 32;
        for (int64_t i0 = qlo; i0 < qhi; i0 += kRows) {
          // rows [rows, rows32) take part in the products with P = dS = 0 (their dQ rows get 0 added)
          const int64_t rows = imin(kRows, qhi - i0), rows32 = (rows + 31) / 32 * 32;
          amx_gemm_bf16(rows32, kKeys, d, q_rows.data + i0 * d, d, kt, kKeys, s.data, kKeys, false);  // S = Q K^T
          amx_gemm_bf16(rows32, kKeys, d, do_rows.data + i0 * d, d, vt, kKeys, dp.data, kKeys, false);  // dP = dO V^T
          block_grads(p, shift, sk, i0, j0, rows, rows32, s.data, dp.data, lse2.data, delta.data, p_pairs.data,
                      ds_pairs.data, ds_rows.data, slope, drop);
          amx_gemm_bf16(d, kKeys, rows32, do_t.data + i0, sq_pad, p_pairs.data, kKeys, dv_t.data, kKeys,  // dV^T += dO^T P
                        true);
          amx_gemm_bf16(d, kKeys, rows32, q_t.data + i0, sq_pad, ds_pairs.data, kKeys, dk_t.data, kKeys,  // dK^T += Q^T dS
                        true);
          amx_gemm_bf16(rows32, d, kKeys, ds_rows.data, kKeys, kr, d, dq.data + i0 * d, d, true);  // dQ += dS K
        }
        // the task's own rows of dK and dV: set by the first head, then added; bf16 outputs take the group's sum
        // (in dk_sum / dv_sum until its last head)
        const int64_t row0 = (b * sk + j0) * p.nheads_k + hk, ld = p.nheads_k * d;
        if (bf16_out) {
          const bool last = g == group - 1;
          float* dk_acc = group > 1 ? dk_sum.data + m * block_elems : nullptr;
          float* dv_acc = group > 1 ? dv_sum.data + m * block_elems : nullptr;
          store_transposed(dk_t.data, cols, d, scale, dk_acc, d, g == 0, last ? p.dk_bf16 + row0 * d : nullptr, ld);
          store_transposed(dv_t.data, cols, d, 1.f, dv_acc, d, g == 0, last ? p.dv_bf16 + row0 * d : nullptr, ld);
        } else {
          store_transposed(dk_t.data, cols, d, scale, p.dk + row0 * d, ld, g == 0, nullptr, 0);
          store_transposed(dv_t.data, cols, d, 1.f, p.dv + row0 * d, ld, g == 0, nullptr, 0);
        }
      }
      for (int64_t i = 0; i < sq; ++i) {
        const int64_t row = ((b * sq + i) * p.nheads + h) * d;
        for (int64_t e = 0; e < d; e += 16) {
          const reg g_row = Vec::mul(Vec::load(dq.data + i * d + e), Vec::set1(scale));
          if (bf16_out) {  // (one split)
            store_bf16(p.dq_bf16 + row + e, g_row);
          } else {  // this split's (batch, sq, nheads, d) buffer
            Vec::store(p.dq + split * p.batch * sq * p.nheads * d + row + e, g_row);
          }
        }
      }
    }
  }
  Buffer<uint16_t>* const grow16[] = {&k_t, &v_t, &k_rows, &q_rows, &do_rows, &q_t, &do_t};
  for (Buffer<uint16_t>* buf : grow16) buf->release_above(1 << 19);
  Buffer<float>* const grow32[] = {&dq, &dk_sum, &dv_sum};
  for (Buffer<float>* buf : grow32) buf->release_above(1 << 18);
}

}  // namespace llmkernels::attention_cpu

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (no AMX, so use_amx_bf16 is false)
namespace llmkernels::attention_cpu {
void bwd_tasks_amx(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
