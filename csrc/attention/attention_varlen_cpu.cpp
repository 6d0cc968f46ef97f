// Host side of the CPU variable-length (packed) flash attention ops, flash_attn_varlen_{fwd,bwd} (schemas in
// csrc/registration.cpp). Sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q (total_q, h, d) and
// cu_seqlens_k[b] .. of k, v (total_k, hk, d). The dense kernels run unchanged: each sequence becomes a batch-of-one
// AttnParams whose pointers start at its first row, and one parallel loop runs the tasks of all sequences, so many
// short sequences still share the threads. Rows in no sequence get out 0 / lse -inf and zero gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention_window.h"
#include "attention/cpu/attention_cpu_host.h"

namespace llmkernels::attention_cpu {
namespace {

// q (total_q, h, d); k, v (total_k, hk, d); cu_seqlens_q / _k (batch + 1,) int32 on the CPU, each starting at or
// after row 0, non-decreasing, ending at or before its tensor's last row. Returns the offsets as int64 vectors.
std::pair<std::vector<int64_t>, std::vector<int64_t>> check_varlen(const char* op, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& cu_seqlens_q,
                                                                   const at::Tensor& cu_seqlens_k) {
  LLMK_CHECK_DEVICE(op, q, at::kCPU);
  LLMK_CHECK_SAME_DEVICE(op, k, q);
  LLMK_CHECK_SAME_DEVICE(op, v, q);
  LLMK_CHECK_DIM(op, q, 3);
  LLMK_CHECK_DIM(op, k, 3);
  LLMK_CHECK_DIM(op, v, 3);
  elem_type(op, q);
  LLMK_CHECK_SAME_DTYPE(op, k, q);
  LLMK_CHECK_SAME_DTYPE(op, v, q);
  const int64_t d = q.size(2), total_k = k.size(0), hk = k.size(1);
  LLMK_CHECK_ARG(d >= 1 && d <= kMaxHeadDim, op, "q", "must have a head dim in [1, ", kMaxHeadDim, "], got ", d);
  LLMK_CHECK_SHAPE(op, k, total_k, hk, d);
  LLMK_CHECK_SHAPE(op, v, total_k, hk, d);
  LLMK_CHECK_ARG(hk >= 1 && q.size(1) % hk == 0, op, "k", "must have a number of heads dividing q's (", q.size(1),
                 "), got ", hk);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, q);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, k);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, v);

  std::vector<int64_t> offsets[2];
  const std::pair<const char*, const at::Tensor*> cus[2] = {{"cu_seqlens_q", &cu_seqlens_q},
                                                           {"cu_seqlens_k", &cu_seqlens_k}};
  const int64_t totals[2] = {q.size(0), total_k};
  for (int which = 0; which < 2; ++which) {
    const char* name = cus[which].first;
    const at::Tensor& cu = *cus[which].second;
    LLMK_CHECK_ARG(cu.device() == q.device(), op, name, "must be on q's device (", q.device(), "), got ", cu.device());
    LLMK_CHECK_ARG(cu.scalar_type() == at::kInt, op, name, "must have dtype int32, got ", cu.scalar_type());
    LLMK_CHECK_ARG(cu.dim() == 1 && cu.size(0) >= 1, op, name, "must be 1-D with batch + 1 >= 1 entries, got shape ",
                   cu.sizes());
    const at::Tensor c = cu.contiguous();
    const int32_t* x = c.data_ptr<int32_t>();
    std::vector<int64_t>& off = offsets[which];
    off.assign(x, x + c.size(0));
    LLMK_CHECK_ARG(off.front() >= 0, op, name, "must start at a row >= 0, got ", off.front());
    for (size_t i = 1; i < off.size(); ++i) {
      LLMK_CHECK_ARG(off[i] >= off[i - 1], op, name, "must be non-decreasing, got ", off[i - 1], " then ", off[i],
                     " at entry ", i);
    }
    LLMK_CHECK_ARG(off.back() <= totals[which], op, name, "must end at or before its tensor's ", totals[which],
                   " rows, got ", off.back());
  }
  LLMK_CHECK_ARG(offsets[0].size() == offsets[1].size(), op, "cu_seqlens_k",
                 "must have as many entries as cu_seqlens_q (", offsets[0].size(), "), got ", offsets[1].size());
  return {std::move(offsets[0]), std::move(offsets[1])};
}

// A 3-D (rows, heads, headdim) tensor's rows from `row` on, as a batch-of-one (1, seqlen, heads, headdim) view.
Tensor4 rows_from(const at::Tensor& t, int64_t row) {
  const char* base = static_cast<const char*>(t.data_ptr()) + row * t.stride(0) * t.element_size();
  return {base, 0, t.stride(0), t.stride(1)};
}

