// CUDA host code of the scan family (selective scan fwd/bwd, state update, causal conv1d fwd/bwd/update):
// argument checks, layout normalisation (contiguous rows, fp32 weights), allocation, and launches on the
// current stream of the inputs' device. Registered under TORCH_LIBRARY_IMPL(llmkernels, CUDA); schemas in
// csrc/registration.cpp. No host synchronisation anywhere.
//
// The kernels read all activations (u, delta, z, dout, per-token B/C; x, dt, z, B, C for decode) in one dtype:
// u's (x's) when they all share it, else fp32, so mixing dtypes never rounds an input. Small parameters (A, D,
// delta_bias, constant B/C, conv weight and bias, initial state) are read in fp32. Outputs come back in u's
// (x's) dtype and gradients in each input's own dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>

#include "common/checks.h"
#include "scan/cuda/scan_launch.h"

namespace llmkernels::scan {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_activation_dtype(at::ScalarType dtype, const char* op, const char* arg, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "llmkernels.", op, ": ", arg, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

bool is_float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Checks an optional input's device and shape; returns it fp32 and contiguous, or an undefined tensor.
at::Tensor optional_fp32(const char* op, const char* arg, const std::optional<at::Tensor>& t, const at::Tensor& ref,
                         at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return {};
  LLMK_CHECK_ARG(t->device() == ref.device(), op, arg, "must be on ", ref.device(), ", got ", t->device());
  LLMK_CHECK_ARG(t->sizes() == shape, op, arg, "must have shape ", shape, ", got ", t->sizes());
  LLMK_CHECK_ARG(t->is_floating_point(), op, arg, "must be a floating tensor, got ", t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

// The dtype the kernels read activations in: ref's, or fp32 when any other activation differs from it.
at::ScalarType common_activation_dtype(const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others)
    if (t != nullptr && t->defined() && t->scalar_type() != ref.scalar_type()) return at::kFloat;
  return ref.scalar_type();
}

// Same-shaped activation companions (delta, z, dout): device, shape, and u's dtype, contiguous.
at::Tensor activation_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  LLMK_CHECK_ARG(t.device() == ref.device(), op, arg, "must be on ", ref.device(), ", got ", t.device());
  LLMK_CHECK_ARG(t.sizes() == ref.sizes(), op, arg, "must have shape ", ref.sizes(), ", got ", t.sizes());
  LLMK_CHECK_ARG(is_float_type(t), op, arg, "must be float32, float16 or bfloat16, got ", t.scalar_type());
  return t.to(ref.scalar_type()).contiguous();
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The forward's inputs in kernel layout, kept alive for the launches, and the parameters pointing into them.
struct ScanInputs {
  at::Tensor u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx;
  ScanFwdParams params{};
};

// B or C: (dim, dstate) constant -> fp32; (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen) per token
// -> u's dtype. Sets per_token and ngroups.
at::Tensor prepare_bc(const char* op, const char* arg, const at::Tensor& M, const at::Tensor& u, int64_t dstate,
                      bool& per_token, int& ngroups) {
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  LLMK_CHECK_ARG(M.device() == u.device(), op, arg, "must be on ", u.device(), ", got ", M.device());
  LLMK_CHECK_ARG(is_float_type(M), op, arg, "must be float32, float16 or bfloat16, got ", M.scalar_type());
  if (M.dim() == 2) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({dim, dstate}), op, arg, "(constant) must have shape (", dim, ", ",
                   dstate, "), got ", M.sizes());
    per_token = false;
    ngroups = 1;
    return M.to(at::kFloat).contiguous();
  }
  if (M.dim() == 3) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({batch, dstate, seqlen}), op, arg, "(per token) must have shape (",
                   batch, ", ", dstate, ", ", seqlen, "), got ", M.sizes());
    ngroups = 1;
  } else {
    LLMK_CHECK_ARG(M.dim() == 4, op, arg, "must be (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, "
                   "dstate, seqlen), got shape ", M.sizes());
    const int64_t g = M.size(1);
    LLMK_CHECK_ARG(g >= 1 && dim % g == 0, op, arg, "has ", g, " groups, which must divide dim = ", dim);
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({batch, g, dstate, seqlen}), op, arg, "(grouped) must have shape (",
                   batch, ", ", g, ", ", dstate, ", ", seqlen, "), got ", M.sizes());
    ngroups = int(g);
  }
  per_token = true;
  return M.to(u.scalar_type()).contiguous();
}

