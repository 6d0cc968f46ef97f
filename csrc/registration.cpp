// Every op schema of llmkernels, in one place. Implementations live beside their kernels and attach
// with TORCH_LIBRARY_IMPL(llmkernels, CPU|CUDA, m); fake (meta) kernels and autograd are registered in
// Python (llmkernels/ops/*.py). Mutated arguments are marked (a!) so torch.compile and functionalization
// know about them.
//
// Layout conventions: attention tensors are (batch, seqlen, nheads, headdim) as in flash_attn; scan
// tensors are (batch, dim, seqlen) as in mamba_ssm. A window bound of -1 means unbounded.
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_features.h"

#ifdef LLMKERNELS_WITH_CUDA
#include <cuda.h>
#endif

extern "C" {
// `import llmkernels._C` loads this library, which runs the static registrations below. No Python
// bindings live here: every op is reached through torch.ops.llmkernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(llmkernels, m) {
  // The widest instruction set the C++ CPU kernels choose at run time here ("avx512+vnni", "avx2", ...).
  m.def("cpu_kernel_isa() -> str", &llmkernels::cpu_kernel_isa);
  // Whether this build compiled the CUDA sources, and for which CUDA version ("" when it did not).
  m.def("cuda_build_version() -> str", [] {
#ifdef LLMKERNELS_WITH_CUDA
    return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
#else
    return std::string();
#endif
  });

  // ---------------------------------------------------------------------------------------------
  // Flash attention
  // ---------------------------------------------------------------------------------------------
  // q: (b, sq, h, d); k, v: (b, sk, hk, d), h % hk == 0. Key j is visible to query i when
  // i + sk - sq - window_left <= j <= i + sk - sq + window_right (causal: window_right = 0).
  // Returns out (b, sq, h, d) in q's dtype and softmax_lse (b, h, sq) fp32, the natural-log
  // log-sum-exp of each row's scaled (and soft-capped) scores; -inf for rows that see no key.
  // alibi_slopes, fp32 (h,) or (b, h), on every attention op: s_ij -= slope * |i + sk - sq - j| after the soft-cap
  // (llmkernels.reference.attention.alibi_bias); the CUDA C++ kernels refuse it (Triton takes it on a GPU).
  // dropout_p in [0, 1), on flash_attn_fwd / _bwd and the varlen ops: each probability is dropped with chance
  // dropout_p, kept ones scaled by 1 / (1 - dropout_p), after the row sum (softmax_lse is unchanged) and before the
  // product with V. The mask is a pure function of dropout_seed, an int64 (2,) tensor of two 32-bit words, always on
  // the CPU (also for CUDA q), required when dropout_p > 0, and of (batch or packed sequence, head, query, key):
  // llmkernels.reference.dropout (Philox4x32-10), so the backward, given the same seed, recomputes it. The CUDA C++
  // kernels refuse dropout_p > 0 (Triton takes it on a GPU).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? dropout_seed=None) -> "
      "(Tensor out, Tensor softmax_lse)");
  // Gradients of flash_attn_fwd from dout (b, sq, h, d) and the saved out and softmax_lse, plus, when given,
  // dsoftmax_lse (b, h, sq) fp32, the gradient reaching softmax_lse itself (it enters as D_i - dlse_i).
  // dk, dv are (b, sk, hk, d): GQA gradients summed over the query heads of each KV head.
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "float softmax_scale, int window_left, int window_right, float softcap, Tensor? dsoftmax_lse=None, "
      "Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? dropout_seed=None) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
  // Attention against a KV cache (decode). k_cache, v_cache: (b, max_seqlen, hk, d); cache_seqlens (b,) int32.
  // k_new, v_new (b, s_new, hk, d), when given, are first written into the caches at cache_seqlens[i];
  // then q (b, sq, h, d) attends to the first cache_seqlens[i] + s_new keys, windows aligned bottom-right.
  // cache_batch_idx (b,) int32: row i of q uses row cache_batch_idx[i] of the caches. block_table (b, max_pages)
  // int32 (paged KV): the caches are (num_pages, page_size, hk, d), position p of row i in page
  // block_table[i, p / page_size]. At most one of the two. rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2):
  // flash_attn's rotary embedding of q and k_new at their positions (llmkernels.reference.attention.
  // rotary_embedding; q at cache_seqlens[i] + t when a window bound is set, else all at cache_seqlens[i]).
  // softmax_lse (b, h, sq) fp32, when given, receives each row's log-sum-exp (-inf where no key is seen); the
  // CUDA C++ kernels refuse it (the Triton decode kernel returns it on a GPU). cache_leftpad (b,) int32: row i's
  // keys start at slot cache_leftpad[i] <= cache_seqlens[i] (a left-padded batch; rotary positions stay the slots,
  // as flash_attn's); the CUDA C++ kernels refuse it too.
  m.def(
      "flash_attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor cache_seqlens, float softmax_scale, int window_left, int window_right, float softcap, "
      "Tensor? block_table=None, Tensor? cache_batch_idx=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, "
      "bool rotary_interleaved=True, Tensor(c!)? softmax_lse=None, Tensor? alibi_slopes=None, "
      "Tensor? cache_leftpad=None) -> Tensor");
  // Variable-length (packed) batches, as flash_attn_varlen_func: q (total_q, h, d), k, v (total_k, hk, d);
  // sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] .. of k, v
  // ((batch + 1,) int32), each with flash_attn_fwd's semantics. max_seqlen_q / _k bound the sequences' lengths
  // (launch sizes on a GPU; SymInt, so that torch.compile does not specialise a graph on each batch's longest
  // sequence). Returns out (total_q, h, d) and softmax_lse (h, total_q) fp32; rows in no sequence
  // get 0 and -inf (and zero gradients).
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? dropout_seed=None) -> "
      "(Tensor out, Tensor softmax_lse)");
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, "
      "int window_left, int window_right, float softcap, Tensor? dsoftmax_lse=None, Tensor? alibi_slopes=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor dq, Tensor dk, Tensor dv)");

  // ---------------------------------------------------------------------------------------------
  // Sliding-window attention over a rolling KV buffer
  // ---------------------------------------------------------------------------------------------
  // q: (b, S, h, d) a chunk of S new queries at absolute positions seqlens[i] .. seqlens[i] + S - 1;
  // k, v: (b, S, hk, d) the chunk's keys/values; k_ring, v_ring: (b, W, hk, d) ring buffers holding
  // position p in slot p % W; seqlens (b,) int32 tokens seen before this chunk. Each query at p sees
  // positions p - W + 1 .. p, older ones read in place from the ring. Returns (b, S, h, d).
  m.def(
      "rolling_window_attn(Tensor q, Tensor k, Tensor v, Tensor k_ring, Tensor v_ring, Tensor seqlens, "
      "float softmax_scale, float softcap) -> Tensor");
  // Writes the chunk's last min(S, W) tokens into the rings at slot (seqlens[i] + t) % W. seqlens is
  // not advanced here (the Python cache object does it), so the op stays a pure write.
  m.def("rolling_cache_append(Tensor(a!) k_ring, Tensor(b!) v_ring, Tensor k, Tensor v, Tensor seqlens) -> ()");

  // ---------------------------------------------------------------------------------------------
  // Ternary linear (BitNet b1.58)
  // ---------------------------------------------------------------------------------------------
  // x: (..., in_features) -> x_q int8 (..., in_features), scale fp32 (...): per-token absmax quantisation,
  // x_q = clamp(round(x * 127 / s), -128, 127), s = max(max|x|, 1e-5).
  m.def("ternary_quantize_activation(Tensor x) -> (Tensor x_q, Tensor scale)");
  // int32 accumulator x_q @ W_t^T for x_q int8 (m, in_features) and packed ternary weights; (m, out_features).
  // Exposed so tests can compare every backend's integer arithmetic exactly.
  m.def("ternary_matmul_int8(Tensor x_q, Tensor w_packed, int in_features) -> Tensor");
  // y = (quant(x) @ W_t^T in int32) * w_scale * s / 127 (+ bias), epilogue fp32, y in x's dtype.
  // x: (m, in_features) fp16/bf16/fp32; w_packed: packed ternary weights; w_scale: fp32 scalar tensor.
  m.def("ternary_linear_a8(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, int in_features) -> Tensor");
  // Weight-only: y = (x @ W_t^T) * w_scale (+ bias), accumulated in fp32, y in x's dtype.
  m.def("ternary_linear_w2(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, int in_features) -> Tensor");

  // ---------------------------------------------------------------------------------------------
  // Selective scan (Mamba) and causal conv1d
  // ---------------------------------------------------------------------------------------------
  // u, delta: (b, dim, L); A: (dim, n) fp32; B, C: (dim, n) or (b, n, L) or (b, g, n, L); D, delta_bias: (dim,)
  // fp32; z: (b, dim, L); initial_state: (b, dim, n) fp32. Returns out (b, dim, L) in u's dtype and
  // last_state (b, dim, n) fp32. seq_idx (b, L) int32, packed sequences: where seq_idx[t] != seq_idx[t - 1] the
  // state restarts from zero at t (initial_state is the state before t = 0). The CPU ops also take delta (b, g, L)
  // with g dividing dim, channel d reading row d / (dim / g) (Mamba-2's delta per head; ddelta then (b, g, L)).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? seq_idx=None) -> "
      "(Tensor out, Tensor last_state)");
  // Gradients of selective_scan_fwd, from dout and the gradient of last_state (may be absent). Recomputes
  // the states instead of storing them. Gradients of absent optional inputs come back as empty tensors.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? seq_idx=None) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, "
      "Tensor dinitial_state)");
  // One decode step: state (b, dim, n) fp32 updated in place; x, dt, z: (b, dim); B, C: (b, n) or (b, g, n).
  // Returns y (b, dim) in x's dtype. state_batch_indices (b,) int32: row i of x steps state row
  // state_batch_indices[i] of a state with any number of rows (continuous batching; distinct indices).
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices=None) -> Tensor");
  // Depthwise causal conv: x (b, dim, L), weight (dim, width), bias (dim,); optional SiLU. seq_idx (b, L) int32:
  // taps across a change of seq_idx read 0 (packed sequences); initial_states (b, dim, width - 1): the inputs
  // before t = 0 (not with seq_idx). dinitial_states is empty without initial_states.
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor? seq_idx=None, "
      "Tensor? initial_states=None) -> Tensor");
  m.def(
      "causal_conv1d_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor? seq_idx=None, "
      "Tensor? initial_states=None) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  // One decode step: x (b, dim), conv_state (b, dim, state_len >= width - 1) shifted left and appended in place.
  // conv_state_indices (b,) int32: row i of x steps conv_state row conv_state_indices[i] of a state with any number
  // of rows (continuous batching; distinct indices). cache_seqlens (b,) int32 / int64: the state is circular, x
  // goes to slot cache_seqlens[i] mod state_len and nothing shifts.
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
      "Tensor? conv_state_indices=None, Tensor? cache_seqlens=None) -> Tensor");
  // Gated RMSNorm (Mamba-2's norm): x, z (rows, H), weight, bias (H,); groups of group_size channels; the gate
  // silu(z) multiplies the normalised result (norm_before_gate) or x before the norm. dbias / dz are empty without
  // bias / z.
  m.def(
      "rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, int group_size, "
      "bool norm_before_gate) -> Tensor");
  m.def(
      "rmsnorm_gated_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, int group_size, "
      "bool norm_before_gate) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dz)");
  // Residual add + LayerNorm / RMSNorm (mamba_ssm's layer_norm_fn): x, residual (rows, H), weight, bias (H,).
  // residual_out (x + residual) is written in residual_out_dtype when given, else it is empty. The backward
  // recomputes the sum from x and residual; dresidual / dbias are empty without residual / bias.
  m.def(
      "add_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool is_rms_norm, "
      "ScalarType? residual_out_dtype) -> (Tensor y, Tensor residual_out)");
  m.def(
      "add_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor x, Tensor? residual, Tensor weight, Tensor? bias, "
      "float eps, bool is_rms_norm) -> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");
}
