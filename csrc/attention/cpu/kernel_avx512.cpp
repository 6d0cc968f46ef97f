// The CPU attention kernels compiled for AVX-512 (16 fp32 lanes; register tiles up to 6 x 4 in the forward,
// 8 x 2 in the shared micro-kernel; the Vec in vec_avx512.h). Chosen at run time by attention_cpu.cpp when the
// CPU has AVX-512F/BW (bf16 inputs on CPUs with AVX512-BF16 take kernel_avx512bf16.cpp instead).
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

#include "attention/cpu/vec_avx512.h"

}  // namespace

#define LLMK_ISA avx512
#define LLMK_ATTN_PHILOX_AVX512 1  // the dropout masks' Philox on AVX-512 (GCC leaves its lane loops scalar)
#include "attention/cpu/flash_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (attention_cpu.cpp picks the scalar kernels)
namespace llmkernels::attention_cpu {
void fwd_tasks_avx512(const AttnParams&, int64_t, int64_t) {}
void bwd_tasks_avx512(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
