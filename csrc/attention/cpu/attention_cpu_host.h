// Host-side pieces shared by the CPU attention ops (attention_cpu.cpp: dense and KV cache; attention_varlen_cpu.cpp:
// packed variable-length batches): the choice of kernel per instruction set, plain-data views of ATen tensors,
// and the threading rule. Included by host translation units only (compiled for the baseline ISA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "attention/attention_window.h"
#include "attention/cpu/flash_attn_cpu.h"
#include "common/checks.h"
#include "common/philox.h"
#include "common/cpu_amx.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"

namespace llmkernels::attention_cpu {

using TaskFn = void (*)(const AttnParams&, int64_t, int64_t);

struct Kernels {
  TaskFn fwd, bwd;
};

// Read per call (a few loads), so LLMKERNELS_CPU_ISA=avx2 set before the first call is honoured. bf16 inputs on
// CPUs with AVX512-BF16 take the kernels whose products run on vdpbf16ps.
inline Kernels kernels_for(ElemType dtype) {
  if (use_avx512()) {
    if (dtype == ElemType::kBFloat16 && cpu_features().avx512bf16) return {fwd_tasks_avx512bf16, bwd_tasks_avx512bf16};
    return {fwd_tasks_avx512, bwd_tasks_avx512};
  }
  if (use_avx2()) return {fwd_tasks_avx2, bwd_tasks_avx2};
  return {fwd_tasks_scalar, bwd_tasks_scalar};
}

// bf16 prefill on AMX CPUs goes through the tile kernels (kernel_amx.cpp, kernel_amx_bwd.cpp), for head dims a
// multiple of 32 (K is packed 16 pairs of bf16 at a time). In the forward, a few rows (decode) stay on the per-key
// dot products, which read the cache once, as do caches read through indirection (cache_batch_idx, pages) and a
// rolling cache's ring (its bf16 chunks have their own AMX entry: sliding_window/cpu/chunk_attn_amx.cpp).
// Both draw the dropout mask as the other kernels do (dropout_avx512.h).
inline bool use_amx_forward(const AttnParams& p) {
  return p.dtype == ElemType::kBFloat16 && p.headdim % 32 == 0 && p.seqlen_q >= 16 && p.kv_batch == nullptr &&
         p.block_table == nullptr && p.ring_seen == nullptr && p.keys_start == nullptr &&
         ::llmkernels::use_amx_tiles();
}
inline bool use_amx_backward(const AttnParams& p) {
  return p.dtype == ElemType::kBFloat16 && p.headdim % 32 == 0 && ::llmkernels::use_amx_tiles();
}

// The forward kernel for p and its number of tasks (choose_heads_per_block first: it sets the latter).
inline std::pair<TaskFn, int64_t> forward_plan(const AttnParams& p) {
  if (use_amx_forward(p)) return {fwd_tasks_amx, p.batch * p.nheads};
  return {kernels_for(p.dtype).fwd, num_fwd_tasks(p)};
}
inline TaskFn backward_kernel(const AttnParams& p) {
  return use_amx_backward(p) ? bwd_tasks_amx : kernels_for(p.dtype).bwd;
}
// Key blocks of the backward kernel for p: the most splits of a head's keys that all get work.
inline int64_t backward_key_blocks(const AttnParams& p) {
  return use_amx_backward(p) ? (p.seqlen_k + kAmxBwdKeys - 1) / kAmxBwdKeys : num_key_blocks(p);
}

constexpr int64_t kMaxHeadDim = 256;

inline ElemType elem_type(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kFloat16;
    default:
      TORCH_CHECK(false, "llmkernels.", op, ": q must have dtype float32, bfloat16 or float16, got ", q.scalar_type());
  }
}