ScanInputs prepare_scan(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                        bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                        const std::optional<at::Tensor>& seq_idx) {
  LLMK_CHECK_DEVICE(op, u, at::kCUDA);
  LLMK_CHECK_DIM(op, u, 3);
  LLMK_CHECK_ARG(is_float_type(u), op, "u", "must be float32, float16 or bfloat16, got ", u.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  LLMK_CHECK_ARG(batch * dim <= INT32_MAX && seqlen <= INT32_MAX / 2, op, "u", "is too large: shape ", u.sizes());
  LLMK_CHECK_SAME_DEVICE(op, A, u);
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  LLMK_CHECK_DIM(op, A, 2);
  LLMK_CHECK_ARG(A.size(0) == dim, op, "A", "must have shape (dim = ", dim, ", dstate), got ", A.sizes());
  const int64_t dstate = A.size(1);
  LLMK_CHECK_ARG(dstate >= 1 && dstate <= 256, op, "A", "dstate = ", dstate, " is not supported (1..256)");

  LLMK_CHECK_ARG(is_float_type(delta), op, "delta", "must be float32, float16 or bfloat16, got ", delta.scalar_type());
  const at::Tensor* z_ptr = z.has_value() && z->defined() ? &*z : nullptr;
  const at::ScalarType act = common_activation_dtype(
      u, {&delta, z_ptr, B.dim() > 2 ? &B : nullptr, C.dim() > 2 ? &C : nullptr});
  ScanInputs in;
  in.u = u.to(act).contiguous();
  in.delta = activation_like(op, "delta", delta, in.u);
  in.A = A.contiguous();
  ScanFwdParams& p = in.params;
  in.B = prepare_bc(op, "B", B, in.u, dstate, p.B_per_token, p.B_ngroups);
  in.C = prepare_bc(op, "C", C, in.u, dstate, p.C_per_token, p.C_ngroups);
  in.D = optional_fp32(op, "D", D, u, {dim});
  in.delta_bias = optional_fp32(op, "delta_bias", delta_bias, u, {dim});
  in.initial_state = optional_fp32(op, "initial_state", initial_state, u, {batch, dim, dstate});
  if (z.has_value() && z->defined()) in.z = activation_like(op, "z", *z, in.u);
  if (seq_idx.has_value() && seq_idx->defined()) {
    const at::Tensor& s = *seq_idx;
    LLMK_CHECK_ARG(s.device() == u.device(), op, "seq_idx", "must be on ", u.device(), ", got ", s.device());
    LLMK_CHECK_ARG(s.scalar_type() == at::kInt, op, "seq_idx", "must be int32, got ", s.scalar_type());
    LLMK_CHECK_ARG(s.sizes() == at::IntArrayRef({batch, seqlen}), op, "seq_idx", "must have shape (batch, seqlen) = (",
                   batch, ", ", seqlen, "), got ", s.sizes());
    in.seq_idx = s.contiguous();
  }

  p.batch = int(batch);
  p.dim = int(dim);
  p.seqlen = int(seqlen);
  p.dstate = int(dstate);
  p.nchunks = int((seqlen + kChunk - 1) / kChunk);
  p.delta_softplus = delta_softplus;
  p.u = in.u.data_ptr();
  p.delta = in.delta.data_ptr();
  p.z = in.z.defined() ? in.z.data_ptr() : nullptr;
  p.A = in.A.data_ptr<float>();
  p.B = in.B.data_ptr();
  p.C = in.C.data_ptr();
  p.D = in.D.defined() ? in.D.data_ptr<float>() : nullptr;
  p.delta_bias = in.delta_bias.defined() ? in.delta_bias.data_ptr<float>() : nullptr;
  p.initial_state = in.initial_state.defined() ? in.initial_state.data_ptr<float>() : nullptr;
  p.seq_idx = in.seq_idx.defined() ? in.seq_idx.data_ptr<int32_t>() : nullptr;
  // Vector loads need every row to start on 16 bytes: the base pointers, and a row length of whole vectors.
  p.vec = seqlen * int64_t(in.u.element_size()) % 16 == 0 && aligned16(p.u) && aligned16(p.delta) && aligned16(p.z) &&
          (!p.B_per_token || aligned16(p.B)) && (!p.C_per_token || aligned16(p.C));
  return in;
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus, const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx) {
  const char* op = "selective_scan_fwd";
  LLMK_CHECK_DEVICE(op, u, at::kCUDA);
  c10::cuda::CUDAGuard guard(u.device());
  ScanInputs in = prepare_scan(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx);
  ScanFwdParams& p = in.params;
  at::Tensor out = at::empty_like(in.u);
  at::Tensor last_state = at::empty({p.batch, p.dim, p.dstate}, u.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.last_state = last_state.data_ptr<float>();
  p.chunk_states = nullptr;
  if (p.batch * p.dim > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_activation_dtype(in.u.scalar_type(), op, "u", [&](auto tag) {
      launch_selective_scan_fwd<typename decltype(tag)::type>(p, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out.to(u.scalar_type()), last_state};
}

// Whether the backward runs the channel-parallel kernel: only with LLMKERNELS_SCAN_BWD=fast (read per call) until
// a GPU has measured it, and only where it applies (fast_scan_bwd_supported). Once measured, the default should
// also want enough (batch, channel) rows to fill the GPU: a CTA walks its whole row sequentially.
bool use_fast_scan_bwd(const ScanBwdParams& p) {
  const char* env = std::getenv("LLMKERNELS_SCAN_BWD");
  return env != nullptr && std::strcmp(env, "fast") == 0 && fast_scan_bwd_supported(p);
}

// An absent optional's gradient: an empty tensor.
at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
                        const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx) {
  const char* op = "selective_scan_bwd";
  LLMK_CHECK_DEVICE(op, u, at::kCUDA);
  c10::cuda::CUDAGuard guard(u.device());
  ScanInputs in = prepare_scan(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx);
  const int64_t batch = u.size(0), dim = u.size(1), dstate = A.size(1);
  at::Tensor dout_c = activation_like(op, "dout", dout, in.u);
  at::Tensor dlast = optional_fp32(op, "dlast_state", dlast_state, u, {batch, dim, dstate});
  const auto f32 = u.options().dtype(at::kFloat);

  ScanBwdFastParams p;
  static_cast<ScanFwdParams&>(p) = in.params;
  p.vec = p.vec && aligned16(dout_c.data_ptr());  // du, ddelta, dz are fresh allocations, aligned like u
  const bool fast = use_fast_scan_bwd(p) && batch * dim > 0;
  // The fast kernel writes every accumulated gradient outright; the chunked one adds into zeroed buffers.
  auto acc = [&](at::IntArrayRef shape) { return fast ? at::empty(shape, f32) : at::zeros(shape, f32); };
  at::Tensor chunk_states = at::empty({fast ? 0 : batch, dim, p.nchunks, dstate}, f32);
  at::Tensor scratch_last = at::empty({batch, dim, dstate}, f32);
  at::Tensor du = at::empty_like(in.u), ddelta = at::empty_like(in.u);
  at::Tensor dz = in.z.defined() ? at::empty_like(in.u) : at::Tensor();
  at::Tensor dA = acc({dim, dstate});
  at::Tensor dB = acc(in.B.sizes()), dC = acc(in.C.sizes());
  at::Tensor dD = in.D.defined() ? acc({dim}) : at::Tensor();
  at::Tensor ddelta_bias = in.delta_bias.defined() ? acc({dim}) : at::Tensor();
  at::Tensor dinit = in.initial_state.defined() ? at::empty({batch, dim, dstate}, f32) : at::Tensor();

  p.out = nullptr;  // the recompute pass stores only the chunk-entry states
  p.last_state = scratch_last.data_ptr<float>();
  p.chunk_states = chunk_states.data_ptr<float>();
  p.dout = dout_c.data_ptr();
  p.dlast_state = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
  p.chunk_states_in = chunk_states.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = dz.defined() ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = dD.defined() ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = ddelta_bias.defined() ? ddelta_bias.data_ptr<float>() : nullptr;
  p.dinitial_state = dinit.defined() ? dinit.data_ptr<float>() : nullptr;

  at::Tensor ckpt, part_bc, part_A, part_D, part_bias;  // the fast kernel's scratch
  if (fast) {
    const int64_t ctas = batch * dim / kFastCh, ntiles = (u.size(2) + kFastT - 1) / kFastT;
    ckpt = at::empty({ctas, ntiles, kFastCh, kFastN}, f32);
    part_bc = at::empty({ctas, u.size(2), 2 * kFastN}, f32);
    part_A = at::empty({batch, dim, kFastN}, f32);
    part_D = at::empty({batch, dim}, f32);
    part_bias = at::empty({batch, dim}, f32);
    p.ckpt = ckpt.data_ptr<float>();
    p.part_bc = part_bc.data_ptr<float>();
    p.part_A = part_A.data_ptr<float>();
    p.part_D = part_D.data_ptr<float>();
    p.part_bias = part_bias.data_ptr<float>();
  }
  if (batch * dim > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_activation_dtype(in.u.scalar_type(), op, "u", [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (fast) {
        launch_selective_scan_bwd_fast<T>(p, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      launch_selective_scan_fwd<T>(p, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_selective_scan_bwd<T>(p, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (p.nchunks == 0 && dinit.defined()) {  // seqlen 0: the state passes straight through
    if (dlast.defined()) {
      dinit.copy_(dlast);
    } else {
      dinit.zero_();
    }
  }
  auto opt_grad = [&](const at::Tensor& grad, const std::optional<at::Tensor>& input) {
    return grad.defined() ? grad.to(input->scalar_type()) : absent(u);
  };
  return {du.to(u.scalar_type()),
          ddelta.to(delta.scalar_type()),
          dA,
          dB.to(B.scalar_type()),
          dC.to(C.scalar_type()),
          opt_grad(dD, D),
          dz.defined() ? dz.to(z->scalar_type()) : absent(u),
          opt_grad(ddelta_bias, delta_bias),
          opt_grad(dinit, initial_state)};
}

// A pool of decode states' indices (state_batch_indices / conv_state_indices), (batch,) int32 on x's device, made
// contiguous; their values stay on the device: the kernels leave a row whose index is outside the pool out (a
// negative one is a pad slot). Undefined when not given.
at::Tensor pool_indices(const char* op, const char* name, const std::optional<at::Tensor>& indices,
                        const at::Tensor& x, const at::Tensor& pool) {
  if (!indices.has_value() || !indices->defined()) return at::Tensor();
  const at::Tensor& t = *indices;
  LLMK_CHECK_ARG(t.device() == x.device(), op, name, "must be on x's device (", x.device(), "), got ", t.device());
  LLMK_CHECK_ARG(t.scalar_type() == at::kInt, op, name, "must have dtype int32, got ", t.scalar_type());
  LLMK_CHECK_ARG(t.dim() == 1 && t.size(0) == x.size(0), op, name, "must have shape (", x.size(0), "), got ",
                 t.sizes());
  LLMK_CHECK_ARG(pool.size(0) <= INT32_MAX, op, name, "picks from a pool of too many rows: ", pool.size(0));
  return t.contiguous();
}

at::Tensor selective_state_update_cuda(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                       const std::optional<at::Tensor>& state_batch_indices) {
  const char* op = "selective_state_update";
  LLMK_CHECK_DEVICE(op, x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  LLMK_CHECK_DIM(op, x, 2);
  LLMK_CHECK_ARG(is_float_type(x), op, "x", "must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t batch = x.size(0), dim = x.size(1);
  LLMK_CHECK_SAME_DEVICE(op, A, x);
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  // A (dim,): one value per channel for every state entry (Mamba-2's per-head A, flattened); dstate is the state's.
  LLMK_CHECK_ARG(A.dim() == 2 || A.dim() == 1, op, "A", "must be (dim, dstate) or (dim,), got ", A.sizes());
  LLMK_CHECK_ARG(A.size(0) == dim, op, "A", "must have shape (dim = ", dim, ", dstate) or (dim,), got ", A.sizes());
  LLMK_CHECK_SAME_DEVICE(op, state, x);
  LLMK_CHECK_DIM(op, state, 3);
  const int64_t dstate = A.dim() == 2 ? A.size(1) : state.size(2);
  LLMK_CHECK_ARG(dstate >= 1 && dstate <= 256, op, "A", "dstate = ", dstate, " is not supported (1..256)");
  const at::Tensor rows_c = pool_indices(op, "state_batch_indices", state_batch_indices, x, state);
  const bool indexed = rows_c.defined();
  LLMK_CHECK_SHAPE(op, state, indexed ? state.size(0) : batch, dim, dstate);
  LLMK_CHECK_ARG(is_float_type(state), op, "state", "must be float32, float16 or bfloat16, got ", state.scalar_type());
  LLMK_CHECK_ARG(batch * dim * 32 <= INT32_MAX, op, "x", "is too large: shape ", x.sizes());
  LLMK_CHECK_SAME_DEVICE(op, B, x);
  LLMK_CHECK_ARG(B.dim() == 2 || B.dim() == 3, op, "B", "must be (batch, dstate) or (batch, ngroups, dstate), got ",
                 B.sizes());
  const int64_t ngroups = B.dim() == 3 ? B.size(1) : 1;
  LLMK_CHECK_ARG(ngroups >= 1 && dim % ngroups == 0, op, "B", "has ", ngroups, " groups, which must divide dim = ", dim);
  if (B.dim() == 2) {
    LLMK_CHECK_SHAPE(op, B, batch, dstate);
  } else {
    LLMK_CHECK_SHAPE(op, B, batch, ngroups, dstate);
  }
  LLMK_CHECK_ARG(C.sizes() == B.sizes(), op, "C", "must have the shape of B ", B.sizes(), ", got ", C.sizes());
  LLMK_CHECK_ARG(is_float_type(B), op, "B", "must be float32, float16 or bfloat16, got ", B.scalar_type());
  LLMK_CHECK_ARG(is_float_type(C), op, "C", "must be float32, float16 or bfloat16, got ", C.scalar_type());
  LLMK_CHECK_ARG(is_float_type(dt), op, "dt", "must be float32, float16 or bfloat16, got ", dt.scalar_type());
  const at::Tensor* z_ptr = z.has_value() && z->defined() ? &*z : nullptr;
  const at::ScalarType act = common_activation_dtype(x, {&dt, z_ptr, &B, &C});
  at::Tensor x_c = x.to(act).contiguous();
  at::Tensor dt_c = activation_like(op, "dt", dt, x_c);
  at::Tensor z_c = z_ptr != nullptr ? activation_like(op, "z", *z, x_c) : at::Tensor();
  LLMK_CHECK_SAME_DEVICE(op, C, x);
  at::Tensor B_c = B.to(act).contiguous();
  at::Tensor C_c = C.to(act).contiguous();
  at::Tensor D_c = optional_fp32(op, "D", D, x, {dim});
  at::Tensor bias_c = optional_fp32(op, "dt_bias", dt_bias, x, {dim});
  at::Tensor A_c = A.contiguous();
  at::Tensor out = at::empty_like(x_c);

  StateUpdateParams p{};
  p.batch = int(batch);
  p.dim = int(dim);
  p.dstate = int(dstate);
  p.ngroups = int(ngroups);
  p.channels_per_group = int(dim / ngroups);
  p.dt_softplus = dt_softplus;
  p.state = state.data_ptr();
  p.state_stride_b = state.stride(0);
  p.state_stride_d = state.stride(1);
  p.state_stride_n = state.stride(2);
  p.state_rows = indexed ? rows_c.data_ptr<int32_t>() : nullptr;
  p.state_batch = int(state.size(0));
  p.x = x_c.data_ptr();
  p.dt = dt_c.data_ptr();
  p.z = z_c.defined() ? z_c.data_ptr() : nullptr;
  p.A = A_c.data_ptr<float>();
  p.a_stride_d = A.dim() == 2 ? int(dstate) : 1;
  p.a_stride_n = A.dim() == 2 ? 1 : 0;
  p.B = B_c.data_ptr();
  p.C = C_c.data_ptr();
  p.D = D_c.defined() ? D_c.data_ptr<float>() : nullptr;
  p.dt_bias = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  if (batch * dim > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_activation_dtype(act, op, "x", [&](auto xtag) {
      dispatch_activation_dtype(state.scalar_type(), op, "state", [&](auto stag) {
        launch_selective_state_update<typename decltype(xtag)::type, typename decltype(stag)::type>(p, stream);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(x.scalar_type());
}

// Conv weight (dim, width 2..4) and bias (dim,) as fp32 for the kernels.
void prepare_conv_weights(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& weight_f, at::Tensor& bias_f) {
  const int64_t dim = x.size(1);
  LLMK_CHECK_SAME_DEVICE(op, weight, x);
  LLMK_CHECK_DIM(op, weight, 2);
  LLMK_CHECK_ARG(weight.size(0) == dim && weight.size(1) >= 2 && weight.size(1) <= 4, op, "weight",
                 "must have shape (dim = ", dim, ", width in 2..4), got ", weight.sizes());
  LLMK_CHECK_ARG(weight.is_floating_point(), op, "weight", "must be a floating tensor, got ", weight.scalar_type());
  weight_f = weight.to(at::kFloat).contiguous();
  bias_f = optional_fp32(op, "bias", bias, x, {dim});
}

// The fields the conv1d forward and backward share; x_c is the contiguous (batch, dim, seqlen) input.
static ConvParams conv_params(const at::Tensor& x_c, const at::Tensor& weight_f, const at::Tensor& bias_f, bool silu) {
  ConvParams p{};
  p.batch = int(x_c.size(0));
  p.dim = int(x_c.size(1));
  p.seqlen = int(x_c.size(2));
  p.width = int(weight_f.size(1));
  p.silu = silu;
  p.x = x_c.data_ptr();
  p.weight = weight_f.data_ptr<float>();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  return p;
}

// seq_idx and initial_states of the conv1d forward / backward, checked, into p (kept alive in seq_c / init_f).
static void conv_packing(const char* op, const at::Tensor& x_c, int width, const std::optional<at::Tensor>& seq_idx,
                         const std::optional<at::Tensor>& initial_states, at::Tensor& seq_c, at::Tensor& init_f,
                         ConvParams& p) {
  const bool has_seq = seq_idx.has_value() && seq_idx->defined();
  const bool has_init = initial_states.has_value() && initial_states->defined();
  LLMK_CHECK_ARG(!(has_seq && has_init), op, "initial_states", "cannot be combined with seq_idx");
  if (has_seq) {
    const at::Tensor& s = *seq_idx;
    LLMK_CHECK_ARG(s.device() == x_c.device(), op, "seq_idx", "must be on ", x_c.device(), ", got ", s.device());
    LLMK_CHECK_ARG(s.scalar_type() == at::kInt, op, "seq_idx", "must be int32, got ", s.scalar_type());
    LLMK_CHECK_ARG(s.sizes() == at::IntArrayRef({x_c.size(0), x_c.size(2)}), op, "seq_idx",
                   "must have shape (batch, seqlen) = (", x_c.size(0), ", ", x_c.size(2), "), got ", s.sizes());
    // The kernels compare a tap's seq_idx with the output's by value: runs renumbered 0, 1, 2, ... along each row,
    // so that equal values in separate runs ([0, 1, 0]) stay apart, as the CPU op and the reference take them.
    const int64_t L = s.size(1);
    seq_c = L > 1 ? at::cat({at::zeros_like(s.narrow(1, 0, 1)),
                             at::ne(s.narrow(1, 1, L - 1), s.narrow(1, 0, L - 1)).cumsum(1, at::kInt)}, 1)
                  : s.contiguous();
    p.seq_idx = seq_c.data_ptr<int32_t>();
  }
  if (has_init) {
    init_f = optional_fp32(op, "initial_states", initial_states, x_c, {x_c.size(0), x_c.size(1), width - 1});
    p.initial_states = init_f.data_ptr<float>();
  }
}

at::Tensor causal_conv1d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool silu, const std::optional<at::Tensor>& seq_idx,
                                  const std::optional<at::Tensor>& initial_states) {
  const char* op = "causal_conv1d_fwd";
  LLMK_CHECK_DEVICE(op, x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  LLMK_CHECK_DIM(op, x, 3);
  LLMK_CHECK_ARG(is_float_type(x), op, "x", "must be float32, float16 or bfloat16, got ", x.scalar_type());
  // The forward's grid has seqlen / 256 blocks on y (at most 65535).
  LLMK_CHECK_ARG(x.size(0) * x.size(1) <= INT32_MAX && x.size(2) <= 65535LL * 256, op, "x", "is too large: shape ",
                 x.sizes());
  at::Tensor weight_f, bias_f;
  prepare_conv_weights(op, x, weight, bias, weight_f, bias_f);
  at::Tensor x_c = x.contiguous();
  at::Tensor out = at::empty_like(x_c);
  ConvParams p = conv_params(x_c, weight_f, bias_f, silu);
  at::Tensor seq_c, init_f;
  conv_packing(op, x_c, p.width, seq_idx, initial_states, seq_c, init_f, p);
  p.out = out.data_ptr();
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_activation_dtype(x.scalar_type(), op, "x", [&](auto tag) {
    launch_causal_conv1d_fwd<typename decltype(tag)::type>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    bool silu, const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states) {
  const char* op = "causal_conv1d_bwd";
  LLMK_CHECK_DEVICE(op, x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  LLMK_CHECK_DIM(op, x, 3);
  LLMK_CHECK_ARG(x.size(0) * x.size(1) <= INT32_MAX && x.size(2) <= INT32_MAX / 2, op, "x", "is too large: shape ",
                 x.sizes());
  at::Tensor weight_f, bias_f;
  prepare_conv_weights(op, x, weight, bias, weight_f, bias_f);
  LLMK_CHECK_ARG(is_float_type(x), op, "x", "must be float32, float16 or bfloat16, got ", x.scalar_type());
  // x and dout in one dtype: x's, or fp32 when dout's differs (never rounding dout to a 16-bit x's dtype)
  at::Tensor x_c = x.to(common_activation_dtype(x, {&dout})).contiguous();
  at::Tensor dout_c = activation_like(op, "dout", dout, x_c);
  at::Tensor dx = at::empty_like(x_c);
  at::Tensor dweight = at::zeros(weight.sizes(), weight_f.options());
  at::Tensor dbias = bias_f.defined() ? at::zeros(bias_f.sizes(), bias_f.options()) : at::Tensor();
  ConvParams p = conv_params(x_c, weight_f, bias_f, silu);
  at::Tensor seq_c, init_f;
  conv_packing(op, x_c, p.width, seq_idx, initial_states, seq_c, init_f, p);
  // seqlen 0: no output reads the initial states, so their gradient is 0 (no kernel runs)
  at::Tensor dinit = init_f.defined() ? at::zeros(init_f.sizes(), init_f.options()) : at::Tensor();
  p.dinitial_states = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
  p.dout = dout_c.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr<float>();
  p.dbias = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  if (p.batch * p.dim > 0 && p.seqlen > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_activation_dtype(x_c.scalar_type(), op, "x", [&](auto tag) {
      launch_causal_conv1d_bwd<typename decltype(tag)::type>(p, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx.to(x.scalar_type()), dweight.to(weight.scalar_type()),
          dbias.defined() ? dbias.to(bias->scalar_type()) : at::empty({0}, weight_f.options()),
          dinit.defined() ? dinit.to(initial_states->scalar_type()) : at::empty({0}, weight_f.options())};
}

at::Tensor causal_conv1d_update_cuda(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool silu,
                                     const std::optional<at::Tensor>& conv_state_indices,
                                     const std::optional<at::Tensor>& cache_seqlens) {
  const char* op = "causal_conv1d_update";
  LLMK_CHECK_DEVICE(op, x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  // x (batch, dim) or (batch, dim, seqlen): seqlen steps in one launch
  LLMK_CHECK_ARG(x.dim() == 2 || x.dim() == 3, op, "x", "must be (batch, dim) or (batch, dim, seqlen), got ",
                 x.sizes());
  LLMK_CHECK_ARG(is_float_type(x), op, "x", "must be float32, float16 or bfloat16, got ", x.scalar_type());
  LLMK_CHECK_ARG(x.size(0) * x.size(1) <= INT32_MAX && (x.dim() == 2 || x.size(2) <= INT32_MAX), op, "x",
                 "is too large: shape ", x.sizes());
  at::Tensor weight_f, bias_f;
  prepare_conv_weights(op, x, weight, bias, weight_f, bias_f);
  LLMK_CHECK_SAME_DEVICE(op, conv_state, x);
  LLMK_CHECK_ARG(is_float_type(conv_state), op, "conv_state", "must be float32, float16 or bfloat16, got ",
                 conv_state.scalar_type());
  LLMK_CHECK_DIM(op, conv_state, 3);
  LLMK_CHECK_NO_OVERLAP(op, conv_state);
  const at::Tensor rows_c = pool_indices(op, "conv_state_indices", conv_state_indices, x, conv_state);
  const bool indexed = rows_c.defined();
  LLMK_CHECK_ARG((indexed || conv_state.size(0) == x.size(0)) && conv_state.size(1) == x.size(1) &&
                     conv_state.size(2) >= weight.size(1) - 1 && conv_state.size(2) <= INT32_MAX,
                 op, "conv_state", "must have shape (", indexed ? "rows" : std::to_string(x.size(0)), ", ", x.size(1),
                 ", state_len >= width - 1 = ", weight.size(1) - 1, "), got ", conv_state.sizes());
  at::Tensor lens;  // cache_seqlens: a circular state
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    lens = *cache_seqlens;
    LLMK_CHECK_ARG(lens.device() == x.device(), op, "cache_seqlens", "must be on x's device (", x.device(), "), got ",
                   lens.device());
    LLMK_CHECK_ARG(lens.scalar_type() == at::kInt || lens.scalar_type() == at::kLong, op, "cache_seqlens",
                   "must have dtype int32 or int64, got ", lens.scalar_type());
    LLMK_CHECK_ARG(lens.dim() == 1 && lens.size(0) == x.size(0), op, "cache_seqlens", "must have shape (",
                   x.size(0), "), got ", lens.sizes());
    lens = lens.contiguous();
  }
  at::Tensor x_c = x.contiguous();
  at::Tensor out = at::empty_like(x_c);
  ConvUpdateParams p{};
  p.batch = int(x.size(0));
  p.dim = int(x.size(1));
  p.width = int(weight.size(1));
  p.state_len = int(conv_state.size(2));
  p.seqlen = x.dim() == 3 ? int(x.size(2)) : 1;
  p.silu = silu;
  p.x = x_c.data_ptr();
  p.conv_state = conv_state.data_ptr();
  p.state_stride_b = conv_state.stride(0);
  p.state_stride_d = conv_state.stride(1);
  p.state_stride_w = conv_state.stride(2);
  p.cache_seqlens = lens.defined() ? lens.const_data_ptr() : nullptr;
  p.cache_seqlens_64 = lens.defined() && lens.scalar_type() == at::kLong;
  p.state_rows = indexed ? rows_c.data_ptr<int32_t>() : nullptr;
  p.state_batch = int(conv_state.size(0));
  p.weight = weight_f.data_ptr<float>();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_activation_dtype(x.scalar_type(), op, "x", [&](auto xtag) {
    dispatch_activation_dtype(conv_state.scalar_type(), op, "conv_state", [&](auto stag) {
      launch_causal_conv1d_update<typename decltype(xtag)::type, typename decltype(stag)::type>(p, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace llmkernels::scan

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  using namespace llmkernels::scan;
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda);
  m.impl("selective_state_update", &selective_state_update_cuda);
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd_cuda);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd_cuda);
  m.impl("causal_conv1d_update", &causal_conv1d_update_cuda);
}
