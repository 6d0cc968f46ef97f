// Whether bf16 matrix products go to AMX tiles, for host code only (it includes ATen; never include it from a file
// compiled under an AVX-512 target switch).
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <string>

#include "common/cpu_features.h"

namespace llmkernels {

// ATen packs bf16 for its brgemm only where the CPU has AMX tiles (Sapphire Rapids and later), and its bf16 GEMMs
// then run on them. The AMX paths (the attention forward's brgemm kernel, the ternary weight-only GEMM) also need
// AVX-512 (LLMKERNELS_CPU_ISA caps it) and are off with LLMKERNELS_CPU_AMX=0. Read once.
inline bool use_amx_bf16() {
  static const bool amx = [] {
    const char* env = std::getenv("LLMKERNELS_CPU_AMX");
    return !(env != nullptr && std::string(env) == "0") && use_avx512() &&
           at::native::cpublas::could_pack(at::kBFloat16);
  }();
  return amx;
}

}  // namespace llmkernels
