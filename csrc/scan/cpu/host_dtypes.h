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
