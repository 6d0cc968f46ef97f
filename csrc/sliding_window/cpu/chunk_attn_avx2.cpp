// The blocked chunk kernel of rolling_window_attn compiled for AVX2 + FMA (8 fp32 lanes; 4 x 2-register tile:
// 8 accumulators of 16 registers). Chosen at run time by sliding_window_cpu.cpp when AVX-512 is absent (or
// LLMKERNELS_CPU_ISA=avx2).
#include "sliding_window/cpu/chunk_attn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace {

#include "common/cpu_simd_avx2.h"

struct Vec : SimdAvx2 {
  static constexpr int MR = 4;  // register tile: MR rows x NV registers
  static constexpr int NV = 2;
};

}  // namespace

#define LLMK_CHUNK_ISA avx2
#include "sliding_window/cpu/chunk_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (sliding_window_cpu.cpp keeps the per-row kernel)
namespace llmkernels::sliding_window::cpu {
void chunk_attn_avx2(const ChunkParams&, int64_t, int64_t) {}
}  // namespace llmkernels::sliding_window::cpu
#endif
