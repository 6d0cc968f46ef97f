// The bf16 attention forward for CPUs with AMX tiles (Sapphire Rapids and later): the two products of each (query
// block, key block) pair on the tiles (common/cpu_amx_tiles.h: bf16 pairs, fp32 accumulation), the online softmax
// between them on AVX-512. Where AMX is present, SDPA's bf16 CPU kernel uses it too, and the vdpbf16ps kernel
// (kernel_avx512bf16.cpp) ran 3-5x behind it.
//
// Task = (batch, query head). A task packs its KV head's K^T and V (unless the previous task of the thread, a head
// of the same GQA group, did), 256 keys a block, into the tiles' B layout (pairs of rows interleaved as 32-bit
// words), then streams its query blocks of 128 rows, each copied to a contiguous buffer (rows of a (b, s, h, d)
// tensor lie a power of two apart: read in place, a block's rows fall into a few L1 sets): S = Q K^T (fp32), the
// scale / soft-cap / band mask and the running max and sum per row, P rounded to bf16 (as the GPU kernels and the
// vdpbf16ps kernel do), O += P V. Chosen by attention_cpu_host.h (use_amx_forward) for bf16 prefill calls only; it
// runs with flush-to-zero.
#include "attention/cpu/flash_attn_cpu.h"

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

using llmkernels::attention_cpu::AttnParams;
using reg = Vec::reg;

// Measured 128 / 256 / 512 rows by 128 / 256 keys, 2k tokens d 128, 1 thread pinned to each core in turn: 128 x
// 256 at or near the fastest in every round; 512-row blocks (a working set past L2) won one early round and lost
// every later one by ~30%. Re-measured once the buffers were 64-byte aligned (amx_common.h Buffer): 64 / 128 / 256
// rows by 128 / 256 / 512 keys all within ~5% of each other.
constexpr int64_t kRows = 128;  // query rows per block (a multiple of 32, as are the tiles' products)
constexpr int64_t kKeys = 256;  // keys per block
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_inff();

// K^T and V of keys [j0, j0 + kKeys) into the tiles' B layout (amx_common.h), zero past `keys`.
void pack_block(const Rows& k, const Rows& v, int64_t j0, int64_t keys, int64_t d, uint16_t* k_out,
                uint16_t* v_out) {
  pack_transposed_b(k, j0, keys, kKeys, d, k_out);
  pack_rows_b(v, j0, keys, kKeys, d, v_out);
}

}  // namespace

namespace llmkernels::attention_cpu {

void fwd_tasks_amx(const AttnParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.headdim, sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  const float q_scale = p.softmax_scale * (p.softcap > 0.f ? 1.f : kLog2e);
  const int64_t block_elems = kKeys * d;  // one packed block of K^T or V
  // Per thread and kept between calls (~1.4 MB at d 128 for 2k keys): fresh ones cost every call its page faults
  // and unmaps. The packed K / V grow with the keys: past 4 MB each they are freed at the end of the call.
  static thread_local Buffer<uint16_t> packed_k, packed_v, q_rows, probs;
  static thread_local Buffer<float> scores, out;
  q_rows.reserve(kRows * d);
  probs.reserve(kRows * kKeys);
  scores.reserve(kRows * kKeys);
  out.reserve(kRows * d);
  // Rows past a block's last are computed and ignored: start them from zeros, not whatever new[] left.
  std::memset(q_rows.data, 0, sizeof(uint16_t) * kRows * d);
  std::memset(probs.data, 0, sizeof(uint16_t) * kRows * kKeys);
  float m_run[kRows], l_run[kRows];
  const AmxTiles tiles;
  // (run with flush-to-zero by the host: attention_cpu_host.h FlushDenormals)

  int64_t packed_for = -1;  // (batch, KV head) whose K and V are packed: a GQA group's heads are consecutive tasks
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % p.nheads, b = task / p.nheads, hk = h / group;
    const int64_t sk = p.seqlens_k != nullptr ? p.seqlens_k[b] : p.seqlen_k, shift = sk - sq;
    const int64_t left = p.window_left, right = p.window_right;
    // Keys any row can see: [klo, khi), klo rounded down to a block.
    int64_t klo = left >= 0 ? imax(0, shift - left) : 0, khi = sk;
    if (right >= 0) khi = imin(khi, sq - 1 + shift + right + 1);
    klo -= klo % kKeys;
    const int64_t nblocks = khi > klo ? (khi - klo + kKeys - 1) / kKeys : 0;
    const Rows k{static_cast<const uint16_t*>(p.k.data) + b * p.k.batch_stride + hk * p.k.head_stride,
                 p.k.seq_stride};
    const Rows v{static_cast<const uint16_t*>(p.v.data) + b * p.v.batch_stride + hk * p.v.head_stride,
                 p.v.seq_stride};
    if (packed_for != b * p.nheads_k + hk) {  // (klo, khi depend on the batch row only: the same for the group)
      packed_k.reserve(nblocks * block_elems);
      packed_v.reserve(nblocks * block_elems);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        pack_block(k, v, klo + blk * kKeys, sk, d, packed_k.data + blk * block_elems,
                   packed_v.data + blk * block_elems);
      }
      packed_for = b * p.nheads_k + hk;
    }
    const uint16_t* q = static_cast<const uint16_t*>(p.q.data) + b * p.q.batch_stride + h * p.q.head_stride;

