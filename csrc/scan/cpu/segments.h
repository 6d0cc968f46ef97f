// Packed sequences (seq_idx) on the CPU: where each row's sequences start. Host code (uses ATen); shared by the
// selective scan (scan_cpu.cpp) and the causal conv1d (conv1d_cpu.cpp), which both run each sequence of a row as a
// row of its own: their row kernels treat what comes before a row's first step as zero.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace llmkernels::scan_cpu {

// Packed sequences: for each batch element, the time steps where a sequence starts (seq_idx[t] != seq_idx[t - 1],
// and t = 0), then L. Without seq_idx every row is one sequence. The kernels run each sequence as a row of its own
// (rows treat the state before their first step as the one they are handed: zero for all but the first).
struct Segments {
  std::vector<int64_t> starts;  // per batch element b: starts[offsets[b] .. offsets[b + 1]), the last being L
  std::vector<int64_t> offsets;

  const int64_t* begin(int64_t b) const { return starts.data() + offsets[b]; }
  int64_t count(int64_t b) const { return offsets[b + 1] - offsets[b] - 1; }
};

inline Segments find_segments(const char* op, const std::optional<at::Tensor>& seq_idx, int64_t batch, int64_t L) {
  Segments s;
  s.offsets.reserve(batch + 1);
  if (seq_idx) {
    const at::Tensor& idx = *seq_idx;
    LLMK_CHECK_ARG(idx.scalar_type() == at::kInt, op, "seq_idx", "must be int32, got ", idx.scalar_type());
    LLMK_CHECK_ARG(idx.device().is_cpu(), op, "seq_idx", "must be on the CPU, got ", idx.device());
    LLMK_CHECK_ARG(idx.dim() == 2 && idx.size(0) == batch && idx.size(1) == L, op, "seq_idx",
                   "must have shape (batch, seqlen) = (", batch, ", ", L, "), got ", idx.sizes());
    LLMK_CHECK_ARG(idx.is_contiguous(), op, "seq_idx", "must be contiguous");
  }
  const int32_t* idx = seq_idx ? seq_idx->const_data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    s.offsets.push_back(static_cast<int64_t>(s.starts.size()));
    s.starts.push_back(0);
    if (idx)
      for (int64_t t = 1; t < L; ++t)
        if (idx[b * L + t] != idx[b * L + t - 1]) s.starts.push_back(t);
    s.starts.push_back(L);
  }
  s.offsets.push_back(static_cast<int64_t>(s.starts.size()));
  return s;
}

}  // namespace llmkernels::scan_cpu