// One batch-of-one AttnParams per sequence; output pointers are set by the callers.
std::vector<AttnParams> sequence_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::vector<int64_t>& cu_q, const std::vector<int64_t>& cu_k,
                                        double softmax_scale, int64_t window_left, int64_t window_right,
                                        double softcap) {
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);
  std::vector<AttnParams> seqs(cu_q.size() - 1);
  for (size_t b = 0; b + 1 < cu_q.size(); ++b) {
    AttnParams& p = seqs[b];
    p = AttnParams{};
    p.dtype = elem_type(op, q);
    p.q = rows_from(q, cu_q[b]);
    p.k = rows_from(k, cu_k[b]);
    p.v = rows_from(v, cu_k[b]);
    p.batch = 1;
    p.seqlen_q = cu_q[b + 1] - cu_q[b];
    p.seqlen_k = cu_k[b + 1] - cu_k[b];
    p.nheads = q.size(1);
    p.nheads_k = k.size(1);
    p.headdim = q.size(2);
    set_scalars(p, softmax_scale, window_left, window_right, softcap);
    p.heads_per_block = 1;
    p.bwd_splits = 1;
  }
  return seqs;
}

// Points each sequence's params at its row of alibi_slopes ((nheads,): the same row for all; (batch, nheads)),
// after checking them; returns the contiguous slopes the pointers read (held by the caller), undefined if none.
at::Tensor set_sequence_alibi(const char* op, std::vector<AttnParams>& seqs,
                              const std::optional<at::Tensor>& alibi_slopes, const at::Tensor& q) {
  AttnParams all{};
  at::Tensor held = set_alibi(op, all, alibi_slopes, q, static_cast<int64_t>(seqs.size()));
  for (size_t b = 0; b < seqs.size(); ++b) {
    seqs[b].alibi = all.alibi != nullptr ? all.alibi + b * all.alibi_batch_stride : nullptr;
    seqs[b].alibi_batch_stride = 0;  // batch-of-one params
  }
  return held;
}

// Dropout for every sequence: sequence b draws its mask as batch row b (reference: first_b = b), i and j counted
// within the sequence (its params start at its first rows).
void set_sequence_dropout(const char* op, std::vector<AttnParams>& seqs, double dropout_p,
                          const std::optional<at::Tensor>& dropout_seed) {
  AttnParams checked{};  // (checked once, even without sequences)
  set_dropout(op, checked, dropout_p, dropout_seed);
  for (size_t b = 0; b < seqs.size(); ++b) {
    AttnParams& p = seqs[b];
    p.dropout = checked.dropout;
    p.drop_key0 = checked.drop_key0;
    p.drop_key1 = checked.drop_key1;
    p.drop_threshold = checked.drop_threshold;
    p.drop_scale = checked.drop_scale;
    p.drop_batch0 = static_cast<int64_t>(b);
  }
}

// Runs every sequence's tasks in one parallel loop: plan(p) gives sequence p's kernel and number of tasks.
template <typename Plan>
void run_sequences(const std::vector<AttnParams>& seqs, Plan plan, double macs_factor) {
  std::vector<int64_t> first(seqs.size() + 1, 0);  // first global task of each sequence
  std::vector<TaskFn> fns(seqs.size());
  double macs = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [fn, tasks] = plan(seqs[s]);
    fns[s] = fn;
    first[s + 1] = first[s] + tasks;
    macs += macs_factor * pass_macs(seqs[s]);
  }
  const int64_t n = first.back();
  if (n <= 0) return;
  at::parallel_for(0, n, parallel_grain(n, macs, kMinAttnMacsPerThread), [&](int64_t begin, int64_t end) {
    size_t s = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t t = begin; t < end; ++s) {
      const int64_t stop = std::min(end, first[s + 1]);
      if (stop > t) run_flushing(fns[s], seqs[s], t - first[s], stop - first[s]);
      t = std::max(t, stop);
    }
  });
}

// Sets each sequence's bwd_splits: 1, unless its (sequence, KV head) tasks do not divide evenly among the threads,
// then threads / gcd as the dense op (at most 8, at most its key blocks). A sequence without query rows has no
// tasks and no dq rows: 1 (no split buffer is made for it).
void backward_splits(std::vector<AttnParams>& seqs, int64_t nheads_k, int64_t threads) {
  int64_t units = 0;
  for (const AttnParams& p : seqs) units += p.seqlen_q > 0 ? nheads_k : 0;
  const int64_t splits = units > 0 ? std::clamp<int64_t>(threads / std::gcd(units, threads), 1, 8) : 1;
  for (AttnParams& p : seqs) {
    p.bwd_splits = p.seqlen_q == 0 ? 1 : std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, backward_key_blocks(p)));
  }
}

