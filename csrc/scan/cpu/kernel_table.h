// The table of scan / conv1d / norm kernels (scan_kernels.h) for this machine, chosen once per process.
// LLMKERNELS_CPU_ISA=avx2 / scalar (cpu_features.h) select the other builds for tests.
#pragma once

#include "common/cpu_features.h"
#include "scan/cpu/scan_kernels.h"

namespace llmkernels::scan_cpu {

inline const Kernels& kernels() {
  static const Kernels k = use_avx512() ? kernels_avx512() : use_avx2() ? kernels_avx2() : kernels_scalar();
  return k;
}

}  // namespace llmkernels::scan_cpu
