// Host side of the CUDA flash attention ops: argument checks, parameter structs, head-dim / dtype
// dispatch, split-KV choice, the decode-kernel switch, and TORCH_LIBRARY_IMPL(llmkernels, CUDA) for
// flash_attn_fwd, flash_attn_bwd and flash_attn_with_kvcache (schemas and semantics in csrc/registration.cpp).
// No kernel is defined here (they live in the flash_*_hdim*.cu / flash_decode_*.cu instantiations and
// flash_aux.cu), and nothing synchronises the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <tuple>

#include "attention/cuda/flash.h"
#include "attention/cuda/flash_decode.h"
#include "attention/attention_window.h"
#include "common/checks.h"

namespace llmk::flash {
namespace {

using at::Tensor;

// The smallest compiled head dim >= d (d % 8 == 0, d <= 256 is checked before).
int padded_head_dim(int64_t d) {
  for (int hd : kHeadDims)
    if (d <= hd) return hd;
  return kHeadDims[std::size(kHeadDims) - 1];
}

// Calls fn.template operator()<T, kHeadDim>() for the tensor's dtype and the padded head dim.
template <typename Fn>
void dispatch(at::ScalarType dtype, int head_dim_padded, Fn&& fn) {
  auto with_dim = [&]<typename T>() {
    switch (head_dim_padded) {
      case 32: return fn.template operator()<T, 32>();
      case 64: return fn.template operator()<T, 64>();
      case 96: return fn.template operator()<T, 96>();
      case 128: return fn.template operator()<T, 128>();
      case 192: return fn.template operator()<T, 192>();
      case 256: return fn.template operator()<T, 256>();
      default: TORCH_CHECK(false, "llmkernels flash attention: no kernel for head dim ", head_dim_padded);
    }
  };
  if (dtype == at::kHalf) {
    with_dim.template operator()<__half>();
  } else {
    with_dim.template operator()<__nv_bfloat16>();
  }
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kHalf) {
    fn.template operator()<__half>();
  } else {
    fn.template operator()<__nv_bfloat16>();
  }
}

// Every 16-byte load/store of the kernels needs 16-byte aligned rows: base pointer aligned, strides of
// the (batch, seqlen, heads) dims multiples of 8 elements (dims of size 1 are never stepped over).
bool rows_16b_aligned(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim)
    if (t.size(dim) > 1 && t.stride(dim) % 8 != 0) return false;
  return true;
}

// Checks shared by every attention tensor: 4-D, on CUDA beside `ref`, fp16/bf16 like `ref`, rows usable.
void check_attn_tensor(const char* op, const Tensor& t, const char* name, const Tensor& ref) {
  LLMK_CHECK_ARG(t.dim() == 4, op, name, "must have 4 dimensions (batch, seqlen, nheads, headdim), got ", t.sizes());
  LLMK_CHECK_ARG(t.is_cuda(), op, name, "must be a CUDA tensor, got ", t.device());
  LLMK_CHECK_ARG(t.device() == ref.device(), op, name, "must be on ", ref.device(), ", got ", t.device());
  LLMK_CHECK_ARG(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, name,
                 "must be float16 or bfloat16 for the CUDA kernels, got ", t.scalar_type());
  LLMK_CHECK_ARG(t.scalar_type() == ref.scalar_type(), op, name, "must have the dtype of q (", ref.scalar_type(),
                 "), got ", t.scalar_type());
  LLMK_CHECK_ARG(t.stride(-1) == 1, op, name, "must be contiguous in its last dimension, got strides ", t.strides());
  LLMK_CHECK_ARG(rows_16b_aligned(t), op, name,
                 "must be 16-byte aligned with strides that are multiples of 8 elements, got strides ", t.strides());
}

// q (b, sq, h, d); k, v (b, sk, hk, d) with h % hk == 0, d % 8 == 0, d <= 256.
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const char* k_name,
               const char* v_name) {
  check_attn_tensor(op, q, "q", q);
  check_attn_tensor(op, k, k_name, q);
  check_attn_tensor(op, v, v_name, q);
  const int64_t d = q.size(3);
  LLMK_CHECK_ARG(d > 0 && d % 8 == 0 && d <= 256, op, "q",
                 "head dim must be a positive multiple of 8 and at most 256 for the CUDA kernels, got ", d);
  LLMK_CHECK_ARG(k.size(0) == q.size(0) && k.size(3) == d, op, k_name, "must have shape (", q.size(0),
                 ", seqlen_k, nheads_k, ", d, ") to match q ", q.sizes(), ", got ", k.sizes());
  LLMK_CHECK_ARG(v.sizes() == k.sizes(), op, v_name, "must have the shape of ", k_name, " ", k.sizes(), ", got ",
                 v.sizes());
  LLMK_CHECK_ARG(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, k_name, "must have a number of heads (", k.size(2),
                 ") dividing q's (", q.size(2), ")");
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  LLMK_CHECK_ARG(q.size(1) * (q.size(2) / k.size(2)) < kMax && k.size(1) < kMax, op, "q",
                 "sequence too long for the CUDA kernels: seqlen_q ", q.size(1), ", seqlen_k ", k.size(1));
  LLMK_CHECK_ARG(q.size(0) <= 65535 && q.size(2) <= 65535, op, "q", "batch and nheads must be at most 65535, got ",
                 q.sizes());
}