// (batch, seqlen, heads, headdim) view of a 4-D tensor.
inline Tensor4 view4(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// Multiply-adds of one pass over the call (both products, every query against the keys its band can reach; the
// causal half not discounted): what decides whether threads pay.
inline double pass_macs(const AttnParams& p) {
  int64_t keys = p.seqlen_k;
  if (p.seqlens_k != nullptr) {  // the KV-cache op: the longest row, not the cache's capacity
    keys = 0;
    for (int64_t b = 0; b < p.batch; ++b) keys = std::max<int64_t>(keys, p.seqlens_k[b]);
  }
  if (p.window_left >= 0 && p.window_right >= 0) keys = std::min(keys, p.window_left + p.window_right + 1);
  return 2.0 * static_cast<double>(p.batch * p.nheads * p.seqlen_q) * static_cast<double>(keys) * p.headdim;
}

// Pack a GQA group's heads into each query block (K and V loaded once for the group) unless that leaves fewer
// tasks than threads (decode with a small batch), where one head per block keeps every thread busy.
inline void choose_heads_per_block(AttnParams& p, int64_t threads) {
  p.heads_per_block = std::max<int64_t>(1, p.nheads / std::max<int64_t>(p.nheads_k, 1));
  if (p.heads_per_block > 1 && num_fwd_tasks(p) < threads) p.heads_per_block = 1;
}

// The backward's optional gradient of softmax_lse: fp32 of softmax_lse's shape on its device, made contiguous;
// undefined when absent.
inline at::Tensor checked_dlse(const char* op, const std::optional<at::Tensor>& dsoftmax_lse,
                               const at::Tensor& softmax_lse) {
  if (!dsoftmax_lse.has_value() || !dsoftmax_lse->defined()) return {};
  const at::Tensor& dlse = *dsoftmax_lse;
  LLMK_CHECK_ARG(dlse.device() == softmax_lse.device(), op, "dsoftmax_lse", "must be on ", softmax_lse.device(),
                 ", got ", dlse.device());
  LLMK_CHECK_ARG(dlse.scalar_type() == at::kFloat, op, "dsoftmax_lse", "must have dtype float32, got ",
                 dlse.scalar_type());
  LLMK_CHECK_ARG(dlse.sizes() == softmax_lse.sizes(), op, "dsoftmax_lse", "must have softmax_lse's shape ",
                 softmax_lse.sizes(), ", got ", dlse.sizes());
  return dlse.contiguous();
}

// alibi_slopes, when given: fp32 (nheads,) or (batch, nheads) on q's device; sets p.alibi to a contiguous copy's
// data (returned: the caller holds it while the kernels run). batch: q's batch, or varlen's number of sequences.
inline at::Tensor set_alibi(const char* op, AttnParams& p, const std::optional<at::Tensor>& alibi_slopes,
                            const at::Tensor& q, int64_t batch) {
  p.alibi = nullptr;
  p.alibi_batch_stride = 0;
  if (!alibi_slopes.has_value() || !alibi_slopes->defined()) return {};
  const at::Tensor& s = *alibi_slopes;
  LLMK_CHECK_ARG(s.device() == q.device(), op, "alibi_slopes", "must be on ", q.device(), ", got ", s.device());
  LLMK_CHECK_ARG(s.scalar_type() == at::kFloat, op, "alibi_slopes", "must have dtype float32, got ", s.scalar_type());
  const int64_t nheads = q.size(-2);
  LLMK_CHECK_ARG((s.dim() == 1 && s.size(0) == nheads) || (s.dim() == 2 && s.size(0) == batch && s.size(1) == nheads),
                 op, "alibi_slopes", "must be (nheads = ", nheads, ",) or (batch = ", batch, ", nheads), got ",
                 s.sizes());
  at::Tensor held = s.contiguous();
  const float* slopes = held.data_ptr<float>();
  for (int64_t i = 0; i < held.numel(); ++i) {  // (a NaN or inf slope would make whole rows NaN, or -inf - -inf)
    LLMK_CHECK_ARG(std::isfinite(slopes[i]), op, "alibi_slopes", "must be finite, got ", slopes[i], " at ", i);
  }
  p.alibi = slopes;
  p.alibi_batch_stride = s.dim() == 2 ? nheads : 0;
  return held;
}

// dropout_p in [0, 1); with dropout_p > 0, dropout_seed an int64 (2,) CPU tensor of two 32-bit words (each taken
// modulo 2^32, as reference.dropout.seed_words). Sets p's dropout fields (off for dropout_p = 0). batch0: the number
// of p's first batch row (a packed sequence's).
inline void set_dropout(const char* op, AttnParams& p, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                        int64_t batch0 = 0) {
  LLMK_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, op, "dropout_p", "must be in [0, 1), got ", dropout_p);
  p.dropout = dropout_p > 0.0;
  p.drop_batch0 = batch0;
  if (!p.dropout) return;
  const bool given = dropout_seed.has_value() && dropout_seed->defined();
  LLMK_CHECK_ARG(given, op, "dropout_seed", "must be given when dropout_p > 0 (an int64 (2,) CPU tensor)");
  const at::Tensor& seed = *dropout_seed;
  LLMK_CHECK_ARG(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.size(0) == 2,
                 op, "dropout_seed", "must be an int64 (2,) CPU tensor, got ", seed.scalar_type(), " ", seed.sizes(),
                 " on ", seed.device());
  const at::Tensor words = seed.contiguous();
  p.drop_key0 = static_cast<uint32_t>(static_cast<uint64_t>(words.data_ptr<int64_t>()[0]));
  p.drop_key1 = static_cast<uint32_t>(static_cast<uint64_t>(words.data_ptr<int64_t>()[1]));
  p.drop_threshold = ::llmkernels::philox::keep_threshold(dropout_p);
  p.drop_scale = static_cast<float>(65536.0 / (65536.0 - p.drop_threshold));  // 1 / P(kept): exactly unbiased
}