// Rows [0, cu.front()) and [cu.back(), rows) of a (rows, ...) tensor belong to no sequence.
void fill_rows_outside(at::Tensor t, const std::vector<int64_t>& cu, double value) {
  if (cu.front() > 0) t.narrow(0, 0, cu.front()).fill_(value);
  if (cu.back() < t.size(0)) t.narrow(0, cu.back(), t.size(0) - cu.back()).fill_(value);
}

// (nheads, total_q) -> each sequence's rows as a (nheads, seqlen) block, the blocks end to end in sequence order.
at::Tensor to_blocks(const at::Tensor& per_head, const std::vector<int64_t>& cu_q, int64_t nheads) {
  const int64_t total_q = per_head.size(1);
  const at::Tensor src = per_head.contiguous();
  at::Tensor blocks = at::empty({total_q * nheads}, src.options());
  for (size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const int64_t len = cu_q[b + 1] - cu_q[b];
    for (int64_t h = 0; h < nheads; ++h) {
      std::memcpy(blocks.data_ptr<float>() + cu_q[b] * nheads + h * len, src.data_ptr<float>() + h * total_q + cu_q[b],
                  sizeof(float) * len);
    }
  }
  return blocks;
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, double softmax_scale,
                                                             int64_t window_left, int64_t window_right,
                                                             double softcap,
                                                             const std::optional<at::Tensor>& alibi_slopes,
                                                             double dropout_p,
                                                             const std::optional<at::Tensor>& dropout_seed) {
  constexpr const char* op = "flash_attn_varlen_fwd";
  // max_seqlen_q / _k size GPU launches; here every sequence's own length is known, so they are not needed.
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  auto [cu_q, cu_k] = check_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k);
  std::vector<AttnParams> seqs =
      sequence_params(op, q, k, v, cu_q, cu_k, softmax_scale, window_left, window_right, softcap);
  const at::Tensor alibi = set_sequence_alibi(op, seqs, alibi_slopes, q);
  set_sequence_dropout(op, seqs, dropout_p, dropout_seed);
  const int64_t total_q = q.size(0), nheads = q.size(1), d = q.size(2);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({total_q, nheads, d}, f32);
  // The kernels write each sequence's lse as a (nheads, seqlen) block; blocks lie end to end in sequence order.
  at::Tensor lse_blocks = at::empty({total_q * nheads}, f32);
  const int64_t threads = at::get_num_threads();
  for (size_t b = 0; b < seqs.size(); ++b) {
    seqs[b].out = out.data_ptr<float>() + cu_q[b] * nheads * d;
    seqs[b].lse = lse_blocks.data_ptr<float>() + cu_q[b] * nheads;
    choose_heads_per_block(seqs[b], threads);
  }
  run_sequences(seqs, [](const AttnParams& p) { return forward_plan(p); }, 1.0);

  fill_rows_outside(out, cu_q, 0.0);
  at::Tensor lse = at::empty({nheads, total_q}, f32);  // flash_attn's varlen layout
  fill_rows_outside(lse.t(), cu_q, -std::numeric_limits<double>::infinity());
  float* dst = lse.data_ptr<float>();
  const float* src = lse_blocks.data_ptr<float>();
  for (size_t b = 0; b < seqs.size(); ++b) {
    const int64_t len = seqs[b].seqlen_q;
    for (int64_t h = 0; h < nheads; ++h) {
      std::memcpy(dst + h * total_q + cu_q[b], src + cu_q[b] * nheads + h * len, sizeof(float) * len);
    }
  }
  return {q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& dsoftmax_lse, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  constexpr const char* op = "flash_attn_varlen_bwd";
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  auto [cu_q, cu_k] = check_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    LLMK_CHECK_ARG(t.device() == q.device(), op, name, "must be on the device of q, got ", t.device());
    LLMK_CHECK_ARG(t.sizes() == q.sizes(), op, name, "must have q's shape ", q.sizes(), ", got ", t.sizes());
    LLMK_CHECK_ARG(t.scalar_type() == q.scalar_type(), op, name, "must have q's dtype ", q.scalar_type(), ", got ",
                   t.scalar_type());
    LLMK_CHECK_ARG(t.stride(-1) == 1, op, name, "must be contiguous in its last dimension, got strides ",
                   t.strides());
  }
  const int64_t total_q = q.size(0), nheads = q.size(1), d = q.size(2);
  LLMK_CHECK_SAME_DEVICE(op, softmax_lse, q);
  LLMK_CHECK_DTYPE(op, softmax_lse, at::kFloat);
  LLMK_CHECK_SHAPE(op, softmax_lse, nheads, total_q);

  std::vector<AttnParams> seqs =
      sequence_params(op, q, k, v, cu_q, cu_k, softmax_scale, window_left, window_right, softcap);
  const at::Tensor alibi = set_sequence_alibi(op, seqs, alibi_slopes, q);
  set_sequence_dropout(op, seqs, dropout_p, dropout_seed);
  auto f32 = q.options().dtype(at::kFloat);
  // The kernels read each sequence's lse (and dlse) as a (nheads, seqlen) block (the forward's layout before its
  // reshuffle).
  const at::Tensor lse_blocks = to_blocks(softmax_lse, cu_q, nheads);
  const at::Tensor dlse = checked_dlse(op, dsoftmax_lse, softmax_lse);
  const at::Tensor dlse_blocks = dlse.defined() ? to_blocks(dlse, cu_q, nheads) : at::Tensor();
  at::Tensor dq = at::empty({total_q, nheads, d}, f32);
  at::Tensor dk = at::empty({k.size(0), k.size(1), d}, f32);
  at::Tensor dv = at::empty_like(dk);
  // One task per (sequence, KV head) owns its gradients. When those do not divide evenly among the threads (a
  // few long sequences), each sequence's key blocks are split as the dense op splits them, every split adding
  // into its own dq buffer (summed below in split order: deterministic).
  backward_splits(seqs, k.size(1), at::get_num_threads());
  int64_t split_rows = 0;  // rows of the per-split dq buffers: sum over split sequences of splits x seqlen_q
  for (const AttnParams& p : seqs) split_rows += p.bwd_splits > 1 ? p.bwd_splits * p.seqlen_q : 0;
  at::Tensor dq_parts = split_rows > 0 ? at::empty({split_rows, nheads, d}, f32) : at::Tensor();
  int64_t next_part = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    AttnParams& p = seqs[b];
    p.dout = rows_from(dout, cu_q[b]);
    p.out_in = rows_from(out, cu_q[b]);
    p.lse_in = lse_blocks.data_ptr<float>() + cu_q[b] * nheads;
    p.dlse_in = dlse_blocks.defined() ? dlse_blocks.data_ptr<float>() + cu_q[b] * nheads : nullptr;
    if (p.bwd_splits > 1) {  // (bwd_splits, seqlen_q, nheads, d) of its own
      p.dq = dq_parts.data_ptr<float>() + next_part * nheads * d;
      next_part += p.bwd_splits * p.seqlen_q;
    } else {
      p.dq = dq.data_ptr<float>() + cu_q[b] * nheads * d;  // one split: the kernel writes dq rows directly
    }
    p.dk = dk.data_ptr<float>() + cu_k[b] * k.size(1) * d;
    p.dv = dv.data_ptr<float>() + cu_k[b] * k.size(1) * d;
  }
  // A sequence with no query row has no backward tasks that would zero its keys' gradients.
  for (size_t b = 0; b < seqs.size(); ++b) {
    if (seqs[b].seqlen_q == 0 || nheads == 0) {
      dk.narrow(0, cu_k[b], seqs[b].seqlen_k).zero_();
      dv.narrow(0, cu_k[b], seqs[b].seqlen_k).zero_();
    }
  }
  run_sequences(
      seqs,
      [](const AttnParams& p) {
        return std::pair<TaskFn, int64_t>{backward_kernel(p), p.seqlen_q > 0 && p.nheads > 0 ? num_bwd_tasks(p) : 0};
      },
      2.5);
  next_part = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const AttnParams& p = seqs[b];
    if (p.bwd_splits <= 1) continue;
    const at::Tensor parts = dq_parts.narrow(0, next_part, p.bwd_splits * p.seqlen_q).view({p.bwd_splits, p.seqlen_q,
                                                                                          nheads, d});
    at::Tensor rows = dq.narrow(0, cu_q[b], p.seqlen_q);
    rows.copy_(parts[0]);
    for (int64_t s = 1; s < p.bwd_splits; ++s) rows.add_(parts[s]);
    next_part += p.bwd_splits * p.seqlen_q;
  }
  fill_rows_outside(dq, cu_q, 0.0);
  fill_rows_outside(dk, cu_k, 0.0);
  fill_rows_outside(dv, cu_k, 0.0);
  if (q.scalar_type() != at::kFloat) {
    return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("flash_attn_varlen_fwd", &flash_attn_varlen_fwd_cpu);
  m.impl("flash_attn_varlen_bwd", &flash_attn_varlen_bwd_cpu);
}

}  // namespace llmkernels::attention_cpu
