// Host side of the CPU flash attention ops (schemas in csrc/registration.cpp): argument checks, fp32 output
// buffers, the parallel loops, and the choice among the kernels compiled per instruction set (cpu/kernel_*.cpp,
// the algorithm in cpu/flash_attn_kernel.h). Kernels read q, k, v (fp32 / bf16 / fp16, any strides with a
// contiguous last dimension) in place and write fp32; low-precision results are rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention_window.h"
#include "attention/cpu/attention_cpu_host.h"

namespace llmkernels::attention_cpu {
namespace {

// q (b, sq, h, d); k, v (b, sk, hk, d) with h % hk == 0; all on the CPU, one dtype, last dim contiguous. With
// same_batch false, k and v may have any first dimension (KV caches read through cache_batch_idx or pages).
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool same_batch = true) {
  LLMK_CHECK_DEVICE(op, q, at::kCPU);
  LLMK_CHECK_SAME_DEVICE(op, k, q);
  LLMK_CHECK_SAME_DEVICE(op, v, q);
  LLMK_CHECK_DIM(op, q, 4);
  LLMK_CHECK_DIM(op, k, 4);
  LLMK_CHECK_DIM(op, v, 4);
  elem_type(op, q);
  LLMK_CHECK_SAME_DTYPE(op, k, q);
  LLMK_CHECK_SAME_DTYPE(op, v, q);
  const int64_t batch = same_batch ? q.size(0) : k.size(0), d = q.size(3), sk = k.size(1), hk = k.size(2);
  LLMK_CHECK_ARG(d >= 1 && d <= kMaxHeadDim, op, "q", "must have a head dim in [1, ", kMaxHeadDim, "], got ", d);
  LLMK_CHECK_SHAPE(op, k, batch, sk, hk, d);
  LLMK_CHECK_SHAPE(op, v, batch, sk, hk, d);
  LLMK_CHECK_ARG(hk >= 1 && q.size(2) % hk == 0, op, "k", "must have a number of heads dividing q's (", q.size(2),
                 "), got ", hk);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, q);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, k);
  LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, v);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double softmax_scale, int64_t window_left, int64_t window_right,
                                                      double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                                      double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  constexpr const char* op = "flash_attn_fwd";
  check_qkv(op, q, k, v);
  AttnParams p = make_params(op, q, k, v, softmax_scale, window_left, window_right, softcap);
  const at::Tensor alibi = set_alibi(op, p, alibi_slopes, q, q.size(0));
  set_dropout(op, p, dropout_p, dropout_seed);
  return run_forward(p, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& dsoftmax_lse, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
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
  const at::Tensor alibi = set_alibi(op, p, alibi_slopes, q, q.size(0));
  set_dropout(op, p, dropout_p, dropout_seed);
  if (p.nheads == 0 || p.seqlen_q == 0 || p.seqlen_k == 0) {  // no scores at all: every gradient is zero (the
                                                               // kernels would leave dk, dv unwritten or index
                                                               // key blocks that do not exist)
    return {at::zeros_like(q), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  }
  const at::Tensor lse = softmax_lse.contiguous();
  // One task per (batch, KV head) owns all of its gradients. When those pairs do not divide evenly among the
  // threads, each head's key blocks are split over as many tasks as make them divide (at most 8), each adding
  // into its own dq buffer; no more, since every split loads its group's query rows again.
  const int64_t units = p.batch * p.nheads_k, threads = at::get_num_threads();
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(8, backward_key_blocks(p)));
  p.bwd_splits = std::clamp<int64_t>(threads / std::gcd(units, threads), 1, max_splits);
  p.dout = view4(dout);
  const at::Tensor out_rows = out.stride(-1) == 1 ? out : out.contiguous();  // read by the kernel for D
  p.out_in = view4(out_rows);
  p.lse_in = lse.data_ptr<float>();
  p.dlse_in = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  if (p.bwd_splits == 1 && use_amx_backward(p)) {  // (bf16) gradients written directly
    at::Tensor dq = at::empty({p.batch, p.seqlen_q, p.nheads, p.headdim}, q.options());
    at::Tensor dk = at::empty({p.batch, p.seqlen_k, p.nheads_k, p.headdim}, q.options());
    at::Tensor dv = at::empty_like(dk);
    p.dq_bf16 = reinterpret_cast<uint16_t*>(dq.data_ptr());
    p.dk_bf16 = reinterpret_cast<uint16_t*>(dk.data_ptr());
    p.dv_bf16 = reinterpret_cast<uint16_t*>(dv.data_ptr());
    run_tasks(backward_kernel(p), p, num_bwd_tasks(p), 2.5 * pass_macs(p));
    return {dq, dk, dv};
  }
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_parts = at::empty({p.bwd_splits, p.batch, p.seqlen_q, p.nheads, p.headdim}, f32);
  at::Tensor dk = at::empty({p.batch, p.seqlen_k, p.nheads_k, p.headdim}, f32);
  at::Tensor dv = at::empty_like(dk);
  p.dq = dq_parts.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  run_tasks(backward_kernel(p), p, num_bwd_tasks(p), 2.5 * pass_macs(p));
  at::Tensor dq = dq_parts[0];
  for (int64_t s = 1; s < p.bwd_splits; ++s) dq = dq + dq_parts[s];  // in split order: deterministic
  if (q.scalar_type() != at::kFloat) {
    return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  }
  return {dq, dk, dv};
}

