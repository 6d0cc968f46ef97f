// Plain-data interface between the ATen host code (attention_cpu.cpp) and the CPU kernel bodies, which are
// compiled once per instruction set (kernel_avx512.cpp, kernel_avx2.cpp, kernel_scalar.cpp) and chosen at
// run time. Nothing here includes ATen, so the per-ISA files can enable AVX-512 for everything they define
// without leaking wide instructions into inline functions shared with other translation units.
#pragma once

#include <cstdint>

namespace llmkernels::attention_cpu {

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Strided (batch, seqlen, heads, headdim) view; the last dimension is contiguous.
struct Tensor4 {
  const void* data;
  int64_t batch_stride, seq_stride, head_stride;  // in elements
};

struct AttnParams {
  ElemType dtype;  // of q, k, v (and dout / out in the backward)
  Tensor4 q, k, v;
  int64_t batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim;
  // Per-batch number of keys (the KV-cache op: cache_seqlens + new tokens); null means seqlen_k for all.
  const int32_t* seqlens_k;
  // KV-cache op only (the forward): batch b's keys start at key keys_start[b] (cache_leftpad, in [0, seqlens_k[b]]):
  // those before it are not keys. Null: all start at 0.
  const int32_t* keys_start;
  // KV-cache op only (the forward), both null otherwise. kv_batch (cache_batch_idx): batch b reads K / V batch
  // kv_batch[b]. block_table (paged KV): key s of batch b is row s % page_size of page
  // block_table[b * table_stride + s / page_size], k and v being (num_pages, page_size, hk, d) (batch_stride
  // steps pages). page_size is a multiple of kBlockK and key blocks start at multiples of kBlockK, so a block
  // never leaves its page.
  const int32_t* kv_batch;
  const int32_t* block_table;
  int64_t table_stride, page_size;
  // The rolling KV cache's chunks (sliding_window_cpu.cpp), forward only, null otherwise: batch b has seen
  // ring_seen[b] tokens before the chunk; key s of batch b is absolute position base + s, base = max(0,
  // ring_seen[b] - ring_window + 1), read from ring slot (base + s) % ring_window of k_ring / v_ring before the
  // chunk, else from k / v row base + s - ring_seen[b]. (seqlens_k[b] = ring_seen[b] - base + seqlen_q.)
  const int32_t* ring_seen;
  Tensor4 k_ring, v_ring;
  int64_t ring_window;
  float softmax_scale, softcap;  // softcap 0: off
  int64_t window_left, window_right;  // -1: unbounded
  // ALiBi, or null: the slope of (batch b, query head h) is alibi[b * alibi_batch_stride + h] (stride 0: one row
  // of slopes for every batch), and s_ij -= slope * |i + shift - j| after the soft-cap.
  const float* alibi;
  int64_t alibi_batch_stride;
  // Attention dropout (llmkernels/reference/dropout.py; flash_attn_fwd / _bwd and the varlen ops only): when set,
  // probability (batch b, query head h, query i, key j) is kept iff its 16-bit draw (common/philox.h key_draw) from
  // Philox4x32-10 on counter (j >> 3, i, (drop_batch0 + b) * nheads + h, 0), key (drop_key0, drop_key1), is
  // >= drop_threshold; kept ones are scaled by drop_scale = 1 / (1 - p). drop_batch0: a packed sequence's number
  // (its params are batch-of-one).
  bool dropout;
  uint32_t drop_key0, drop_key1, drop_threshold;
  float drop_scale;
  int64_t drop_batch0;

  // Forward: query heads of one KV head packed into each query block (1, or nheads / nheads_k so that a block
  // of K and V, once loaded, serves the whole GQA group: rows are (position, head) with the head fastest).
  int64_t heads_per_block;
  // Forward outputs: out (batch, seqlen_q, nheads, headdim) fp32 contiguous, lse (batch, nheads, seqlen_q) fp32.
  // The AMX forward writes bf16 rows into out_bf16 instead where the host sets it (out unused then): the fp32
  // buffer's fresh pages and the conversion pass after it had cost a quarter of a 2-thread call.
  float* out;
  uint16_t* out_bf16;
  float* lse;

