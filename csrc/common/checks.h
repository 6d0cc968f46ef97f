// Argument checks shared by every op's host code. Each message names the argument and what was
// expected, so a user sees "llmkernels.flash_attn_fwd: q must be contiguous in its last dimension"
// rather than an illegal memory access.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

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
