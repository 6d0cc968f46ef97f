// The CPU attention kernels compiled for AVX-512 (16 fp32 lanes; 8 x 2 register micro-kernel, 16 accumulators
// of 32 registers). Chosen at run time by attention_cpu.cpp when the CPU has AVX-512F/BW.
#include "attention/cpu/flash_attn_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx2,fma")
#endif

namespace {

#include "common/cpu_simd_avx512.h"

struct Vec : SimdAvx512 {
  static constexpr int MR4 = 6;  // rows of a 4-register-wide tile (0: none)
  static constexpr int MR = 8;
};

}  // namespace

#define LLMK_ISA avx512
#include "attention/cpu/flash_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (attention_cpu.cpp picks the scalar kernels)
namespace llmkernels::attention_cpu {
void fwd_tasks_avx512(const AttnParams&, int64_t, int64_t) {}
void bwd_dkv_tasks_avx512(const AttnParams&, int64_t, int64_t) {}
void bwd_dq_tasks_avx512(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
