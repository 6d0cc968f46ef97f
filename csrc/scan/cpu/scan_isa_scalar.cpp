// The per-row scan, conv1d and norm kernels (scan_rows.inc, conv_rows.inc, norm_rows.inc) with one fp32 lane
// and std::exp: the portable fallback.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "scan/cpu/scan_kernels.h"

namespace llmkernels::scan_cpu::isa_scalar {
#include "scan/cpu/vec_scalar.inc"
#include "scan/cpu/scan_rows.inc"
#include "scan/cpu/conv_rows.inc"
#include "scan/cpu/norm_rows.inc"
#include "scan/cpu/add_norm_rows.inc"
}  // namespace llmkernels::scan_cpu::isa_scalar

namespace llmkernels::scan_cpu {
Kernels kernels_scalar() {
  return {isa_scalar::fwd_row,
          isa_scalar::bwd_rows,
          isa_scalar::update_rows,
          isa_scalar::conv_update,
          isa_scalar::conv_row,
          isa_scalar::conv_row_bwd,
          isa_scalar::conv_tm_fwd,
          isa_scalar::conv_tm_bwd,
          isa_scalar::norm_fwd_rows,
          isa_scalar::norm_bwd_rows,
          isa_scalar::add_norm_fwd_rows,
          isa_scalar::add_norm_bwd_rows,
          isa_scalar::softplus_backward_inplace,
          isa_scalar::delta_row,
          isa_scalar::bf16_to_f32,
          isa_scalar::f32_to_bf16,
          "scalar"};
}
}  // namespace llmkernels::scan_cpu
