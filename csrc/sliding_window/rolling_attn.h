// Parameters and launchers of the CUDA rolling-window attention kernels (rolling_attn_kernel.cuh).
// Plain C++ so the host code can include it; the launchers are instantiated per dtype in
// rolling_attn_fp16.cu / rolling_attn_bf16.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace llmkernels::sliding_window {

struct RollingAttnParams {
  // q, out: (batch, chunk, nheads, head_dim); k, v: (batch, chunk, nheads_k, head_dim), strides in elements,
  // rows 16-byte aligned. k_ring, v_ring: (batch, window, nheads_k, head_dim) contiguous.
  const void* q;
  const void* k;
  const void* v;
  const void* k_ring;
  const void* v_ring;
  void* out;
  const int32_t* seqlens;  // (batch,) tokens before the chunk
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
  int batch, chunk, nheads, nheads_k, head_dim, window;
  float scale;    // softmax_scale
  float softcap;  // 0: off
  // Flash-decoding split of each row's window: split s covers keys [s * keys_per_split, (s + 1) * keys_per_split)
  // of the row's window. With num_splits > 1 the partial results go to out_partial (num_splits, rows, head_dim)
  // fp32 and lse_partial (num_splits, rows) fp32 (log2 units), rows = batch * chunk * nheads, then a combine.
  int num_splits, keys_per_split;
  float* out_partial;
  float* lse_partial;
};

// Query heads one block serves: a tile of the nheads / nheads_k heads that share a KV head, so each K/V row
// is read once for all of them. Blocks per split: batch * chunk * nheads_k * head tiles (<= the q rows).
constexpr int kHeadsPerBlock = 4;
// Most splits of a window (the host never asks for more; the combine kernel holds their weights in shared memory).
constexpr int kMaxSplits = 64;

inline int64_t rolling_attn_programs(int64_t batch, int64_t chunk, int64_t nheads, int64_t nheads_k) {
  const int64_t head_tiles = (nheads / nheads_k + kHeadsPerBlock - 1) / kHeadsPerBlock;
  return batch * chunk * nheads_k * head_tiles;
}

template <typename T, int kHeadDimMax>
void launch_rolling_attn(const RollingAttnParams& p, cudaStream_t stream);

}  // namespace llmkernels::sliding_window