void fill_shape(AttnShape& s, const Tensor& q, const Tensor& k, double softmax_scale, int64_t window_left,
                int64_t window_right, double softcap) {
  s.batch = q.size(0);
  s.seqlen_q = q.size(1);
  s.seqlen_k = k.size(1);
  s.nheads = q.size(2);
  s.nheads_k = k.size(2);
  s.headdim = q.size(3);
  s.group = s.nheads / s.nheads_k;
  s.window_left = static_cast<int>(::llmkernels::attention::normalize_window_left(window_left, s.seqlen_k));
  s.window_right = static_cast<int>(::llmkernels::attention::normalize_window_right(window_right, s.seqlen_q));
  s.softmax_scale = static_cast<float>(softmax_scale);
  s.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  s.softcap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
  s.softcap_inner = softcap > 0 ? static_cast<float>(softmax_scale / softcap) : 0.f;
}

void set_strides(const Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  batch = t.stride(0);
  row = t.stride(1);
  head = t.stride(2);
}

FwdParams make_fwd_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, double softmax_scale,
                          int64_t window_left, int64_t window_right, double softcap) {
  FwdParams p{};
  fill_shape(p, q, k, softmax_scale, window_left, window_right, softcap);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.num_splits = 1;
  return p;
}

// ALiBi runs on the Triton kernels on a GPU (the Python dispatch sends such calls there first).
void refuse_alibi(const char* op, const std::optional<Tensor>& alibi_slopes) {
  LLMK_CHECK_ARG(!(alibi_slopes.has_value() && alibi_slopes->defined()), op, "alibi_slopes",
                 "is not supported by the CUDA C++ kernels (the Triton kernels take it)");
}

