// The GQA-sharing decode kernel of flash_attn_with_kvcache (flash_decode_kernel.cuh), chosen by
// LLMKERNELS_DECODE_KERNEL=gqa for few query rows (flash_api.cu). It takes the FwdParams of the forward
// kernel; with num_splits > 1, out_accum is (num_splits, batch * seqlen_q * nheads, head-dim bucket) fp32 and
// lse_accum (num_splits, batch * seqlen_q * nheads) fp32 in log2 units (not the forward kernel's layout).
// Kept out of flash.h so that changing it does not recompile the forward and backward kernels.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "attention/cuda/flash.h"

namespace llmk::flash {

// Packed rows (query row i, query head kh * group + g, as in the forward kernel) one block serves: they share
// the block's KV head, so each K/V row is read once for all of them.
constexpr int kDecodeRowsPerBlock = 4;
// Blocks resident per SM (128 threads, <= 128 registers, 48 KB of pipeline + 4 KB of q in shared memory).
constexpr int kDecodeBlocksPerSm = 4;
// Most splits of a row's keys; the combine kernel keeps their weights in shared memory.
constexpr int kDecodeMaxSplits = 128;
// Packed rows (seqlen_q * group) up to which the dispatch uses this kernel: beyond that it re-reads K/V per
// tile of rows and runs without tensor cores, where the forward kernel is the right one.
constexpr int kDecodeMaxPackedRows = 16;

// Head-dim buckets of this kernel: a key row is read by bucket / 8 lanes, which must divide a warp.
inline int decode_head_dim_bucket(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 128 ? 128 : 256; }

inline int64_t decode_programs(const AttnShape& s) {
  const int64_t tiles = (int64_t(s.seqlen_q) * s.group + kDecodeRowsPerBlock - 1) / kDecodeRowsPerBlock;
  return int64_t(s.batch) * s.nheads_k * tiles;
}

// Queues the decode kernel (grid: decode_programs x num_splits) and, with num_splits > 1, its combine.
template <typename T, int kHeadDimMax>
void run_flash_decode_gqa(const FwdParams& params, cudaStream_t stream);

}  // namespace llmk::flash
