// Pools of decode states (selective_state_update's state_batch_indices, causal_conv1d_update's conv_state_indices):
// batch row b steps pool row rows[b]; a negative index is a pad slot, whose row is left out (no state changes, its
// output 0). Checked on the host before any state changes: below the pool's row count, distinct unless negative.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/checks.h"

namespace llmkernels::scan_cpu {

struct PoolRows {
  at::Tensor indices;        // (batch,) int32 contiguous; undefined: batch row b is pool row b
  bool any_skipped = false;  // some row is a pad slot: the output must start zeroed
  const int32_t* rows() const { return indices.defined() ? indices.data_ptr<int32_t>() : nullptr; }
};

inline PoolRows checked_pool_rows(const char* op, const char* name, const std::optional<at::Tensor>& indices,
                                  const at::Tensor& x, int64_t pool_rows) {
  PoolRows pool;
  if (!indices.has_value() || !indices->defined()) return pool;
  const int64_t batch = x.size(0);
  const at::Tensor& t = *indices;
  LLMK_CHECK_ARG(t.device() == x.device(), op, name, "must be on x's device (", x.device(), "), got ", t.device());
  LLMK_CHECK_ARG(t.scalar_type() == at::kInt, op, name, "must have dtype int32, got ", t.scalar_type());
  LLMK_CHECK_ARG(t.dim() == 1 && t.size(0) == batch, op, name, "must have shape (", batch, "), got ", t.sizes());
  pool.indices = t.contiguous();
  const int32_t* r = pool.indices.data_ptr<int32_t>();
  std::vector<bool> used(pool_rows, false);
  for (int64_t i = 0; i < batch; ++i) {
    LLMK_CHECK_ARG(r[i] < pool_rows, op, name, "must be below ", pool_rows,
                   " (the state's rows; negative: a pad slot), got ", r[i], " at ", i);
    if (r[i] < 0) {
      pool.any_skipped = true;
      continue;
    }
    LLMK_CHECK_ARG(!used[r[i]], op, name, "must be distinct: ", r[i], " repeats");
    used[r[i]] = true;
  }
  return pool;
}

}  // namespace llmkernels::scan_cpu