    for (int64_t i0 = 0; i0 < sq; i0 += kRows) {
      const int64_t rows = imin(kRows, sq - i0), rows32 = (rows + 31) / 32 * 32;
      for (int64_t r = 0; r < rows; ++r) std::memcpy(q_rows.data + r * d, q + (i0 + r) * p.q.seq_stride, 2 * d);
      if (rows < rows32) std::memset(q_rows.data + rows * d, 0, sizeof(uint16_t) * (rows32 - rows) * d);
      for (int64_t r = 0; r < kRows; ++r) {
        m_run[r] = kNegInf;
        l_run[r] = 0.f;
      }
      std::memset(out.data, 0, sizeof(float) * kRows * d);
      // Keys this block's rows can see, from the block holding the first.
      int64_t jlo = left >= 0 ? imax(klo, i0 + shift - left) : klo;
      const int64_t jhi = right >= 0 ? imin(khi, i0 + rows - 1 + shift + right + 1) : khi;
      jlo = klo + (jlo - klo) / kKeys * kKeys;
      for (int64_t j0 = jlo; j0 < jhi; j0 += kKeys) {
        const uint16_t* kt = packed_k.data + (j0 - klo) / kKeys * block_elems;
        const uint16_t* vb = packed_v.data + (j0 - klo) / kKeys * block_elems;
        constexpr int64_t width = kKeys;  // (a partial last block is zero-padded and masked)
        amx_gemm_bf16(rows32, kKeys, d, q_rows.data, d, kt, kKeys, scores.data, kKeys, false);  // S = Q K^T
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const Visible vis = visible(p, shift, sk, i, j0, width);
          float* s = scores.data + r * kKeys;
          uint16_t* pr = probs.data + r * kKeys;
          if (vis.hi <= vis.lo) {  // nothing visible here: P row 0
            std::memset(pr, 0, sizeof(uint16_t) * width);
            continue;
          }
          // The scores in log2 units are s * mul: the block's max is max(s) * mul as long as mul > 0, and the
          // scale folds into the exponent's fma. Soft-capping (or a scale <= 0) rewrites them in place first.
          float mul = q_scale;
          if (p.softcap > 0.f || q_scale <= 0.f) {
            for (int64_t c = 0; c < width; c += Vec::W) {
              reg x = Vec::mul(Vec::load(s + c), Vec::set1(q_scale));
              if (p.softcap > 0.f) {
                alignas(64) float t[16];
                Vec::store(t, x);
                for (float& e : t) e = p.softcap * kLog2e * std::tanh(e / p.softcap);
                x = Vec::load(t);
              }
              Vec::store(s + c, x);
            }
            mul = 1.f;
          }
          reg mx = Vec::set1(kNegInf);
          if (vis.lo == 0 && vis.hi == width) {  // every key visible (most blocks): no mask
            for (int64_t c = 0; c < width; c += Vec::W) mx = Vec::max(mx, Vec::load(s + c));
          } else {
            for (int64_t c = 0; c < width; c += Vec::W) {
              const __mmask16 seen = visible_lanes(c, vis);
              const reg x = _mm512_mask_blend_ps(seen, Vec::set1(kNegInf), Vec::load(s + c));
              Vec::store(s + c, x);
              mx = Vec::max(mx, x);
            }
          }
          const float m_old = m_run[r], bmax = Vec::hmax(mx) * mul, m_new = m_old > bmax ? m_old : bmax;
          const float alpha = m_old == kNegInf ? 0.f : std::exp2(m_old - m_new);
          reg sum = Vec::zero();
          for (int64_t c = 0; c < width; c += Vec::W) {
            const reg e = Vec::exp2(Vec::fmadd(Vec::load(s + c), Vec::set1(mul), Vec::set1(-m_new)));
            sum = Vec::add(sum, e);
            store_bf16(pr + c, e);
          }
          l_run[r] = l_run[r] * alpha + Vec::hsum(sum);
          m_run[r] = m_new;
          if (alpha != 1.f) {
            float* o = out.data + r * d;
            int64_t e = 0;
            for (; e + Vec::W <= d; e += Vec::W) Vec::store(o + e, Vec::mul(Vec::load(o + e), Vec::set1(alpha)));
            for (; e < d; ++e) o[e] *= alpha;
          }
        }
        amx_gemm_bf16(rows32, d, kKeys, probs.data, kKeys, vb, d, out.data, d, true);  // O += P V
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, at = ((b * sq + i) * p.nheads + h) * d;
        float* lse = p.lse + (b * p.nheads + h) * sq + i;
        // (a row that sees no key: l = 0, output 0; d is a multiple of 32)
        const reg inv = Vec::set1(l_run[r] == 0.f ? 0.f : 1.f / l_run[r]);
        for (int64_t e = 0; e < d; e += Vec::W) {
          const reg y = Vec::mul(Vec::load(out.data + r * d + e), inv);
          if (p.out_bf16 != nullptr) {
            store_bf16(p.out_bf16 + at + e, y);
          } else {
            Vec::store(p.out + at + e, y);
          }
        }
        *lse = l_run[r] == 0.f ? kNegInf : (m_run[r] + std::log2(l_run[r])) * kLn2;
      }
    }
  }
  packed_k.release_above(2 << 20);
  packed_v.release_above(2 << 20);
}

}  // namespace llmkernels::attention_cpu

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (no AMX, so use_amx_bf16 is false)
namespace llmkernels::attention_cpu {
void fwd_tasks_amx(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