// Where each row's cache positions live: a plain (batch, capacity) cache, rows picked by cache_batch_idx, or pages
// picked by block_table (cache rows checked here: in range, distinct when written; pages by check_pages).
struct CacheLayout {
  const int32_t* rows = nullptr;   // cache_batch_idx
  const int32_t* pages = nullptr;  // block_table
  int64_t table_stride = 0, page_size = 0, capacity = 0;
  at::Tensor rows_held, pages_held;  // contiguous copies the pointers read

  // Element offset of (q row b, position s, head 0) in a cache with these strides.
  int64_t offset(const at::Tensor& cache, int64_t b, int64_t s) const {
    if (pages != nullptr) return pages[b * table_stride + s / page_size] * cache.stride(0) + s % page_size * cache.stride(1);
    return (rows != nullptr ? rows[b] : b) * cache.stride(0) + s * cache.stride(1);
  }
};

CacheLayout cache_layout(const char* op, const at::Tensor& q, const at::Tensor& k_cache, int64_t s_new,
                         const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx) {
  const int64_t batch = q.size(0);
  CacheLayout layout;
  layout.capacity = k_cache.size(1);
  const bool paged = block_table.has_value() && block_table->defined();
  const bool indexed = cache_batch_idx.has_value() && cache_batch_idx->defined();
  LLMK_CHECK_ARG(!(paged && indexed), op, "cache_batch_idx", "cannot be combined with block_table");
  if (paged) {
    const at::Tensor& table = *block_table;
    LLMK_CHECK_SAME_DEVICE(op, table, q);
    LLMK_CHECK_DTYPE(op, table, at::kInt);
    LLMK_CHECK_ARG(table.dim() == 2 && table.size(0) == batch, op, "block_table", "must be (batch = ", batch,
                   ", max_pages) int32, got ", table.sizes());
    layout.page_size = k_cache.size(1);
    LLMK_CHECK_ARG(layout.page_size > 0 && layout.page_size % kBlockK == 0, op, "k_cache",
                   "pages (dimension 1 with a block_table) must hold a multiple of ", kBlockK, " tokens, got ",
                   layout.page_size);
    layout.pages_held = table.contiguous();
    layout.pages = layout.pages_held.data_ptr<int32_t>();
    layout.table_stride = table.size(1);
    layout.capacity = table.size(1) * layout.page_size;
  } else if (indexed) {
    const at::Tensor& idx = *cache_batch_idx;
    LLMK_CHECK_SAME_DEVICE(op, idx, q);
    LLMK_CHECK_DTYPE(op, idx, at::kInt);
    LLMK_CHECK_SHAPE(op, idx, batch);
    layout.rows_held = idx.contiguous();
    layout.rows = layout.rows_held.data_ptr<int32_t>();
    std::vector<bool> used(k_cache.size(0), false);
    for (int64_t i = 0; i < batch; ++i) {
      const int32_t r = layout.rows[i];
      LLMK_CHECK_ARG(r >= 0 && r < k_cache.size(0), op, "cache_batch_idx", "entries must be cache rows in [0, ",
                     k_cache.size(0), "), got ", r);
      LLMK_CHECK_ARG(s_new == 0 || !used[r], op, "cache_batch_idx",
                     "must name distinct cache rows when new tokens are written, row ", r, " repeats");
      used[r] = true;
    }
  } else {
    LLMK_CHECK_ARG(k_cache.size(0) == batch, op, "k_cache", "must have q's batch (", batch, ") rows, got ",
                   k_cache.size(0));
  }
  return layout;
}

