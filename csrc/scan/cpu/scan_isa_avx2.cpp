// The per-row scan, conv1d and norm kernels (scan_rows.inc, conv_rows.inc, norm_rows.inc)
// compiled for avx2, chosen at run time by scan_cpu.cpp.
// Only plain C++ and intrinsics live under the target pragma (see scan_kernels.h for why).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "scan/cpu/scan_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace llmkernels::scan_cpu::isa_avx2 {
#include "scan/cpu/vec_avx2.inc"
#include "scan/cpu/vexp_poly.inc"
#include "scan/cpu/scan_rows.inc"
#include "scan/cpu/conv_rows.inc"
#include "scan/cpu/norm_rows.inc"
#include "scan/cpu/add_norm_rows.inc"
}  // namespace llmkernels::scan_cpu::isa_avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace llmkernels::scan_cpu {
Kernels kernels_avx2() {
  return {isa_avx2::fwd_row,
          isa_avx2::bwd_rows,
          isa_avx2::update_rows,
          isa_avx2::conv_update,
          isa_avx2::conv_row,
          isa_avx2::conv_row_bwd,
          isa_avx2::conv_tm_fwd,
          isa_avx2::conv_tm_bwd,
          isa_avx2::norm_fwd_rows,
          isa_avx2::norm_bwd_rows,
          isa_avx2::add_norm_fwd_rows,
          isa_avx2::add_norm_bwd_rows,
          isa_avx2::softplus_backward_inplace,
          isa_avx2::delta_row,
          isa_avx2::bf16_to_f32,
          isa_avx2::f32_to_bf16,
          "avx2"};
}
}  // namespace llmkernels::scan_cpu

#else  // not x86-64: the portable kernels

namespace llmkernels::scan_cpu {
Kernels kernels_avx2() { return kernels_scalar(); }
}  // namespace llmkernels::scan_cpu

#endif
