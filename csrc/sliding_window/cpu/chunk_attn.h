// Blocked CPU kernel of rolling_window_attn for chunks (several queries per call): the interface between
// sliding_window_cpu.cpp (host code, dispatch) and the per-instruction-set copies of chunk_attn_kernel.h
// (chunk_attn_avx512.cpp, chunk_attn_avx2.cpp). Plain structs only, so no ATen type crosses the ISA boundary.
#pragma once

#include <cstdint>

namespace llmkernels::sliding_window::cpu {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// A (batch, seqlen, heads, head_dim) tensor with a contiguous last dimension, addressed by row (element strides).
struct RowView {
  void* data;
  int64_t sb, ss, sh;
};

struct ChunkParams {
  RowView q, k, v, k_ring, v_ring, out;  // q, out: (b, S, h, d); k, v: (b, S, hk, d); rings: (b, W, hk, d)
  const int32_t* seqlens;                // (b,) tokens seen before the chunk
  int64_t batch, chunk, nheads_k, group, head_dim, window;
  int64_t block_q;  // query positions per task; a task's rows are block_q * group (position, head) pairs
  float scale, softcap;
  Dtype dtype;
};

// Tasks of the flattened (batch, kv head, query block) grid.
inline int64_t chunk_attn_tasks(const ChunkParams& p) {
  return p.batch * p.nheads_k * ((p.chunk + p.block_q - 1) / p.block_q);
}

// Runs tasks [begin, end). Call only the one the CPU supports (common/cpu_features.h).
void chunk_attn_avx512(const ChunkParams& p, int64_t begin, int64_t end);
void chunk_attn_avx2(const ChunkParams& p, int64_t begin, int64_t end);

// bf16 chunks on AMX tiles (chunk_attn_amx.cpp): tasks [begin, end) of the (batch, query head) grid, head_dim a
// multiple of 32; only where common/cpu_amx.h use_amx_tiles() says the tiles may be used.
void chunk_attn_amx(const ChunkParams& p, int64_t begin, int64_t end);

}  // namespace llmkernels::sliding_window::cpu