// flash_attn_with_kvcache's rotary tables, in fp32.
struct Rotary {
  at::Tensor cos, sin;  // (seqlen_ro, rotary_dim / 2) contiguous fp32
  bool per_token_q;     // q row t at cache_seqlens + t (a window bound is set), else every q row at cache_seqlens
};

Rotary checked_rotary(const char* op, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      const at::Tensor& q, const int32_t* len, int64_t s_new, int64_t window_left,
                      int64_t window_right) {
  LLMK_CHECK_ARG(cos.has_value() && cos->defined() && sin.has_value() && sin->defined(), op, "rotary_cos",
                 "and rotary_sin must be given together");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"rotary_cos", *cos}, {"rotary_sin", *sin}}) {
    LLMK_CHECK_ARG(t.device() == q.device(), op, name, "must be on q's device (", q.device(), "), got ", t.device());
    LLMK_CHECK_ARG(t.is_floating_point() && t.element_size() >= 2, op, name, "must be a float tensor, got ",
                   t.scalar_type());
    LLMK_CHECK_ARG(t.dim() == 2 && t.size(0) >= 1 && t.size(1) >= 1 && 2 * t.size(1) <= q.size(3), op, name,
                   "must be (seqlen_ro >= 1, rotary_dim / 2) with rotary_dim <= the head dim (", q.size(3),
                   "), got ", t.sizes());
  }
  LLMK_CHECK_ARG(sin->sizes() == cos->sizes(), op, "rotary_sin", "must have rotary_cos's shape ", cos->sizes(),
                 ", got ", sin->sizes());
  Rotary rot{cos->to(at::kFloat).contiguous(), sin->to(at::kFloat).contiguous(),
             window_left >= 0 || window_right >= 0};
  const int64_t span = std::max<int64_t>(rot.per_token_q ? q.size(1) : 1, s_new);
  for (int64_t i = 0; i < q.size(0); ++i) {
    LLMK_CHECK_ARG(len[i] + span <= rot.cos.size(0), op, "rotary_cos", "has ", rot.cos.size(0),
                   " positions, row ", i, "'s new tokens reach position ", len[i] + span - 1);
  }
  return rot;
}