// Dropout likewise: the Python dispatch sends calls with dropout_p > 0 on a GPU to the Triton kernels.
void refuse_dropout(const char* op, double dropout_p) {
  LLMK_CHECK_ARG(dropout_p == 0.0, op, "dropout_p",
                 "> 0 is not supported by the CUDA C++ kernels (the Triton kernels take it), got ", dropout_p);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor& dout_arg, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                                                       double softmax_scale, int64_t window_left,
                                                       int64_t window_right, double softcap,
                                                       const std::optional<Tensor>& dsoftmax_lse,
                                                       const std::optional<Tensor>& alibi_slopes,
                                                       double dropout_p,
                                                       const std::optional<Tensor>& dropout_seed) {
  constexpr const char* op = "flash_attn_bwd";
  refuse_alibi(op, alibi_slopes);
  refuse_dropout(op, dropout_p);
  (void)dropout_seed;
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);
  // dout comes from autograd, not from the caller, and can be a view that is not 16-byte aligned (e.g. a
  // slice of torch.cat's gradient, storage offset 4): copy it rather than refuse it.
  Tensor dout = dout_arg;
  if (dout.dim() == 4 && !(dout.stride(-1) == 1 && rows_16b_aligned(dout))) {
    dout = dout.clone(at::MemoryFormat::Contiguous);
  }
  check_qkv(op, q, k, v, "k", "v");
  check_attn_tensor(op, dout, "dout", q);
  check_attn_tensor(op, out, "out", q);
  LLMK_CHECK_ARG(dout.sizes() == q.sizes(), op, "dout", "must have the shape of q ", q.sizes(), ", got ",
                 dout.sizes());
  LLMK_CHECK_ARG(out.sizes() == q.sizes(), op, "out", "must have the shape of q ", q.sizes(), ", got ", out.sizes());
  LLMK_CHECK_ARG(softmax_lse.device() == q.device(), op, "softmax_lse", "must be on ", q.device(), ", got ",
                 softmax_lse.device());
  LLMK_CHECK_DTYPE(op, softmax_lse, at::kFloat);
  LLMK_CHECK_SHAPE(op, softmax_lse, q.size(0), q.size(2), q.size(1));
  Tensor dlse;
  if (dsoftmax_lse.has_value() && dsoftmax_lse->defined()) {
    LLMK_CHECK_ARG(dsoftmax_lse->device() == q.device(), op, "dsoftmax_lse", "must be on ", q.device(), ", got ",
                   dsoftmax_lse->device());
    LLMK_CHECK_ARG(dsoftmax_lse->scalar_type() == at::kFloat, op, "dsoftmax_lse", "must have dtype float32, got ",
                   dsoftmax_lse->scalar_type());
    LLMK_CHECK_ARG(dsoftmax_lse->sizes() == softmax_lse.sizes(), op, "dsoftmax_lse", "must have softmax_lse's shape ",
                   softmax_lse.sizes(), ", got ", dsoftmax_lse->sizes());
    dlse = dsoftmax_lse->contiguous();
  }
  const c10::cuda::CUDAGuard guard(q.device());

  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3), sk = k.size(1), hk = k.size(2);
  const int dp = padded_head_dim(d);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (b == 0 || h == 0) return {dq, dk, dv};
  const bool gqa = h != hk;  // without GQA the kernel stores dk, dv itself
  Tensor dq_accum = at::zeros({b, sq, h, dp}, f32);
  Tensor dk_accum = gqa ? at::zeros({b, sk, hk, dp}, f32) : Tensor();
  Tensor dv_accum = gqa ? at::zeros({b, sk, hk, dp}, f32) : Tensor();
  Tensor delta = at::empty({b, h, sq}, f32);
  Tensor lse = softmax_lse.contiguous();

  BwdParams p{};
  fill_shape(p, q, k, softmax_scale, window_left, window_right, softcap);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.softmax_lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dsoftmax_lse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk_accum = gqa ? dk_accum.data_ptr<float>() : nullptr;
  p.dv_accum = gqa ? dv_accum.data_ptr<float>() : nullptr;
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  set_strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), dp, [&]<typename T, int D>() {
    if (sq > 0) run_flash_bwd_preprocess<T>(p, stream);
    if (sk > 0) run_flash_bwd<T, D>(p, stream);  // with sq == 0 it writes dk = dv = 0
    if (sq > 0) run_convert_accum<T>(static_cast<T*>(dq.data_ptr()), p.dq_accum, b * sq * h, d, dp, stream);
    if (sk > 0 && gqa) {
      run_convert_accum<T>(static_cast<T*>(dk.data_ptr()), p.dk_accum, b * sk * hk, d, dp, stream);
      run_convert_accum<T>(static_cast<T*>(dv.data_ptr()), p.dv_accum, b * sk * hk, d, dp, stream);
    }
  });
  return {dq, dk, dv};
}

// Split-KV count for decode: enough CTAs for about two waves over the SMs, at most one split per key
// tile and 128 splits; 1 when the (batch, head, row block) grid already fills the GPU.
int choose_num_splits(int64_t ctas, int64_t key_tiles, int num_sms) {
  if (ctas >= num_sms * 8 / 10) return 1;
  const int64_t want = (2 * num_sms + ctas - 1) / ctas;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, key_tiles, 128})));
}

// Chooses p.num_splits from the grid size and, when > 1, allocates the fp32 partials (kept alive by the
// caller's out_accum / lse_accum until the combine kernel has been queued).
void set_num_splits(FwdParams& p, const Tensor& q, int head_dim_padded, Tensor& out_accum, Tensor& lse_accum) {
  const int64_t block_n = fwd_block_n(head_dim_padded);
  const int64_t ctas = (int64_t(p.seqlen_q) * p.group + kFwdBlockM - 1) / kFwdBlockM * p.nheads_k * p.batch;
  const int64_t key_tiles = (p.seqlen_k + block_n - 1) / block_n;
  int num_sms = 0;  // (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  p.num_splits = std::min(choose_num_splits(ctas, key_tiles, num_sms), 65535 / p.batch);
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({p.num_splits, p.batch, p.nheads, p.seqlen_q, head_dim_padded}, f32);
    lse_accum = at::empty({p.num_splits, p.batch, p.nheads, p.seqlen_q}, f32);
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
}

