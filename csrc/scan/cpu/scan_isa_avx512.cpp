// The per-row scan, conv1d and norm kernels (scan_rows.inc, conv_rows.inc, norm_rows.inc)
// compiled for avx512, chosen at run time by scan_cpu.cpp.
// Only plain C++ and intrinsics live under the target pragma (see scan_kernels.h for why).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "scan/cpu/scan_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif

namespace llmkernels::scan_cpu::isa_avx512 {
#include "scan/cpu/vec_avx512.inc"
#include "scan/cpu/vexp_poly.inc"
#include "scan/cpu/scan_rows.inc"
#include "scan/cpu/conv_rows.inc"
#include "scan/cpu/norm_rows.inc"
#include "scan/cpu/add_norm_rows.inc"
}  // namespace llmkernels::scan_cpu::isa_avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace llmkernels::scan_cpu {
Kernels kernels_avx512() {
  return {isa_avx512::fwd_row,
          isa_avx512::bwd_rows,
          isa_avx512::update_rows,
          isa_avx512::conv_update,
          isa_avx512::conv_row,
          isa_avx512::conv_row_bwd,
          isa_avx512::conv_tm_fwd,
          isa_avx512::conv_tm_bwd,
          isa_avx512::norm_fwd_rows,
          isa_avx512::norm_bwd_rows,
          isa_avx512::add_norm_fwd_rows,
          isa_avx512::add_norm_bwd_rows,
          isa_avx512::softplus_backward_inplace,
          isa_avx512::delta_row,
          isa_avx512::bf16_to_f32,
          isa_avx512::f32_to_bf16,
          "avx512"};
}
}  // namespace llmkernels::scan_cpu

#else  // not x86-64: the portable kernels

namespace llmkernels::scan_cpu {
Kernels kernels_avx512() { return kernels_scalar(); }
}  // namespace llmkernels::scan_cpu

#endif
