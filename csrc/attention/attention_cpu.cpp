// Host side of the CPU flash attention ops (schemas in csrc/registration.cpp): argument checks, fp32 output
// buffers, the parallel loops, and the choice among the kernels compiled per instruction set (cpu/kernel_*.cpp,
// the algorithm in cpu/flash_attn_kernel.h). Kernels read q, k, v (fp32 / bf16 / fp16, any strides with a
// contiguous last dimension) in place and write fp32; low-precision results are rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>

#include "attention/attention_window.h"
#include "attention/cpu/attention_cpu_host.h"

namespace llmkernels::attention_cpu {
namespace {

// q (b, sq, h, d); k, v (b, sk, hk, d) with h % hk == 0; all on the CPU, one dtype, last dim contiguous.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  LLMK_CHECK_DEVICE(op, q, at::kCPU);
  LLMK_CHECK_SAME_DEVICE(op, k, q);
  LLMK_CHECK_SAME_DEVICE(op, v, q);
  LLMK_CHECK_DIM(op, q, 4);
  LLMK_CHECK_DIM(op, k, 4);
  LLMK_CHECK_DIM(op, v, 4);
  elem_type(op, q);
  LLMK_CHECK_SAME_DTYPE(op, k, q);
  LLMK_CHECK_SAME_DTYPE(op, v, q);
  const int64_t batch = q.size(0), d = q.size(3), sk = k.size(1), hk = k.size(2);
  LLMK_CHECK_ARG(d >= 1 && d <= kMaxHeadDim, op, "q", "must have a head dim in [1, ", kMaxHeadDim, "], got ", d);
  LLMK_CHECK_SHAPE(op, k, batch, sk, hk, d);
  LLMK_CHECK_SHAPE(op, v, batch, sk, hk, d);
  LLMK_CHECK_ARG(hk >= 1 && q.size(2) % hk == 0, op, "k", "must have a number of heads dividing q's (", q.size(2),
                 "), got ", hk);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, q);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, k);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, v);
}

AttnParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  p.seqlens_k = nullptr;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = ::llmkernels::attention::normalize_window_left(window_left, p.seqlen_k);
  p.window_right = ::llmkernels::attention::normalize_window_right(window_right, p.seqlen_q);
  return p;
}

// Runs the forward into a fresh fp32 output; returns (out in q's dtype, lse).
std::tuple<at::Tensor, at::Tensor> run_forward(AttnParams& p, const at::Tensor& q) {
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.batch, p.seqlen_q, p.nheads, p.headdim}, f32);
  at::Tensor lse = at::empty({p.batch, p.nheads, p.seqlen_q}, f32);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  choose_heads_per_block(p, at::get_num_threads());
  run_tasks(kernels_for(p.dtype).fwd, p, num_fwd_tasks(p), pass_macs(p));
  return {q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double softmax_scale, int64_t window_left, int64_t window_right,
                                                      double softcap) {
  constexpr const char* op = "flash_attn_fwd";
  check_qkv(op, q, k, v);
  AttnParams p = make_params(op, q, k, v, softmax_scale, window_left, window_right, softcap);
  return run_forward(p, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& dsoftmax_lse) {
  constexpr const char* op = "flash_attn_bwd";
  check_qkv(op, q, k, v);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    LLMK_CHECK_ARG(t.device() == q.device(), op, name, "must be on the device of q, got ", t.device());
    LLMK_CHECK_ARG(t.sizes() == q.sizes(), op, name, "must have q's shape ", q.sizes(), ", got ", t.sizes());
    LLMK_CHECK_ARG(t.scalar_type() == q.scalar_type(), op, name, "must have q's dtype ", q.scalar_type(), ", got ",
                   t.scalar_type());
  }
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, dout);
  LLMK_CHECK_SAME_DEVICE(op, softmax_lse, q);
  LLMK_CHECK_DTYPE(op, softmax_lse, at::kFloat);
  LLMK_CHECK_SHAPE(op, softmax_lse, q.size(0), q.size(2), q.size(1));
  const at::Tensor dlse = checked_dlse(op, dsoftmax_lse, softmax_lse);

  AttnParams p = make_params(op, q, k, v, softmax_scale, window_left, window_right, softcap);
  if (p.nheads == 0) {  // no query reads any key: the kernels would leave dk, dv unwritten
    return {at::zeros_like(q), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  }
  const at::Tensor lse = softmax_lse.contiguous();
  // One task per (batch, KV head) owns all of its gradients. When those pairs do not divide evenly among the
  // threads, each head's key blocks are split over as many tasks as make them divide (at most 8), each adding
  // into its own dq buffer; no more, since every split loads its group's query rows again.
  const int64_t units = p.batch * p.nheads_k, threads = at::get_num_threads();
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(8, num_key_blocks(p)));
  p.bwd_splits = std::clamp<int64_t>(threads / std::gcd(units, threads), 1, max_splits);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_parts = at::empty({p.bwd_splits, p.batch, p.seqlen_q, p.nheads, p.headdim}, f32);
  at::Tensor dk = at::empty({p.batch, p.seqlen_k, p.nheads_k, p.headdim}, f32);
  at::Tensor dv = at::empty_like(dk);
  p.dout = view4(dout);
  const at::Tensor out_rows = out.stride(-1) == 1 ? out : out.contiguous();  // read by the kernel for D
  p.out_in = view4(out_rows);
  p.lse_in = lse.data_ptr<float>();
  p.dlse_in = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq_parts.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  run_tasks(kernels_for(p.dtype).bwd, p, num_bwd_tasks(p), 2.5 * pass_macs(p));
  at::Tensor dq = dq_parts[0];
  for (int64_t s = 1; s < p.bwd_splits; ++s) dq = dq + dq_parts[s];  // in split order: deterministic
  if (q.scalar_type() != at::kFloat) {
    return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  }
  return {dq, dk, dv};
}