// x (b, s, h, d) with its first rotary_dim channels of row (i, t) rotated by the angles of position
// cache_seqlens[i] + (per_token ? t : 0): pairs (2c, 2c + 1) when interleaved, else (c, c + rotary_dim / 2); fp32
// arithmetic, rounded once to x's dtype (as reference.attention.rotary_embedding).
at::Tensor rotated(const at::Tensor& x, const Rotary& rot, const int32_t* len, bool per_token, bool interleaved) {
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  y.copy_(x);
  const int64_t b = y.size(0), s = y.size(1), h = y.size(2), d = y.size(3), half = rot.cos.size(1);
  float* data = y.data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t t = 0; t < s; ++t) {
      const int64_t pos = len[i] + (per_token ? t : 0);
      const float* c = rot.cos.data_ptr<float>() + pos * half;
      const float* sn = rot.sin.data_ptr<float>() + pos * half;
      for (int64_t hh = 0; hh < h; ++hh) {
        float* row = data + ((i * s + t) * h + hh) * d;
        for (int64_t j = 0; j < half; ++j) {
          float& x1 = row[interleaved ? 2 * j : j];
          float& x2 = row[interleaved ? 2 * j + 1 : j + half];
          const float a = x1, bb = x2;
          x1 = a * c[j] - bb * sn[j];
          x2 = bb * c[j] + a * sn[j];
        }
      }
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The pages a call touches: the first ceil((cache_seqlens + s_new) / page_size) entries of each row of the table (the
// rest may hold anything, e.g. -1 padding, as flash_attn allows) must be pages of the cache, and the slots the new
// tokens are written to must differ (rows may share pages they only read, such as a common prefix).
void check_pages(const char* op, const CacheLayout& layout, int64_t num_pages, const int32_t* len, int64_t batch,
                 int64_t s_new) {
  std::vector<int64_t> written;
  written.reserve(batch * s_new);
  for (int64_t i = 0; i < batch; ++i) {
    if (len[i] < 0 || len[i] + s_new > layout.capacity) continue;  // refused below, naming cache_seqlens
    const int64_t used = (len[i] + s_new + layout.page_size - 1) / layout.page_size;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t page = layout.pages[i * layout.table_stride + j];
      LLMK_CHECK_ARG(page >= 0 && page < num_pages, op, "block_table", "entries a row uses must be page indices in [0, ",
                     num_pages, "), got ", page, " (row ", i, ", entry ", j, ")");
    }
    for (int64_t t = 0; t < s_new; ++t) {
      const int64_t pos = len[i] + t;
      written.push_back(layout.pages[i * layout.table_stride + pos / layout.page_size] * layout.page_size +
                        pos % layout.page_size);
    }
  }
  std::sort(written.begin(), written.end());
  LLMK_CHECK_ARG(std::adjacent_find(written.begin(), written.end()) == written.end(), op, "block_table",
                 "sends two new tokens to the same page slot (rows may share pages only where they read)");
}

at::Tensor flash_attn_with_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                       const at::Tensor& cache_seqlens, double softmax_scale, int64_t window_left,
                                       int64_t window_right, double softcap,
                                       const std::optional<at::Tensor>& block_table,
                                       const std::optional<at::Tensor>& cache_batch_idx,
                                       const std::optional<at::Tensor>& rotary_cos,
                                       const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                       const std::optional<at::Tensor>& softmax_lse,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& cache_leftpad) {
  constexpr const char* op = "flash_attn_with_kvcache";
  check_qkv(op, q, k_cache, v_cache, /*same_batch=*/false);
  AttnParams with_alibi{};  // (the slopes checked before the caches are written; p takes them below)
  const at::Tensor alibi = set_alibi(op, with_alibi, alibi_slopes, q, q.size(0));
  const bool want_lse = softmax_lse.has_value() && softmax_lse->defined();
  if (want_lse) {  // checked before the caches are written
    LLMK_CHECK_SAME_DEVICE(op, *softmax_lse, q);
    LLMK_CHECK_DTYPE(op, *softmax_lse, at::kFloat);
    LLMK_CHECK_SHAPE(op, *softmax_lse, q.size(0), q.size(2), q.size(1));
  }
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);  // (before the caches are written)
  const int64_t batch = q.size(0), hk = k_cache.size(2), d = q.size(3);
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
    LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, kn);
    LLMK_CHECK_LAST_DIM_CONTIGUOUS(op, vn);
  }
  if (s_new > 0) {  // the new tokens are written into the caches
    LLMK_CHECK_NO_OVERLAP(op, k_cache);
    LLMK_CHECK_NO_OVERLAP(op, v_cache);
  }
  LLMK_CHECK_SAME_DEVICE(op, cache_seqlens, q);
  LLMK_CHECK_DTYPE(op, cache_seqlens, at::kInt);
  LLMK_CHECK_SHAPE(op, cache_seqlens, batch);
  const CacheLayout layout = cache_layout(op, q, k_cache, s_new, block_table, cache_batch_idx);

  // Keys visible to each row: its cached tokens plus the new ones, which go into the cache first.
  const at::Tensor lens = cache_seqlens.contiguous();
  if (layout.pages != nullptr) check_pages(op, layout, k_cache.size(0), lens.data_ptr<int32_t>(), batch, s_new);
  at::Tensor total = at::empty({batch}, lens.options());
  const int32_t* len = lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < batch; ++i) {
    LLMK_CHECK_ARG(len[i] >= 0, op, "cache_seqlens", "must be >= 0: row ", i, " holds ", len[i]);
    LLMK_CHECK_ARG(len[i] + s_new <= layout.capacity, op, "cache_seqlens",
                   "must leave room for the new tokens: row ", i, " holds ", len[i], " + ", s_new,
                   " new > capacity ", layout.capacity);
    total.data_ptr<int32_t>()[i] = static_cast<int32_t>(len[i] + s_new);
  }
  // cache_leftpad: each row's first key slot (rotary positions stay the slots, as flash_attn's).
  at::Tensor pads;
  if (cache_leftpad.has_value() && cache_leftpad->defined()) {
    const at::Tensor& given = *cache_leftpad;
    LLMK_CHECK_ARG(layout.pages == nullptr, op, "cache_leftpad", "and block_table cannot be given together");
    LLMK_CHECK_ARG(given.device() == q.device(), op, "cache_leftpad", "must be on q's device (", q.device(),
                   "), got ", given.device());
    LLMK_CHECK_ARG(given.scalar_type() == at::kInt, op, "cache_leftpad", "must have dtype int32, got ",
                   given.scalar_type());
    LLMK_CHECK_ARG(given.dim() == 1 && given.size(0) == batch, op, "cache_leftpad", "must have shape (", batch,
                   "), got ", given.sizes());
    pads = given.contiguous();
    const int32_t* pad = pads.data_ptr<int32_t>();
    for (int64_t i = 0; i < batch; ++i) {
      LLMK_CHECK_ARG(pad[i] >= 0 && pad[i] <= len[i], op, "cache_leftpad", "must lie in [0, cache_seqlens]: row ", i,
                     " has ", pad[i], " with cache_seqlens ", len[i]);
    }
  }
  at::Tensor q_in = q, k_in = s_new > 0 ? *k_new : at::Tensor();
  if ((rotary_cos.has_value() && rotary_cos->defined()) || (rotary_sin.has_value() && rotary_sin->defined())) {
    const Rotary rot = checked_rotary(op, rotary_cos, rotary_sin, q, len, s_new, window_left, window_right);
    q_in = rotated(q, rot, len, rot.per_token_q, rotary_interleaved);
    if (s_new > 0) k_in = rotated(k_in, rot, len, true, rotary_interleaved);
  }
  if (s_new > 0) {  // row by row: each (token, head) row is headdim contiguous elements
    const int64_t bytes = d * q.element_size();
    for (const auto& [cache, fresh] : {std::pair<const at::Tensor&, const at::Tensor&>{k_cache, k_in},
                                       {v_cache, *v_new}}) {
      char* dst = static_cast<char*>(cache.data_ptr());
      const char* src = static_cast<const char*>(fresh.data_ptr());
      for (int64_t i = 0; i < batch; ++i) {
        for (int64_t t = 0; t < s_new; ++t) {
          const int64_t row = layout.offset(cache, i, len[i] + t);
          for (int64_t h = 0; h < hk; ++h) {
            std::memcpy(dst + (row + h * cache.stride(2)) * q.element_size(),
                        src + (i * fresh.stride(0) + t * fresh.stride(1) + h * fresh.stride(2)) * q.element_size(),
                        bytes);
          }
        }
      }
    }
  }
  AttnParams p = make_params(op, q_in, k_cache, v_cache, softmax_scale, window_left, window_right, softcap);
  p.alibi = with_alibi.alibi;
  p.alibi_batch_stride = with_alibi.alibi_batch_stride;
  p.seqlens_k = total.data_ptr<int32_t>();
  p.keys_start = pads.defined() ? pads.data_ptr<int32_t>() : nullptr;
  p.kv_batch = layout.rows;
  p.block_table = layout.pages;
  p.table_stride = layout.table_stride;
  p.page_size = layout.page_size;
  if (layout.pages != nullptr) {  // keys run over the pages: the band's bounds are in those positions
    p.seqlen_k = layout.capacity;
    p.window_left = ::llmkernels::attention::normalize_window_left(window_left, p.seqlen_k);
  }
  auto [out, lse] = run_forward(p, q_in);
  if (want_lse) softmax_lse->copy_(lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_cpu);
}

}  // namespace llmkernels::attention_cpu
