// The bf16 attention forward for CPUs with AMX tiles (Sapphire Rapids and later): the two products of each (query
// block, key block) pair on the tiles (common/cpu_amx_tiles.h: bf16 pairs, fp32 accumulation), the online softmax
// between them on AVX-512. Where AMX is present, SDPA's bf16 CPU kernel uses it too, and the vdpbf16ps kernel
// (kernel_avx512bf16.cpp) ran 3-5x behind it.
//
// Task = (batch, query head). A task packs its KV head's K^T and V (unless the previous task of the thread, a head
// of the same GQA group, did), 256 keys a block, into the tiles' B layout (pairs of rows interleaved as 32-bit
// words), then streams its query blocks through amx_forward_head (amx_forward.h, shared with the rolling KV cache's
// chunks). Chosen by attention_cpu_host.h (use_amx_forward) for bf16 prefill calls only; it runs with
// flush-to-zero. Dropout: each head's P is masked a row of a block at a time (dropout_avx512.h DropoutRows).
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

using llmkernels::attention_cpu::AttnParams;

#include "attention/cpu/dropout_avx512.h"

#include "attention/cpu/amx_forward.h"

}  // namespace

namespace llmkernels::attention_cpu {

void fwd_tasks_amx(const AttnParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.headdim, sq = p.seqlen_q, group = p.nheads / p.nheads_k;
  // Per thread and kept between calls (~1.4 MB at d 128 for 2k keys): fresh ones cost every call its page faults
  // and unmaps. The packed K / V grow with the keys: past 2 MB each they are freed at the end of the call.
  static thread_local Buffer<uint16_t> packed_k, packed_v;
  static thread_local AmxForwardScratch scratch;
  scratch.reserve(d);
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
    klo -= klo % kAmxKeys;
    if (packed_for != b * p.nheads_k + hk) {  // (klo, khi depend on the batch row only: the same for the group)
      const Rows k{static_cast<const uint16_t*>(p.k.data) + b * p.k.batch_stride + hk * p.k.head_stride,
                   p.k.seq_stride};
      const Rows v{static_cast<const uint16_t*>(p.v.data) + b * p.v.batch_stride + hk * p.v.head_stride,
                   p.v.seq_stride};
      amx_pack_keys(k, v, klo, khi, sk, d, packed_k, packed_v);
      packed_for = b * p.nheads_k + hk;
    }
    const int64_t out_row0 = (b * sq * p.nheads + h) * d;  // out: (batch, sq, nheads, d) contiguous
    const AmxHead head{.q = static_cast<const uint16_t*>(p.q.data) + b * p.q.batch_stride + h * p.q.head_stride,
                       .q_ld = p.q.seq_stride,
                       .sq = sq,
                       .d = d,
                       .packed_k = packed_k.data,
                       .packed_v = packed_v.data,
                       .klo = klo,
                       .khi = khi,
                       .sk = sk,
                       .shift = shift,
                       .left = left,
                       .right = right,
                       .scale = p.softmax_scale,
                       .softcap = p.softcap,
                       .alibi_slope = p.alibi != nullptr ? p.alibi[b * p.alibi_batch_stride + h] : 0.f,
                       .out_bf16 = p.out_bf16 != nullptr ? p.out_bf16 + out_row0 : nullptr,
                       .out_f32 = p.out_bf16 != nullptr ? nullptr : p.out + out_row0,
                       .out_ld = p.nheads * d,
                       .lse = p.lse + (b * p.nheads + h) * sq,
                       .lse_ld = 1};
    if (p.dropout) {
      amx_forward_head(head, scratch, dropout_rows(p, b, h));
    } else {
      amx_forward_head(head, scratch);
    }
  }
  packed_k.release_above(1 << 20);
  packed_v.release_above(1 << 20);
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