std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                double softmax_scale, int64_t window_left, int64_t window_right,
                                                double softcap, const std::optional<Tensor>& alibi_slopes,
                                                double dropout_p, const std::optional<Tensor>& dropout_seed) {
  constexpr const char* op = "flash_attn_fwd";
  refuse_alibi(op, alibi_slopes);
  refuse_dropout(op, dropout_p);
  (void)dropout_seed;
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);
  check_qkv(op, q, k, v, "k", "v");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  FwdParams p = make_fwd_params(q, k, v, out, softmax_scale, window_left, window_right, softcap);
  p.softmax_lse = lse.data_ptr<float>();
  const int dp = padded_head_dim(p.headdim);
  // Few CTAs (small batch, few query rows) over many keys: split the keys too, as for decode.
  Tensor out_accum, lse_accum;
  set_num_splits(p, q, dp, out_accum, lse_accum);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), dp, [&]<typename T, int D>() {
    run_flash_fwd<T, D>(p, stream);
    if (p.num_splits > 1) run_flash_combine<T>(p, D, stream);
  });
  return {out, lse};
}

// LLMKERNELS_DECODE_KERNEL=gqa (read each call) sends decode steps of at most kDecodeMaxPackedRows packed rows
// (seqlen_q * query heads per KV head) to the GQA-sharing CUDA-core kernel (flash_decode_kernel.cuh); anything
// else keeps the forward kernel. Off by default until a GPU has measured it against the forward kernel.
bool use_gqa_decode(const FwdParams& p) {
  const char* env = std::getenv("LLMKERNELS_DECODE_KERNEL");
  if (env == nullptr || std::strcmp(env, "gqa") != 0) return false;
  const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.nheads;  // the combine's grid
  return int64_t(p.seqlen_q) * p.group <= kDecodeMaxPackedRows && decode_programs(p) < (1LL << 31) &&
         rows < (1LL << 31);
}

// Splits of each row's keys for the decode kernel: when its blocks cannot fill the GPU once at
// kDecodeBlocksPerSm blocks an SM (small batches), split so that all of them are resident in one wave (no partial
// second wave), keeping >= 128 keys a split. Batch 64 at 8 KV heads (512 blocks) runs unsplit: splitting would
// only add the combine.
int choose_decode_splits(int64_t programs, int64_t seqlen_k, int num_sms) {
  const int64_t resident = int64_t(kDecodeBlocksPerSm) * num_sms;
  if (programs >= resident / 2) return 1;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kDecodeMaxSplits, (seqlen_k + 127) / 128));
  return static_cast<int>(std::clamp<int64_t>(resident / programs, 1, most));
}

void run_gqa_decode(FwdParams& p, const Tensor& q, cudaStream_t stream) {
  const int bucket = decode_head_dim_bucket(p.headdim);
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  p.num_splits = choose_decode_splits(decode_programs(p), p.seqlen_k, num_sms);
  Tensor out_accum, lse_accum;  // alive until the combine has been queued
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.nheads;
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({p.num_splits, rows, bucket}, f32);
    lse_accum = at::empty({p.num_splits, rows}, f32);
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  dispatch_dtype(q.scalar_type(), [&]<typename T>() {
    switch (bucket) {
      case 32: return run_flash_decode_gqa<T, 32>(p, stream);
      case 64: return run_flash_decode_gqa<T, 64>(p, stream);
      case 128: return run_flash_decode_gqa<T, 128>(p, stream);
      default: return run_flash_decode_gqa<T, 256>(p, stream);
    }
  });
}

