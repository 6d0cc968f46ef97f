// The attention window bounds as the CPU and CUDA kernels take them (shared by attention_cpu.cpp and
// cuda/flash_api.cu).
#pragma once

#include <cstdint>

namespace llmkernels::attention {

// Key j is visible from query i when i + shift - left <= j <= i + shift + right (shift = seqlen_k - seqlen_q;
// -1: unbounded). A left bound >= seqlen_k or a right bound >= seqlen_q excludes no key, so it is folded into -1:
// the kernels' band arithmetic (i + shift + right, j - shift + left) then never sees a huge value (up to
// INT64_MAX, which overflowed), and what remains fits an int.
inline int64_t normalize_window_left(int64_t left, int64_t seqlen_k) {
  return left < 0 || left >= seqlen_k ? -1 : left;
}
inline int64_t normalize_window_right(int64_t right, int64_t seqlen_q) {
  return right < 0 || right >= seqlen_q ? -1 : right;
}

}  // namespace llmkernels::attention
