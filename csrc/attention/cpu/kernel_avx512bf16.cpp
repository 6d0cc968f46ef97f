// The CPU attention kernels compiled for AVX-512 with the BF16 extension (Zen 4, Cooper Lake, Sapphire Rapids
// and later): the same kernels as kernel_avx512.cpp, except that on bf16 inputs the forward's two products and
// the backward's five run on vdpbf16ps (two bf16 products per fp32 lane, accumulated in fp32: twice the FMA
// throughput). As on the GPU, only the probabilities (forward and backward) and dS (backward) are rounded to
// bf16, and only as product operands; scores, dP, lse, D and all accumulators stay fp32. Chosen at run time by
// attention_cpu.cpp for bf16 inputs when the CPU has AVX512-BF16 (fp32 / fp16 inputs here run the fp32 code).
#include "attention/cpu/flash_attn_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")
#endif

namespace {

#include "common/cpu_simd_avx512.h"

#include "attention/cpu/vec_avx512.h"

}  // namespace

#define LLMK_ISA avx512bf16
#define LLMK_ATTN_BF16_DOT 1
#define LLMK_ATTN_PHILOX_AVX512 1  // the dropout masks' Philox on AVX-512 (GCC leaves its lane loops scalar)
#include "attention/cpu/flash_attn_kernel.h"

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (attention_cpu.cpp picks the scalar kernels)
namespace llmkernels::attention_cpu {
void fwd_tasks_avx512bf16(const AttnParams&, int64_t, int64_t) {}
void bwd_tasks_avx512bf16(const AttnParams&, int64_t, int64_t) {}
}  // namespace llmkernels::attention_cpu
#endif