  // Backward inputs: dout and the forward's out in `dtype` (strided like q); lse as above (read). Outputs, fp32
  // contiguous: dk / dv (batch, seqlen_k, nheads_k, headdim), and one dq like out per split of the key blocks,
  // (bwd_splits, batch, seqlen_q, nheads, headdim), which the host sums.
  Tensor4 dout, out_in;
  const float* lse_in;
  const float* dlse_in;  // gradient reaching lse (layout of lse_in), or null: none
  int64_t bwd_splits;
  float* dq;
  float* dk;
  float* dv;
  // The AMX backward writes the final bf16 gradients here instead where the host sets them (one split only; dq, dk,
  // dv unused then): (batch, seqlen_q, nheads, headdim) and (batch, seqlen_k, nheads_k, headdim) contiguous. The
  // fp32 buffers' fresh pages and the conversion after them had cost ~12% of a 1-thread bf16 forward+backward.
  uint16_t* dq_bf16;
  uint16_t* dk_bf16;
  uint16_t* dv_bf16;
};

// Largest per-thread copy of a KV head's K and V (bytes) the forward makes (flash_attn_kernel.h KVPack); a rolling
// cache's chunk (ring_seen) is only sent to these kernels when its window fits.
constexpr int64_t kMaxKVPackBytes = int64_t(64) << 20;

// Tile sizes shared by the host code (to count tasks) and the kernels.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

inline int64_t num_query_blocks(const AttnParams& p) { return (p.seqlen_q + kBlockQ - 1) / kBlockQ; }
inline int64_t num_fwd_tasks(const AttnParams& p) {
  const int64_t blocks = (p.seqlen_q * p.heads_per_block + kBlockQ - 1) / kBlockQ;
  return p.batch * (p.nheads / p.heads_per_block) * blocks;
}
inline int64_t num_key_blocks(const AttnParams& p) { return (p.seqlen_k + kBlockK - 1) / kBlockK; }
inline int64_t num_bwd_tasks(const AttnParams& p) { return p.batch * p.nheads_k * p.bwd_splits; }

// Each entry runs tasks [begin, end) of one parallel loop:
//   fwd:     task = (batch, head pack, query block) -> out, lse
//   bwd:     task = (batch, kv head, split)         -> dk, dv of the split's key blocks (summed over the query
//                                                      heads of the group), the split's dq buffer
#define LLMK_ATTN_DECLARE_ISA(isa)                                       \
  void fwd_tasks_##isa(const AttnParams& p, int64_t begin, int64_t end); \
  void bwd_tasks_##isa(const AttnParams& p, int64_t begin, int64_t end);

LLMK_ATTN_DECLARE_ISA(avx512)
LLMK_ATTN_DECLARE_ISA(avx512bf16)  // AVX-512 + BF16: differs from avx512 on bf16 inputs (vdpbf16ps)
LLMK_ATTN_DECLARE_ISA(avx2)
LLMK_ATTN_DECLARE_ISA(scalar)
#undef LLMK_ATTN_DECLARE_ISA

// bf16 forward on AMX tiles (kernel_amx.cpp): task = (batch, query head). Only where
// common/cpu_amx.h says so; needs a head dim that is a multiple of 32 and no KV-cache indirection.
void fwd_tasks_amx(const AttnParams& p, int64_t begin, int64_t end);
// bf16 backward likewise (kernel_amx_bwd.cpp): tasks as bwd_tasks_*, its key blocks kAmxBwdKeys long.
constexpr int64_t kAmxBwdKeys = 128;
void bwd_tasks_amx(const AttnParams& p, int64_t begin, int64_t end);

}  // namespace llmkernels::attention_cpu
