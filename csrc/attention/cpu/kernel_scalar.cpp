// The CPU attention kernels in portable C++ (one lane per "register"; the compiler may still auto-vectorise).
// Used on CPUs without AVX2/FMA and on non-x86 machines.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention/cpu/flash_attn_cpu.h"

namespace {

struct Vec {
  using reg = float;
  static constexpr int W = 1;
  static constexpr int MR4 = 0;  // rows of a 4-register-wide tile (0: none)
  static constexpr int MR = 4;
  static reg zero() { return 0.f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static reg load(const uint16_t* p) {  // one bf16 value, widened exactly
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static void store(float* p, reg x) { *p = x; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg max(reg a, reg b) { return std::max(a, b); }
  static float hmax(reg x) { return x; }
  static float hsum(reg x) { return x; }
  static reg exp(reg x) { return std::exp(x); }
  static reg exp2(reg x) { return std::exp2(x); }
  static void transpose(const float* src, int64_t, reg* out) { out[0] = src[0]; }
};

}  // namespace

#define LLMK_ISA scalar
#include "attention/cpu/flash_attn_kernel.h"
