// Argument checks shared by every op's host code. Each message names the argument and what was
// expected, so a user sees "llmkernels.flash_attn_fwd: q must be contiguous in its last dimension"
// rather than an illegal memory access.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#define LLMK_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "llmkernels.", op, ": ", arg, " ", __VA_ARGS__)

#define LLMK_CHECK_DEVICE(op, t, device_type)                                                           \
  LLMK_CHECK_ARG((t).device().type() == (device_type), op, #t, "must be on ", c10::DeviceTypeName(device_type), \
                 ", got ", (t).device())

#define LLMK_CHECK_SAME_DEVICE(op, t, ref)                                                               \
  LLMK_CHECK_ARG((t).device() == (ref).device(), op, #t, "must be on the same device as ", #ref, " (", (ref).device(), \
                 "), got ", (t).device())

#define LLMK_CHECK_DTYPE(op, t, dtype) \
  LLMK_CHECK_ARG((t).scalar_type() == (dtype), op, #t, "must have dtype ", (dtype), ", got ", (t).scalar_type())

#define LLMK_CHECK_SAME_DTYPE(op, t, ref)                                                                 \
  LLMK_CHECK_ARG((t).scalar_type() == (ref).scalar_type(), op, #t, "must have the dtype of ", #ref, " (", \
                 (ref).scalar_type(), "), got ", (t).scalar_type())

#define LLMK_CHECK_DIM(op, t, n) LLMK_CHECK_ARG((t).dim() == (n), op, #t, "must have ", n, " dimensions, got ", (t).sizes())

#define LLMK_CHECK_SHAPE(op, t, ...)                                                                \
  LLMK_CHECK_ARG((t).sizes() == at::IntArrayRef({__VA_ARGS__}), op, #t, "must have shape ",          \
                 at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

#define LLMK_CHECK_CONTIGUOUS(op, t) LLMK_CHECK_ARG((t).is_contiguous(), op, #t, "must be contiguous")

#define LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, t) \
  LLMK_CHECK_ARG((t).stride(-1) == 1, op, #t, "must be contiguous in its last dimension, got strides ", (t).strides())

#define LLMK_CHECK_FINITE(op, x) LLMK_CHECK_ARG(std::isfinite(x), op, #x, "must be finite, got ", x)

namespace llmkernels {

// The scalars of the attention ops (flash attention, rolling-window attention; CPU and CUDA): NaN or infinite
// ones would turn every score into NaN; softcap 0 disables the cap, and a negative one is refused as the Python
// API refuses it, not silently taken as off.
// The kernels take both as fp32 and the CPU ones flush subnormals to 0, so each must be a normal fp32 number: a
// scale past FLT_MAX would be inf; a softcap under FLT_MIN would be 0 there, silently no cap, and one past 1e30
// (it enters as s * (1 / c)) would flush scores to 0, where tanh(s / c) c is s anyway (as the Python checks).
inline void check_attention_scalars(const char* op, double softmax_scale, double softcap) {
  LLMK_CHECK_FINITE(op, softmax_scale);
  LLMK_CHECK_FINITE(op, softcap);
  LLMK_CHECK_ARG(softcap >= 0, op, "softcap", "must be >= 0 (0 disables it), got ", softcap);
  LLMK_CHECK_ARG(std::fabs(softmax_scale) <= std::numeric_limits<float>::max(), op, "softmax_scale",
                 "must fit fp32 (the kernels' precision), got ", softmax_scale);
  LLMK_CHECK_ARG(softcap == 0 || (softcap >= std::numeric_limits<float>::min() && softcap <= 1e30), op, "softcap",
                 "must be 0 or a normal fp32 number up to 1e30 (the kernels' precision), got ", softcap);
}

}  // namespace llmkernels

namespace llmkernels {

// Whether no two elements of t share memory. Sufficient test: taken by increasing stride, each dimension steps
// past everything the smaller ones reach. Every non-overlapping layout torch makes (permutations, slices,
// padded rows) passes; broadcast (stride 0) and other self-overlapping views fail.
inline bool has_no_overlap(const at::Tensor& t) {
  if (t.numel() <= 1) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions that step
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // largest element offset the dimensions so far address
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

}  // namespace llmkernels

// For tensors an op writes in place: a write through overlapping elements would land several results on one.
#define LLMK_CHECK_NO_OVERLAP(op, t)                                                                          \
  LLMK_CHECK_ARG(::llmkernels::has_no_overlap(t), op, #t, "is written in place and must not have overlapping " \
                 "elements (e.g. a broadcast view), got shape ", (t).sizes(), " and strides ", (t).strides())