inline void run_flushing(TaskFn fn, const AttnParams& p, int64_t begin, int64_t end) {
  const FlushDenormals ftz;
  fn(p, begin, end);
}

// Runs tasks [0, n) of one kernel over at::parallel_for's threads, when the call's multiply-adds pay for them.
inline void run_tasks(TaskFn fn, const AttnParams& p, int64_t n, double macs) {
  if (n <= 0) return;
  at::parallel_for(0, n, parallel_grain(n, macs, kMinAttnMacsPerThread),
                   [&](int64_t begin, int64_t end) { run_flushing(fn, p, begin, end); });
}

// The scalars of p once its shape (seqlen_q, seqlen_k) is set (checked by the caller): scale, softcap, and the
// window bounds normalised (-1 for a reach past the sequence).
inline void set_scalars(AttnParams& p, double softmax_scale, int64_t window_left, int64_t window_right,
                        double softcap) {
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = ::llmkernels::attention::normalize_window_left(window_left, p.seqlen_k);
  p.window_right = ::llmkernels::attention::normalize_window_right(window_right, p.seqlen_q);
}

// AttnParams of q, k, v (checked by the caller) for the flash-attention forward / backward kernels; seqlens_k,
// pages, ring and outputs unset.
inline AttnParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       double softmax_scale, int64_t window_left, int64_t window_right, double softcap) {
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);
  AttnParams p{};
  p.dtype = elem_type(op, q);
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  p.batch = q.size(0);
  p.seqlen_q = q.size(1);
  p.nheads = q.size(2);
  p.headdim = q.size(3);
  p.seqlen_k = k.size(1);
  p.nheads_k = k.size(2);
  set_scalars(p, softmax_scale, window_left, window_right, softcap);
  return p;
}

// Runs the forward into a fresh output (fp32, converted at the end; bf16 written directly by the AMX kernel);
// returns (out in q's dtype, lse).
inline std::tuple<at::Tensor, at::Tensor> run_forward(AttnParams& p, const at::Tensor& q) {
  auto f32 = q.options().dtype(at::kFloat);
  const bool direct_bf16 = use_amx_forward(p);  // (bf16 q only)
  at::Tensor out = at::empty({p.batch, p.seqlen_q, p.nheads, p.headdim}, direct_bf16 ? q.options() : f32);
  at::Tensor lse = at::empty({p.batch, p.nheads, p.seqlen_q}, f32);
  p.out = direct_bf16 ? nullptr : out.data_ptr<float>();
  p.out_bf16 = direct_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  p.lse = lse.data_ptr<float>();
  choose_heads_per_block(p, at::get_num_threads());
  const auto [kernel, tasks] = forward_plan(p);
  run_tasks(kernel, p, tasks, pass_macs(p));
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

}  // namespace llmkernels::attention_cpu
