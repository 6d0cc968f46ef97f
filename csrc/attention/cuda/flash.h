// Parameters and launcher declarations of the CUDA flash attention kernels. The host code
// (flash_api.cu) fills these structs and calls run_*; the kernels are instantiated per (dtype, head dim)
// in the flash_{fwd,bwd}_hdim*_*.cu files so nvcc compiles them in parallel.
//
// Layout: q, out (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim). Strides
// are in elements; the last dimension is contiguous and every stride is a multiple of 8 (16 bytes).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace llmk::flash {

// Head dims with compiled kernels; any other multiple of 8 runs on the next larger one (extra columns
// are zero-filled on load and never stored).
constexpr int kHeadDims[] = {32, 64, 96, 128, 192, 256};

struct AttnShape {
  int batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim;
  int group;                      // nheads / nheads_k: query heads per KV head
  int window_left, window_right;  // -1: unbounded (causal is window_right = 0)
  float softmax_scale;
  float scale_log2;               // softmax_scale * log2(e): scores live in the log2 domain
  float softcap;                  // 0: off; else s = softcap * tanh(softmax_scale * qk / softcap)
  float softcap_inner;            // softmax_scale / softcap
};

struct FwdParams : AttnShape {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* softmax_lse;  // (batch, nheads, seqlen_q); may be null (kvcache path)
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  // KV cache: batch row b sees keys [0, min(cache_seqlens[b] + seqlen_new, seqlen_k)); seqlen_k is then
  // the cache capacity. nullptr: every row sees seqlen_k keys.
  const int* cache_seqlens;
  int seqlen_new;

  // Split-KV (flash-decoding): num_splits > 1 writes per-split partials, normalised by the split's own
  // sum, to out_accum (num_splits, batch, nheads, seqlen_q, kHeadDim) and lse_accum (num_splits, batch,
  // nheads, seqlen_q); run_flash_combine merges them.
  int num_splits;
  float* out_accum;
  float* lse_accum;
};

struct BwdParams : AttnShape {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* softmax_lse;  // (batch, nheads, seqlen_q), contiguous
  float* delta;              // (batch, nheads, seqlen_q): rowsum(dout * out) - dsoftmax_lse, by the preprocess
  const float* dsoftmax_lse;  // (batch, nheads, seqlen_q) contiguous gradient reaching softmax_lse, or null
  float* dq_accum;           // (batch, seqlen_q, nheads, kHeadDim) fp32, zeroed
  // GQA (group > 1): dK, dV are summed over the group with atomics into zeroed fp32 buffers
  // (batch, seqlen_k, nheads_k, kHeadDim). group == 1: each CTA is the only writer of its keys and
  // stores dk, dv (batch, seqlen_k, nheads_k, headdim) contiguous in T directly; the accums are null.
  float* dk_accum;
  float* dv_accum;
  void* dk;
  void* dv;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
};

// T is __half or __nv_bfloat16; kHeadDim one of kHeadDims.
template <typename T, int kHeadDim>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream);

template <typename T, int kHeadDim>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream);

// Rows (block of queries) per forward CTA and keys per KV tile: the host needs them for the split count.
constexpr int kFwdBlockM = 64;
constexpr int fwd_block_n(int head_dim_padded) { return head_dim_padded <= 128 ? 64 : 32; }

// Auxiliary kernels (flash_aux.cu).
// Merges num_splits partials into out (layout of FwdParams::out); head_dim_padded is out_accum's last dim.
template <typename T>
void run_flash_combine(const FwdParams& params, int head_dim_padded, cudaStream_t stream);

// Writes k_new, v_new (batch, seqlen_new, nheads_k, headdim) into the caches (batch, max_seqlen, nheads_k,
// headdim) at rows cache_seqlens[b] + t; rows past max_seqlen are dropped. Strides: (batch, row, head).
struct AppendParams {
  void* k_cache;
  void* v_cache;
  const void* k_new;
  const void* v_new;
  const int* cache_seqlens;
  int batch, seqlen_new, nheads_k, headdim, max_seqlen;
  int64_t kc_stride[3], vc_stride[3], kn_stride[3], vn_stride[3];
};
template <typename T>
void run_kvcache_append(const AppendParams& params, cudaStream_t stream);

// delta = rowsum(dout * out) in fp32.
template <typename T>
void run_flash_bwd_preprocess(const BwdParams& params, cudaStream_t stream);

// dst (rows, headdim) contiguous in T <- src (rows, head_dim_padded) fp32.
template <typename T>
void run_convert_accum(T* dst, const float* src, int64_t rows, int headdim, int head_dim_padded,
                       cudaStream_t stream);

}  // namespace llmk::flash