Tensor flash_attn_with_kvcache_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                    const std::optional<Tensor>& k_new, const std::optional<Tensor>& v_new,
                                    const Tensor& cache_seqlens, double softmax_scale, int64_t window_left,
                                    int64_t window_right, double softcap, const std::optional<Tensor>& block_table,
                                    const std::optional<Tensor>& cache_batch_idx,
                                    const std::optional<Tensor>& rotary_cos, const std::optional<Tensor>& rotary_sin,
                                    bool rotary_interleaved, const std::optional<Tensor>& softmax_lse,
                                    const std::optional<Tensor>& alibi_slopes,
                                    const std::optional<Tensor>& cache_leftpad) {
  constexpr const char* op = "flash_attn_with_kvcache";
  refuse_alibi(op, alibi_slopes);
  LLMK_CHECK_ARG(!(cache_leftpad.has_value() && cache_leftpad->defined()), op, "cache_leftpad",
                 "is not supported by the CUDA kernels (the Triton and CPU kernels take it)");
  (void)rotary_interleaved;
  LLMK_CHECK_ARG(!(softmax_lse.has_value() && softmax_lse->defined()), op, "softmax_lse",
                 "is not returned by the CUDA kernels (the Triton decode kernel returns it)");
  LLMK_CHECK_ARG(!(rotary_cos.has_value() && rotary_cos->defined()) && !(rotary_sin.has_value() && rotary_sin->defined()),
                 op, "rotary_cos", "is not taken by the CUDA host (the Python wrapper rotates q and k first)");
  LLMK_CHECK_ARG(!(block_table.has_value() && block_table->defined()), op, "block_table",
                 "(paged KV) is not supported by the CUDA kernels (the Triton and CPU kernels take it)");
  LLMK_CHECK_ARG(!(cache_batch_idx.has_value() && cache_batch_idx->defined()), op, "cache_batch_idx",
                 "is not supported by the CUDA kernels");
  ::llmkernels::check_attention_scalars(op, softmax_scale, softcap);
  check_qkv(op, q, k_cache, v_cache, "k_cache", "v_cache");
  LLMK_CHECK_ARG(k_new.has_value() == v_new.has_value(), op, "k_new", "and v_new must be given together");
  LLMK_CHECK_ARG(cache_seqlens.device() == q.device(), op, "cache_seqlens", "must be on ", q.device(), ", got ",
                 cache_seqlens.device());
  LLMK_CHECK_DTYPE(op, cache_seqlens, at::kInt);
  LLMK_CHECK_SHAPE(op, cache_seqlens, q.size(0));
  const Tensor seqlens = cache_seqlens.contiguous();  // read by the kernels as a plain int32 array
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3);
  const int64_t max_seqlen = k_cache.size(1), hk = k_cache.size(2);
  int64_t s_new = 0;
  if (k_new.has_value()) {
    check_attn_tensor(op, *k_new, "k_new", q);
    check_attn_tensor(op, *v_new, "v_new", q);
    s_new = k_new->size(1);
    LLMK_CHECK_ARG(k_new->size(0) == b && k_new->size(2) == hk && k_new->size(3) == d, op, "k_new",
                   "must have shape (", b, ", seqlen_new, ", hk, ", ", d, "), got ", k_new->sizes());
    LLMK_CHECK_ARG(v_new->sizes() == k_new->sizes(), op, "v_new", "must have the shape of k_new ", k_new->sizes(),
                   ", got ", v_new->sizes());
    LLMK_CHECK_ARG(s_new <= max_seqlen, op, "k_new", "has more rows (", s_new, ") than the cache (", max_seqlen, ")");
  }
  if (s_new > 0) {  // the new tokens are written into the caches: a broadcast (overlapping) view would race
    LLMK_CHECK_NO_OVERLAP(op, k_cache);
    LLMK_CHECK_NO_OVERLAP(op, v_cache);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (s_new > 0 && b > 0 && hk > 0) {
    AppendParams a{};
    a.k_cache = k_cache.data_ptr();
    a.v_cache = v_cache.data_ptr();
    a.k_new = k_new->data_ptr();
    a.v_new = v_new->data_ptr();
    a.cache_seqlens = seqlens.data_ptr<int>();
    a.batch = b;
    a.seqlen_new = s_new;
    a.nheads_k = hk;
    a.headdim = d;
    a.max_seqlen = max_seqlen;
    for (int i = 0; i < 3; ++i) {
      a.kc_stride[i] = k_cache.stride(i);
      a.vc_stride[i] = v_cache.stride(i);
      a.kn_stride[i] = k_new->stride(i);
      a.vn_stride[i] = v_new->stride(i);
    }
    dispatch_dtype(q.scalar_type(), [&]<typename T>() { run_kvcache_append<T>(a, stream); });
  }

  Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;

  FwdParams p = make_fwd_params(q, k_cache, v_cache, out, softmax_scale, window_left, window_right, softcap);
  p.cache_seqlens = seqlens.data_ptr<int>();
  p.seqlen_new = s_new;
  if (use_gqa_decode(p)) {
    run_gqa_decode(p, q, stream);
    return out;
  }
  const int dp = padded_head_dim(d);
  Tensor out_accum, lse_accum;
  set_num_splits(p, q, dp, out_accum, lse_accum);
  dispatch(q.scalar_type(), dp, [&]<typename T, int D>() {
    run_flash_fwd<T, D>(p, stream);
    if (p.num_splits > 1) run_flash_combine<T>(p, D, stream);
  });
  return out;
}

}  // namespace
}  // namespace llmk::flash

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("flash_attn_fwd", &llmk::flash::flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &llmk::flash::flash_attn_bwd_cuda);
  m.impl("flash_attn_with_kvcache", &llmk::flash::flash_attn_with_kvcache_cuda);
}
