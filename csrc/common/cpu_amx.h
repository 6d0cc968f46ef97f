// Whether bf16 matrix products can run on AMX tiles, for host code only (it includes ATen; never include it from a
// file compiled under an AVX-512 target switch).
#pragma once

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/cpu_features.h"

namespace llmkernels {

// LLMKERNELS_CPU_AMX=0 turns every AMX path off; they also need AVX-512 (LLMKERNELS_CPU_ISA caps it).
inline bool amx_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("LLMKERNELS_CPU_AMX");
    return !(env != nullptr && std::string(env) == "0") && use_avx512();
  }();
  return allowed;
}

// ATen packs bf16 for its brgemm only where the CPU has AMX tiles (Sapphire Rapids and later), and its bf16 GEMMs
// then run on them: the ternary weight-only GEMM hands its products to torch there. Read once.
inline bool use_amx_bf16() {
  static const bool amx = amx_allowed() && at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
}

// Our own tile kernels (common/cpu_amx_tiles.h) need the CPU's AMX-TILE (CPUID leaf 7, EDX bit 24) and Linux's
// leave to use the tile registers, asked once per process (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA;
// refused by kernels before 5.16 or where a VM hides the state), then the instructions of each kind: AMX-BF16
// (bit 22: the attention forward and backward), AMX-INT8 (bit 25: the ternary int8 GEMM). Each read once.
inline bool amx_cpuid_bit(int bit) {
#if defined(__x86_64__) && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && ((edx >> bit) & 1) != 0;
#else
  (void)bit;
  return false;
#endif
}
inline bool amx_tiles_permitted() {
  static const bool permitted = [] {
    if (!amx_allowed() || !amx_cpuid_bit(24)) return false;
#if defined(__x86_64__) && defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return permitted;
}
inline bool use_amx_tiles() {
  static const bool bf16 = amx_tiles_permitted() && amx_cpuid_bit(22);
  return bf16;
}
inline bool use_amx_int8_tiles() {
  static const bool int8 = amx_tiles_permitted() && amx_cpuid_bit(25);
  return int8;
}

}  // namespace llmkernels
