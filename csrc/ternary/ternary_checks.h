// Argument checks shared by the CPU and CUDA host code of the ternary ops (device checks stay with each).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace llmkernels::ternary {

// in_features padded to whole 256-weight packed blocks (64 bytes each), see llmkernels/reference/ternary.py
inline int64_t padded_in_features(int64_t in_features) { return (in_features + 255) / 256 * 256; }

// w_packed: uint8 (out_features, K_pad / 4), contiguous, on x's device. Returns K_pad.
inline int64_t check_packed_weight(const char* op, const at::Tensor& w_packed, const at::Tensor& x,
                                   int64_t in_features) {
  LLMK_CHECK_ARG(in_features > 0, op, "in_features", "must be positive, got ", in_features);
  LLMK_CHECK_SAME_DEVICE(op, w_packed, x);
  LLMK_CHECK_DTYPE(op, w_packed, at::kByte);
  LLMK_CHECK_DIM(op, w_packed, 2);
  LLMK_CHECK_CONTIGUOUS(op, w_packed);
  const int64_t k_pad = padded_in_features(in_features);
  LLMK_CHECK_ARG(w_packed.size(1) == k_pad / 4, op, "w_packed", "must have ", k_pad / 4,
                 " columns (in_features ", in_features, " padded to ", k_pad, ", 4 weights a byte), got ",
                 w_packed.sizes());
  return k_pad;
}

// x: (m, in_features) fp16/bf16/fp32, last dim contiguous; w_scale: fp32 with one element; bias: (N,) x's dtype.
inline void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& w_packed,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                              int64_t in_features) {
  LLMK_CHECK_ARG(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                 op, "x", "must be float16, bfloat16 or float32, got ", x.scalar_type());
  LLMK_CHECK_DIM(op, x, 2);
  LLMK_CHECK_ARG(x.size(1) == in_features, op, "x", "must have in_features = ", in_features, " columns, got ",
                 x.sizes());
  check_packed_weight(op, w_packed, x, in_features);
  LLMK_CHECK_SAME_DEVICE(op, w_scale, x);
  LLMK_CHECK_DTYPE(op, w_scale, at::kFloat);
  LLMK_CHECK_ARG(w_scale.numel() == 1, op, "w_scale", "must have one element, got shape ", w_scale.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    LLMK_CHECK_SAME_DEVICE(op, b, x);
    LLMK_CHECK_ARG(b.scalar_type() == x.scalar_type(), op, "bias", "must have x's dtype ", x.scalar_type(),
                   ", got ", b.scalar_type());
    LLMK_CHECK_ARG(b.dim() == 1 && b.size(0) == w_packed.size(0), op, "bias", "must have shape (",
                   w_packed.size(0), ",), got ", b.sizes());
  }
}

}  // namespace llmkernels::ternary
