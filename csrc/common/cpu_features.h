// Run-time CPU feature detection for the C++ CPU kernels. Kernels compile their wide paths with
// __attribute__((target("..."))) and pick one at run time, so one binary runs on AVX2-only machines
// and uses AVX-512 / VNNI / BF16 where the CPU has them.
#pragma once

#include <cstdlib>
#include <string>

namespace llmkernels {

struct CpuFeatures {
  bool avx2;
  bool fma;
  bool avx512f;
  bool avx512bw;
  bool avx512vnni;
  bool avx512bf16;
};

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r{};
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bw = __builtin_cpu_supports("avx512bw");
    r.avx512vnni = __builtin_cpu_supports("avx512vnni");
    r.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
    return r;
  }();
  return f;
}

// LLMKERNELS_CPU_ISA=avx2 caps the CPU kernels at AVX2 and LLMKERNELS_CPU_ISA=scalar at the portable code, so
// tests can exercise every path on an AVX-512 machine. Read once per process.
inline const std::string& cpu_isa_cap() {
  static const std::string cap = [] {
    const char* v = std::getenv("LLMKERNELS_CPU_ISA");
    return std::string(v != nullptr ? v : "");
  }();
  return cap;
}
inline bool cpu_isa_capped_at_avx2() { return cpu_isa_cap() == "avx2" || cpu_isa_cap() == "scalar"; }

inline bool use_avx512() { return cpu_features().avx512f && cpu_features().avx512bw && !cpu_isa_capped_at_avx2(); }
inline bool use_avx512_vnni() { return use_avx512() && cpu_features().avx512vnni; }
inline bool use_avx2() { return cpu_features().avx2 && cpu_features().fma && cpu_isa_cap() != "scalar"; }

// The widest instruction set the CPU kernels pick on this machine, for `llmkernels info`.
inline std::string cpu_kernel_isa() {
  if (use_avx512_vnni() && cpu_features().avx512bf16) return "avx512+vnni+bf16";
  if (use_avx512_vnni()) return "avx512+vnni";
  if (use_avx512()) return "avx512";
  if (use_avx2()) return "avx2";
  return "scalar";
}

}  // namespace llmkernels