at::Tensor flash_attn_with_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                       const at::Tensor& cache_seqlens, double softmax_scale, int64_t window_left,
                                       int64_t window_right, double softcap) {
  constexpr const char* op = "flash_attn_with_kvcache";
  check_qkv(op, q, k_cache, v_cache);
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);  // (before the caches are written)
  const int64_t batch = q.size(0), capacity = k_cache.size(1), hk = k_cache.size(2), d = q.size(3);
  LLMK_CHECK_ARG(k_new.has_value() == v_new.has_value(), op, "k_new", "and v_new must be given together");
  int64_t s_new = 0;
  if (k_new.has_value()) {
    const at::Tensor& kn = *k_new;
    const at::Tensor& vn = *v_new;
    LLMK_CHECK_SAME_DEVICE(op, kn, q);
    LLMK_CHECK_SAME_DEVICE(op, vn, q);
    LLMK_CHECK_SAME_DTYPE(op, kn, q);
    LLMK_CHECK_SAME_DTYPE(op, vn, q);
    LLMK_CHECK_DIM(op, kn, 4);
    s_new = kn.size(1);
    LLMK_CHECK_SHAPE(op, kn, batch, s_new, hk, d);
    LLMK_CHECK_SHAPE(op, vn, batch, s_new, hk, d);
  }
  if (s_new > 0) {  // the new tokens are written into the caches
    LLMK_CHECK_NO_OVERLAP(op, k_cache);
    LLMK_CHECK_NO_OVERLAP(op, v_cache);
  }
  LLMK_CHECK_SAME_DEVICE(op, cache_seqlens, q);
  LLMK_CHECK_DTYPE(op, cache_seqlens, at::kInt);
  LLMK_CHECK_SHAPE(op, cache_seqlens, batch);

  // Keys visible to each row: its cached tokens plus the new ones, which go into the cache first.
  const at::Tensor lens = cache_seqlens.contiguous();
  at::Tensor total = at::empty({batch}, lens.options());
  const int32_t* len = lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < batch; ++i) {
    LLMK_CHECK_ARG(len[i] >= 0 && len[i] + s_new <= capacity, op, "cache_seqlens",
                   "must leave room for the new tokens: row ", i, " holds ", len[i], " + ", s_new,
                   " new > capacity ", capacity);
    total.data_ptr<int32_t>()[i] = static_cast<int32_t>(len[i] + s_new);
  }
  if (s_new > 0) {
    for (int64_t i = 0; i < batch; ++i) {
      k_cache[i].narrow(0, len[i], s_new).copy_((*k_new)[i]);
      v_cache[i].narrow(0, len[i], s_new).copy_((*v_new)[i]);
    }
  }
  AttnParams p = make_params(op, q, k_cache, v_cache, softmax_scale, window_left, window_right, softcap);
  p.seqlens_k = total.data_ptr<int32_t>();
  return std::get<0>(run_forward(p, q));
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_cpu);
}

}  // namespace llmkernels::attention_cpu
