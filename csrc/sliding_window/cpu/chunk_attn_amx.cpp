// bf16 chunks of rolling_window_attn on AMX tiles (Sapphire Rapids and later): the flash-attention AMX forward of one
// query head (attention/cpu/amx_forward.h) over key positions read from the ring and the chunk.
//
// Task = (batch, query head). The chunk's queries sit at positions n .. n + S - 1 (n = seqlens[b]) and see keys
// p - W + 1 .. p: in flash-attention terms seqlen_k = n + S, shift n, window (W - 1, 0). A task packs its KV head's
// K^T and V into the tiles' B layout (unless the thread's previous task, a head of the same GQA group, did), key
// position j read where it lies: ring slot j % W before the chunk, chunk row j - n from it. Positions that block
// rounding adds below the oldest one any query sees read a ring slot that now holds a newer key: finite, and
// masked. The blocked fp32 kernel (chunk_attn_kernel.h) converted every key tile to fp32 for each block of queries
// and ran ~5x behind this (W 4096, S 1024, 32 / 8 heads, d 128, 2 threads).
#include "sliding_window/cpu/chunk_attn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "attention/cpu/flash_attn_cpu.h"  // AttnParams, for amx_common.h's visible()

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

#include "attention/cpu/amx_forward.h"

// Key position j of one (batch, KV head): ring slot j % window before the chunk (j < n), chunk row j - n from it.
struct RingThenChunk {
  const uint16_t* ring;
  int64_t ring_ld;
  const uint16_t* chunk;
  int64_t chunk_ld, n, window;
  const uint16_t* row(int64_t j) const { return j < n ? ring + (j % window) * ring_ld : chunk + (j - n) * chunk_ld; }
};

const uint16_t* head_rows(const llmkernels::sliding_window::cpu::RowView& t, int64_t b, int64_t h) {
  return static_cast<const uint16_t*>(t.data) + b * t.sb + h * t.sh;
}

}  // namespace

namespace llmkernels::sliding_window::cpu {

void chunk_attn_amx(const ChunkParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.head_dim, sq = p.chunk, window = p.window, nheads = p.nheads_k * p.group;
  static thread_local Buffer<uint16_t> packed_k, packed_v;
  static thread_local AmxForwardScratch scratch;
  scratch.reserve(d);
  const AmxTiles tiles;
  // (run with flush-to-zero by the host)

  int64_t packed_for = -1;  // (batch, KV head) whose K and V are packed: a GQA group's heads are consecutive tasks
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % nheads, b = task / nheads, hk = h / p.group;
    const int64_t n = p.seqlens[b], sk = n + sq;
    int64_t klo = imax(0, n - window + 1);  // the oldest key the first query sees
    klo -= klo % kAmxKeys;
    if (packed_for != b * p.nheads_k + hk) {
      const RingThenChunk k{head_rows(p.k_ring, b, hk), p.k_ring.ss, head_rows(p.k, b, hk), p.k.ss, n, window};
      const RingThenChunk v{head_rows(p.v_ring, b, hk), p.v_ring.ss, head_rows(p.v, b, hk), p.v.ss, n, window};
      amx_pack_keys(k, v, klo, sk, sk, d, packed_k, packed_v);
      packed_for = b * p.nheads_k + hk;
    }
    amx_forward_head({.q = head_rows(p.q, b, h),
                      .q_ld = p.q.ss,
                      .sq = sq,
                      .d = d,
                      .packed_k = packed_k.data,
                      .packed_v = packed_v.data,
                      .klo = klo,
                      .khi = sk,
                      .sk = sk,
                      .shift = n,  // seqlen_k - seqlen_q
                      .left = window - 1,
                      .right = 0,
                      .scale = p.scale,
                      .softcap = p.softcap,
                      .out_bf16 = static_cast<uint16_t*>(p.out.data) + b * p.out.sb + h * p.out.sh,
                      .out_f32 = nullptr,
                      .out_ld = p.out.ss,
                      .lse = nullptr,
                      .lse_ld = 0},
                     scratch);
  }
  packed_k.release_above(1 << 20);
  packed_v.release_above(1 << 20);
}

}  // namespace llmkernels::sliding_window::cpu

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (no AMX)
namespace llmkernels::sliding_window::cpu {
void chunk_attn_amx(const ChunkParams&, int64_t, int64_t) {}
}  // namespace llmkernels::sliding_window::cpu
#endif
