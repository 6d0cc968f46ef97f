// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind attention dropout: four 32-bit words (eight 16-bit dropout draws) from a 128-bit
// counter and a 64-bit key, no state, so any (query, key) pair's draw is recomputed wherever it is needed (the
// backward recomputes the forward's mask). llmkernels/reference/dropout.py defines the mask; this file is its C++
// side, host and device.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define LLMK_PHILOX_FN __host__ __device__ __forceinline__
#else
#define LLMK_PHILOX_FN inline
#endif

namespace llmkernels::philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr int kRounds = 10;

struct Words {
  uint32_t w[4];
};

// One round on counter x with key (k0, k1): the two 32 x 32 -> 64-bit products mix words 0 and 2 into all four.
LLMK_PHILOX_FN void mix_round(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * x0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * x2;
  const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
  const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
  x1 = static_cast<uint32_t>(p1);
  x3 = static_cast<uint32_t>(p0);
  x0 = y0;
  x2 = y2;
}

// The four output words of counter (c0, c1, c2, c3) under key (k0, k1).
LLMK_PHILOX_FN Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    mix_round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout draws 16 bits per probability, eight per call: key j of a row takes bits [16 (j % 2), 16 (j % 2) + 16) of
// word (j % 8) / 2 of counter (j / 8, ...). A draw below the threshold drops its probability (P(kept) = 1 - p up to
// 2^-16), as reference.dropout.keep_threshold: min(floor(p * 2^16), 2^16 - 1) in double.
constexpr int kKeysPerCall = 8;
LLMK_PHILOX_FN uint32_t keep_threshold(double dropout_p) {
  const double t = dropout_p * 65536.0;
  return t >= 65535.0 ? 0xFFFFu : static_cast<uint32_t>(t);  // (truncation is floor for t >= 0)
}
// Draw of key j (any j: its position among the call's eight) from the call's words.
LLMK_PHILOX_FN uint32_t key_draw(const Words& words, int64_t j) {
  return (words.w[(j & 7) >> 1] >> (16 * (j & 1))) & 0xFFFFu;
}

}  // namespace llmkernels::philox

#undef LLMK_PHILOX_FN
