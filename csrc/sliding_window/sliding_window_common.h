// Argument checks shared by the CPU and CUDA host code of rolling_window_attn / rolling_cache_append,
// so both backends refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"

namespace llmkernels::sliding_window {

// Sizes of one call. Attention tensors are (batch, seqlen, heads, head_dim) as in flash_attn.
struct Dims {
  int64_t batch, chunk, nheads, nheads_k, head_dim, window;
};

// k, v: (b, S, hk, d) the chunk; k_ring, v_ring: (b, W, hk, d) contiguous; seqlens: (b,) int32.
inline Dims check_chunk_and_ring(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_ring,
                                 const at::Tensor& v_ring, const at::Tensor& seqlens, c10::DeviceType device) {
  LLMK_CHECK_DIM(op, k, 4);
  LLMK_CHECK_DIM(op, k_ring, 4);
  LLMK_CHECK_DEVICE(op, k, device);
  LLMK_CHECK_SAME_DEVICE(op, v, k);
  LLMK_CHECK_SAME_DEVICE(op, k_ring, k);
  LLMK_CHECK_SAME_DEVICE(op, v_ring, k);
  LLMK_CHECK_SAME_DEVICE(op, seqlens, k);
  const auto st = k.scalar_type();
  LLMK_CHECK_ARG(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, "k",
                 "must have dtype float32, float16 or bfloat16, got ", st);
  LLMK_CHECK_SAME_DTYPE(op, v, k);
  LLMK_CHECK_SAME_DTYPE(op, k_ring, k);
  LLMK_CHECK_SAME_DTYPE(op, v_ring, k);
  LLMK_CHECK_DTYPE(op, seqlens, at::kInt);
  Dims d{};
  d.batch = k.size(0);
  d.chunk = k.size(1);
  d.nheads_k = k.size(2);
  d.head_dim = k.size(3);
  d.window = k_ring.size(1);
  LLMK_CHECK_ARG(d.chunk >= 1, op, "k", "must hold at least one token, got ", k.sizes());
  LLMK_CHECK_ARG(d.window >= 1, op, "k_ring", "must have a window (dim 1) of at least 1, got ", k_ring.sizes());
  LLMK_CHECK_SHAPE(op, v, d.batch, d.chunk, d.nheads_k, d.head_dim);
  LLMK_CHECK_SHAPE(op, k_ring, d.batch, d.window, d.nheads_k, d.head_dim);
  LLMK_CHECK_SHAPE(op, v_ring, d.batch, d.window, d.nheads_k, d.head_dim);
  LLMK_CHECK_SHAPE(op, seqlens, d.batch);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, k);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, v);
  LLMK_CHECK_CONTIGUOUS(op, k_ring);
  LLMK_CHECK_CONTIGUOUS(op, v_ring);
  LLMK_CHECK_CONTIGUOUS(op, seqlens);
  return d;
}

// q: (b, S, h, d) with h a multiple of hk, finite scalars, plus everything check_chunk_and_ring checks.
inline Dims check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_ring, const at::Tensor& v_ring, const at::Tensor& seqlens,
                            double softmax_scale, double softcap, c10::DeviceType device) {
  LLMK_CHECK_DIM(op, q, 4);
  LLMK_CHECK_DEVICE(op, q, device);
  Dims d = check_chunk_and_ring(op, k, v, k_ring, v_ring, seqlens, device);
  LLMK_CHECK_SAME_DTYPE(op, k, q);
  d.nheads = q.size(2);
  LLMK_CHECK_ARG(q.size(0) == d.batch && q.size(1) == d.chunk && q.size(3) == d.head_dim, op, "q",
                 "must have shape (", d.batch, ", ", d.chunk, ", nheads, ", d.head_dim, ") like k, got ", q.sizes());
  LLMK_CHECK_ARG(d.nheads_k >= 1, op, "k", "must have at least one head, got shape ", k.sizes());
  LLMK_CHECK_ARG(d.nheads % d.nheads_k == 0, op, "q", "must have nheads (", d.nheads,
                 ") a multiple of k's nheads_k (", d.nheads_k, ")");
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, q);
  check_attention_scalars(op, softmax_scale, softcap);
  return d;
}

}  // namespace llmkernels::sliding_window
