// The CPU attention kernels compiled for AVX2 + FMA (8 fp32 lanes; 4 x 2 register micro-kernel, 8 accumulators
// of 16 registers). Chosen at run time by attention_cpu.cpp when AVX-512 is absent (or LLMKERNELS_CPU_ISA=avx2).
#include "attention/cpu/flash_attn_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace {

#include "common/cpu_simd_avx2.h"

struct Vec : SimdAvx2 {
  static constexpr int MR4 = 0;  // rows of a 4-register-wide tile (0: none)
  static constexpr int MR = 4;
};

}  // namespace

#define LLMK_ISA avx2
#include "attention/cpu/flash_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (attention_cpu.cpp picks the scalar kernels)
namespace llmkernels::attention_cpu {
void fwd_tasks_avx2(const AttnParams&, int64_t, int64_t) {}
void bwd_dkv_tasks_avx2(const AttnParams&, int64_t, int64_t) {}
void bwd_dq_tasks_avx2(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
