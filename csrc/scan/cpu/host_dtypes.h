// Host-side dtype helpers of the Mamba family's CPU ops (scan, conv1d, gated norm).
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace llmkernels::scan_cpu {

inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32 / fp16 / bf16 (and fp64, computed in fp32). Not is_floating_point(): that also admits the float8 types,
// which the conversions have no case for.
inline bool is_float_io(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

}  // namespace llmkernels::scan_cpu

#define LLMK_CHECK_FLOAT_IO(op, name, t)                                                                           \
  LLMK_CHECK_ARG(::llmkernels::scan_cpu::is_float_io((t).scalar_type()), op, name,                                \
                 "must be float32, float16, bfloat16 or float64, got ", (t).scalar_type())

namespace llmkernels::scan_cpu {

// A norm's operand beside x: the given shape, a float dtype the kernels take, x's device.
inline void check_norm_operand(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                               const at::Tensor& x) {
  LLMK_CHECK_ARG(t.sizes() == shape, op, name, "must have shape ", shape, ", got ", t.sizes());
  LLMK_CHECK_FLOAT_IO(op, name, t);
  LLMK_CHECK_ARG(t.device() == x.device(), op, name, "must be on ", x.device(), ", got ", t.device());
}

}  // namespace llmkernels::scan_cpu
