// How finely the C++ CPU kernels split work across at::parallel_for's threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: every x86-64)
#endif

namespace llmkernels {

// Grain for at::parallel_for over `tasks` tasks that together do `work` units (multiply-adds): threads only for
// chunks of at least `min_per_thread` units, so a small call (a decode step over a short cache) runs on the
// calling thread, where waking the pool, or waiting for a worker that a busy machine has descheduled for a whole
// scheduler tick, costs more than the work (a 60 us step took 8 ms on 2 threads beside another busy process).
inline int64_t parallel_grain(int64_t tasks, double work, double min_per_thread) {
  const double per_task = std::max(work / static_cast<double>(std::max<int64_t>(tasks, 1)), 1.0);
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(min_per_thread / per_task)));
}

// ~5-10 us of one core's multiply-adds: below this per thread, the attention kernels stay on one thread.
constexpr double kMinAttnMacsPerThread = 1 << 18;

// Flush-to-zero (and denormals-are-zero) while an attention kernel runs on this thread: masked scores are -inf, and
// each 2^(-inf - max) that underflows otherwise costs an Intel core a microcode assist (a causal AMX forward had
// taken as long as a full one). Nothing those kernels compute needs denormals. The thread's MXCSR is restored after.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

}  // namespace llmkernels
