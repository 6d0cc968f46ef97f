// Host side of the selective scan on the CPU: argument checks, the fp32 preprocessing (dtype conversion,
// delta_bias, dstate padding and B/C transposed so each B_t is contiguous, with ATen ops; softplus with our
// own vectorised kernel), the parallel split of rows, and the reductions of per-row gradients. The per-row
// recurrences are in cpu/scan_rows.inc, compiled for AVX-512, AVX2 and scalar and chosen at run time.
//
// Speed (one 2-core AVX-512 machine, fp32, batch 1, dim 64, seqlen 2048, dstate 16): forward about 1 ms
// (~0.5 ns per state element and step, bound by the fp32 exp), forward + backward about 13 ms.
//
// Parallelism (at::parallel_for): the forward over (batch, channel) rows. The backward over (batch, part)
// items, each a range of channels with its own dB/dC accumulator, so that per-token B/C gradients (summed
// over the channels that share them) need no atomics: parts = ceil(threads / batch), so the extra memory
// is about max(threads, batch) x (seqlen, dstate) floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "scan/cpu/scan_kernels.h"

namespace llmkernels::scan_cpu {
namespace {

// LLMKERNELS_CPU_ISA=avx2 / scalar (cpu_features.h) select the other builds of scan_rows.inc for tests.
const Kernels& kernels() {
  static const Kernels k = use_avx512() ? kernels_avx512() : use_avx2() ? kernels_avx2() : kernels_scalar();
  return k;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// softplus(pre) for fp32 contiguous pre, vectorised and parallel (ATen's CPU softplus was several times
// slower than the whole scan here). softplus(x) = x above 20 in both.
at::Tensor softplus_f32(const at::Tensor& pre) {
  at::Tensor out = pre.clone();
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 1 << 16, [&](int64_t begin, int64_t end) { kernels().softplus(p + begin, end - begin); });
  return out;
}

// grad *= sigmoid(pre) in place: the backward of softplus.
void softplus_backward_(at::Tensor& grad, const at::Tensor& pre) {
  float* g = grad.data_ptr<float>();
  const float* x = pre.const_data_ptr<float>();
  at::parallel_for(0, grad.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    kernels().softplus_backward(g + begin, x + begin, end - begin);
  });
}

bool is_scan_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

#define SCAN_CHECK_FLOAT(op, t) \
  LLMK_CHECK_ARG(is_scan_dtype((t).scalar_type()), op, #t, "must be float32, float16 or bfloat16, got ", (t).scalar_type())

// B or C as the kernels read it: fp32, dstate padded to npad; (dim, npad) when constant, else
// (batch, groups, L, npad) so each B_t is a contiguous vector.
struct PackedBC {
  at::Tensor data;
  int64_t groups = 0;  // 0: constant
  int64_t stride = 0;  // floats between consecutive time steps
  int64_t offset(int64_t b, int64_t d, int64_t dim, int64_t L, int64_t npad) const {
    if (groups == 0) return d * npad;
    return (b * groups + d / (dim / groups)) * L * npad;
  }
};

PackedBC pack_bc(const at::Tensor& M, int64_t batch, int64_t L, int64_t dstate, int64_t npad) {
  if (M.dim() == 2) {
    auto p = at::zeros({M.size(0), npad}, M.options().dtype(at::kFloat));
    p.narrow(1, 0, dstate).copy_(M);
    return {p, 0, 0};
  }
  const at::Tensor G = M.dim() == 3 ? M.unsqueeze(1) : M;  // (batch, groups, dstate, L)
  auto p = at::zeros({batch, G.size(1), L, npad}, M.options().dtype(at::kFloat));
  p.narrow(3, 0, dstate).copy_(G.transpose(2, 3));
  return {p, G.size(1), npad};
}

// (..., dstate) -> fp32 (..., npad), zero padded. may_alias: the caller only reads the result (or means to update
// s in place), so s itself is returned when it already has that layout: decode steps are microseconds of
// arithmetic, and each avoided allocation and copy shows.
at::Tensor pad_state(const at::Tensor& s, int64_t npad, bool may_alias = false) {
  if (may_alias && s.size(-1) == npad && s.scalar_type() == at::kFloat && s.is_contiguous()) return s;
  auto sizes = s.sizes().vec();
  const int64_t dstate = sizes.back();
  sizes.back() = npad;
  auto p = at::zeros(sizes, s.options().dtype(at::kFloat));
  p.narrow(-1, 0, dstate).copy_(s);
  return p;
}

void check_bc(const char* op, const char* name, const at::Tensor& M, int64_t batch, int64_t dim, int64_t dstate,
              int64_t L) {
  SCAN_CHECK_FLOAT(op, M);
  LLMK_CHECK_ARG(M.is_contiguous(), op, name, "must be contiguous");
  if (M.dim() == 2) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({dim, dstate}), op, name, "must have shape (dim, dstate) = (", dim,
                   ", ", dstate, "), got ", M.sizes());
  } else if (M.dim() == 3) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({batch, dstate, L}), op, name, "must have shape (batch, dstate, seqlen) = (",
                   batch, ", ", dstate, ", ", L, "), got ", M.sizes());
  } else {
    LLMK_CHECK_ARG(M.dim() == 4 && M.size(0) == batch && M.size(1) >= 1 && dim % M.size(1) == 0 &&
                       M.size(2) == dstate && M.size(3) == L,
                   op, name, "must have shape (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen)",
                   " with dim % ngroups == 0, for dim ", dim, ", dstate ", dstate, ", seqlen ", L, "; got ", M.sizes());
  }
}

// Shapes shared by forward and backward; every message names the argument.
void check_scan(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& C, const std::optional<at::Tensor>& D_opt, const std::optional<at::Tensor>& z_opt,
                const std::optional<at::Tensor>& delta_bias_opt, const std::optional<at::Tensor>& initial_state_opt) {
  LLMK_CHECK_DIM(op, u, 3);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  SCAN_CHECK_FLOAT(op, u);
  SCAN_CHECK_FLOAT(op, delta);
  LLMK_CHECK_DEVICE(op, u, at::kCPU);
  LLMK_CHECK_CONTIGUOUS(op, u);
  LLMK_CHECK_CONTIGUOUS(op, delta);
  LLMK_CHECK_SHAPE(op, delta, batch, dim, L);
  LLMK_CHECK_DIM(op, A, 2);
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  const int64_t dstate = A.size(1);
  LLMK_CHECK_ARG(A.size(0) == dim && dstate >= 1 && dstate <= kMaxState, op, "A",
                 "must have shape (dim, dstate) with dim = ", dim, " and 1 <= dstate <= ", kMaxState, ", got ", A.sizes());
  check_bc(op, "B", B, batch, dim, dstate, L);
  check_bc(op, "C", C, batch, dim, dstate, L);
  if (D_opt) {
    const at::Tensor& D = *D_opt;
    LLMK_CHECK_SHAPE(op, D, dim);
    LLMK_CHECK_DTYPE(op, D, at::kFloat);
  }
  if (delta_bias_opt) {
    const at::Tensor& delta_bias = *delta_bias_opt;
    LLMK_CHECK_SHAPE(op, delta_bias, dim);
    LLMK_CHECK_DTYPE(op, delta_bias, at::kFloat);
  }
  if (z_opt) {
    const at::Tensor& z = *z_opt;
    SCAN_CHECK_FLOAT(op, z);
    LLMK_CHECK_SHAPE(op, z, batch, dim, L);
    LLMK_CHECK_CONTIGUOUS(op, z);
  }
  if (initial_state_opt) {
    const at::Tensor& initial_state = *initial_state_opt;
    LLMK_CHECK_SHAPE(op, initial_state, batch, dim, dstate);
    LLMK_CHECK_DTYPE(op, initial_state, at::kFloat);
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}})
    LLMK_CHECK_ARG(t->device() == u.device(), op, name, "must be on the CPU like u, got ", t->device());
}

// Elements [offset, offset + n) of a contiguous fp32 / fp16 / bf16 tensor, converted to fp32 into buf.
void copy_row_f32(const at::Tensor& t, int64_t offset, int64_t n, float* buf) {
  switch (t.scalar_type()) {
    case at::kFloat: {
      const float* src = t.const_data_ptr<float>() + offset;
      std::copy(src, src + n, buf);
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* src = t.const_data_ptr<c10::BFloat16>() + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
      break;
    }
    default: {
      const c10::Half* src = t.const_data_ptr<c10::Half>() + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    }
  }
}

// The same row read in place when t is fp32 already, else converted into buf.
const float* row_f32(const at::Tensor& t, int64_t offset, int64_t n, float* buf) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>() + offset;
  copy_row_f32(t, offset, n, buf);
  return buf;
}

// What every row reads besides its own u, delta, z: A, D, B, C in fp32 with padded dstate, and the initial state.
struct Operands {
  int64_t batch, dim, L, dstate, npad;
  at::Tensor A, D, init;
  PackedBC B, C;

  ScanRow row(int64_t r, const float* u, const float* delta, const float* z) const {
    const int64_t b = r / dim, d = r % dim;
    return ScanRow{L,
                   npad,
                   u,
                   delta,
                   z,
                   A.const_data_ptr<float>() + d * npad,
                   B.data.const_data_ptr<float>() + B.offset(b, d, dim, L, npad),
                   C.data.const_data_ptr<float>() + C.offset(b, d, dim, L, npad),
                   B.stride,
                   C.stride,
                   D.defined() ? D.const_data_ptr<float>()[d] : 0.0f};
  }
};

Operands prepare_operands(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                          const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& initial_state) {
  Operands o;
  o.batch = u.size(0), o.dim = u.size(1), o.L = u.size(2), o.dstate = A.size(1), o.npad = padded_state(o.dstate);
  o.A = pad_state(A, o.npad, /*may_alias=*/true);
  if (D) o.D = f32(*D);
  // a copy even when the layout matches: the forward updates it in place into the last state
  o.init = initial_state ? pad_state(*initial_state, o.npad)
                         : at::zeros({o.batch, o.dim, o.npad}, u.options().dtype(at::kFloat));
  o.B = pack_bc(B, o.batch, o.L, o.dstate, o.npad);
  o.C = pack_bc(C, o.batch, o.L, o.dstate, o.npad);
  return o;
}

// The backward's view: also u, delta (before and after softplus) and z as whole fp32 tensors.
struct Prepared : Operands {
  at::Tensor u, delta_pre, delta, z;

  ScanRow row(int64_t r) const {
    return Operands::row(r, u.const_data_ptr<float>() + r * L, delta.const_data_ptr<float>() + r * L,
                         z.defined() ? z.const_data_ptr<float>() + r * L : nullptr);
  }
};

Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                 const std::optional<at::Tensor>& initial_state) {
  Prepared p;
  static_cast<Operands&>(p) = prepare_operands(u, A, B, C, D, initial_state);
  p.u = f32(u);
  p.delta_pre = f32(delta);
  if (delta_bias) p.delta_pre = p.delta_pre + delta_bias->view({1, p.dim, 1});
  p.delta_pre = p.delta_pre.contiguous();
  p.delta = delta_softplus ? softplus_f32(p.delta_pre) : p.delta_pre;
  if (z) p.z = f32(*z);
  return p;
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                          const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                          const std::optional<at::Tensor>& D,
                                                          const std::optional<at::Tensor>& z,
                                                          const std::optional<at::Tensor>& delta_bias,
                                                          bool delta_softplus,
                                                          const std::optional<at::Tensor>& initial_state) {
  const char* op = "selective_scan_fwd";
  check_scan(op, u, delta, A, B, C, D, z, delta_bias, initial_state);
  // u, delta and z are read row by row in their own dtype: each row is converted (and delta biased and
  // softplus'd) into a small per-thread fp32 buffer inside the parallel loop, instead of whole fp32 copies made
  // one after another before it (for bf16 inputs those passes cost about as much as the scan itself).
  const Operands o = prepare_operands(u, A, B, C, D, initial_state);
  const int64_t dim = o.dim, L = o.L, dstate = o.dstate, npad = o.npad;
  const at::Tensor bias = delta_bias ? f32(*delta_bias) : at::Tensor();
  at::Tensor state = o.init;  // updated in place into the last state
  at::Tensor out = at::empty({o.batch, dim, L}, u.options().dtype(at::kFloat));
  float* state_ptr = state.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const Kernels& k = kernels();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * npad));
  at::parallel_for(0, o.batch * dim, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * L);  // u, delta, z rows in fp32
    float *ub = buf.data(), *db = ub + L, *zb = db + L;
    for (int64_t r = begin; r < end; ++r) {
      const float* ur = row_f32(u, r * L, L, ub);
      copy_row_f32(delta, r * L, L, db);  // always a copy: biased and softplus'd in place below
      if (bias.defined()) {
        const float bd = bias.const_data_ptr<float>()[r % dim];
        for (int64_t t = 0; t < L; ++t) db[t] += bd;
      }
      if (delta_softplus) k.softplus(db, L);
      const float* zr = z ? row_f32(*z, r * L, L, zb) : nullptr;
      k.fwd_row(o.row(r, ur, db, zr), state_ptr + r * npad, out_ptr + r * L);
    }
  });
  return {out.to(u.scalar_type()), state.narrow(2, 0, dstate).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const std::optional<at::Tensor>& initial_state) {
  const char* op = "selective_scan_bwd";
  check_scan(op, u, delta, A, B, C, D, z, delta_bias, initial_state);
  LLMK_CHECK_SHAPE(op, dout, u.size(0), u.size(1), u.size(2));
  SCAN_CHECK_FLOAT(op, dout);
  if (dlast_state) {
    const at::Tensor& dlast = *dlast_state;
    LLMK_CHECK_SHAPE(op, dlast, u.size(0), u.size(1), A.size(1));
    LLMK_CHECK_DTYPE(op, dlast, at::kFloat);
  }
  const Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state);
  const int64_t batch = p.batch, dim = p.dim, L = p.L, npad = p.npad;
  const auto fopt = p.u.options();

  const at::Tensor dout_f = f32(dout);
  const at::Tensor dlast = dlast_state ? pad_state(*dlast_state, npad, /*may_alias=*/true) : at::Tensor();
  at::Tensor du = at::empty({batch, dim, L}, fopt), ddelta = at::empty({batch, dim, L}, fopt);
  at::Tensor dz = z ? at::empty({batch, dim, L}, fopt) : at::Tensor();
  at::Tensor dA_rows = at::zeros({batch, dim, npad}, fopt), dD_rows = at::zeros({batch, dim}, fopt);
  at::Tensor dinit = at::empty({batch, dim, npad}, fopt);

  // Work items: (batch, part), a part being a range of channels; per-token dB/dC accumulate per item.
  const int64_t parts = std::clamp<int64_t>((at::get_num_threads() + batch - 1) / batch, 1, std::max<int64_t>(dim, 1));
  const int64_t per_part = (dim + parts - 1) / parts;
  auto grad_acc = [&](const PackedBC& M) {  // constant: per row (batch, dim, npad); else (batch, parts, groups, L, npad)
    return M.groups == 0 ? at::zeros({batch, dim, npad}, fopt) : at::zeros({batch, parts, M.groups, L, npad}, fopt);
  };
  at::Tensor dB_acc = grad_acc(p.B), dC_acc = grad_acc(p.C);
  auto acc_offset = [&](const PackedBC& M, int64_t b, int64_t part, int64_t d) -> int64_t {
    if (M.groups == 0) return (b * dim + d) * npad;
    return ((b * parts + part) * M.groups + d / (dim / M.groups)) * L * npad;
  };

  const auto bwd_row = kernels().bwd_row;
  at::parallel_for(0, batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(bwd_scratch_floats(L, npad));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / parts, part = item % parts;
      for (int64_t d = part * per_part; d < std::min(dim, (part + 1) * per_part); ++d) {
        const int64_t r = b * dim + d;
        const ScanRowGrad g{dout_f.const_data_ptr<float>() + r * L,
                            dlast.defined() ? dlast.const_data_ptr<float>() + r * npad : nullptr,
                            du.data_ptr<float>() + r * L,
                            ddelta.data_ptr<float>() + r * L,
                            dz.defined() ? dz.data_ptr<float>() + r * L : nullptr,
                            dA_rows.data_ptr<float>() + r * npad,
                            dB_acc.data_ptr<float>() + acc_offset(p.B, b, part, d),
                            dC_acc.data_ptr<float>() + acc_offset(p.C, b, part, d),
                            dD_rows.data_ptr<float>() + r,
                            dinit.data_ptr<float>() + r * npad,
                            scratch.data()};
        bwd_row(p.row(r), p.init.const_data_ptr<float>() + r * npad, g);
      }
    }
  });

  const int64_t n = p.dstate;
  auto finish_bc = [&](const at::Tensor& acc, const PackedBC& M, const at::Tensor& like) {
    if (M.groups == 0) return acc.sum(0).narrow(1, 0, n).to(like.scalar_type()).contiguous();
    at::Tensor g = acc.sum(1).narrow(3, 0, n).transpose(2, 3);  // (batch, groups, dstate, L)
    if (like.dim() == 3) g = g.squeeze(1);
    return g.to(like.scalar_type()).contiguous();
  };
  auto none = [&] { return at::empty({0}, fopt); };  // a fresh one per output: outputs must not alias
  if (delta_softplus) softplus_backward_(ddelta, p.delta_pre);
  at::Tensor ddelta_bias = delta_bias ? ddelta.sum(at::IntArrayRef{0, 2}) : none();
  return {du.to(u.scalar_type()),
          ddelta.to(delta.scalar_type()),
          dA_rows.sum(0).narrow(1, 0, n).contiguous(),
          finish_bc(dB_acc, p.B, B),
          finish_bc(dC_acc, p.C, C),
          D ? dD_rows.sum(0) : none(),
          z ? dz.to(z->scalar_type()) : none(),
          ddelta_bias,
          initial_state ? dinit.narrow(2, 0, n).contiguous() : none()};
}

at::Tensor selective_state_update_cpu(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D_opt, const std::optional<at::Tensor>& z_opt,
                                      const std::optional<at::Tensor>& dt_bias_opt, bool dt_softplus) {
  const char* op = "selective_state_update";
  LLMK_CHECK_DIM(op, x, 2);
  const int64_t batch = x.size(0), dim = x.size(1);
  SCAN_CHECK_FLOAT(op, x);
  SCAN_CHECK_FLOAT(op, dt);
  SCAN_CHECK_FLOAT(op, state);
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  LLMK_CHECK_SHAPE(op, dt, batch, dim);
  LLMK_CHECK_DIM(op, A, 2);
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  const int64_t dstate = A.size(1), npad = padded_state(dstate);
  LLMK_CHECK_ARG(A.size(0) == dim && dstate >= 1 && dstate <= kMaxState, op, "A",
                 "must have shape (dim, dstate) with dim = ", dim, " and 1 <= dstate <= ", kMaxState, ", got ", A.sizes());
  LLMK_CHECK_SHAPE(op, state, batch, dim, dstate);
  LLMK_CHECK_CONTIGUOUS(op, state);
  for (const auto& [name, M] : {std::pair<const char*, const at::Tensor*>{"B", &B}, {"C", &C}}) {
    LLMK_CHECK_ARG(is_scan_dtype(M->scalar_type()), op, name, "must be float32, float16 or bfloat16, got ", M->scalar_type());
    LLMK_CHECK_ARG((M->dim() == 2 && M->size(0) == batch && M->size(1) == dstate) ||
                       (M->dim() == 3 && M->size(0) == batch && M->size(1) >= 1 && dim % M->size(1) == 0 &&
                        M->size(2) == dstate),
                   op, name, "must have shape (batch, dstate) or (batch, ngroups, dstate) with dim % ngroups == 0, for batch ",
                   batch, ", dim ", dim, ", dstate ", dstate, "; got ", M->sizes());
  }
  if (D_opt) {
    const at::Tensor& D = *D_opt;
    LLMK_CHECK_SHAPE(op, D, dim);
    LLMK_CHECK_DTYPE(op, D, at::kFloat);
  }
  if (dt_bias_opt) {
    const at::Tensor& dt_bias = *dt_bias_opt;
    LLMK_CHECK_SHAPE(op, dt_bias, dim);
    LLMK_CHECK_DTYPE(op, dt_bias, at::kFloat);
  }
  if (z_opt) {
    const at::Tensor& z = *z_opt;
    SCAN_CHECK_FLOAT(op, z);
    LLMK_CHECK_SHAPE(op, z, batch, dim);
  }
  at::Tensor xf = f32(x), zf = z_opt ? f32(*z_opt) : at::Tensor(), delta = f32(dt);
  const bool fresh_delta = dt_bias_opt.has_value();  // a new tensor: softplus may then work in place
  if (dt_bias_opt) delta = (delta + *dt_bias_opt).contiguous();
  if (dt_softplus) {
    if (fresh_delta) {
      kernels().softplus(delta.data_ptr<float>(), delta.numel());  // one decode row: below any parallel grain
    } else {
      delta = softplus_f32(delta);
    }
  }
  const at::Tensor Af = pad_state(A, npad, true), Df = D_opt ? f32(*D_opt) : at::Tensor();
  const at::Tensor Bp = pad_state(B.dim() == 2 ? B.unsqueeze(1) : B, npad, true);  // (batch, groups, npad)
  const at::Tensor Cp = pad_state(C.dim() == 2 ? C.unsqueeze(1) : C, npad, true);
  const int64_t gB = Bp.size(1), gC = Cp.size(1);
  at::Tensor st = pad_state(state, npad, true);  // state itself when its layout is already the kernels': in place
  at::Tensor out = at::empty({batch, dim}, xf.options());
  const auto fwd_row = kernels().fwd_row;
  // Raw pointers hoisted: a row is a few dozen flops, so per-row Tensor accessors would dominate.
  const float *x_p = xf.const_data_ptr<float>(), *dt_p = delta.const_data_ptr<float>();
  const float *A_p = Af.const_data_ptr<float>(), *B_p = Bp.const_data_ptr<float>(), *C_p = Cp.const_data_ptr<float>();
  float *st_p = st.data_ptr<float>(), *out_p = out.data_ptr<float>();
  at::parallel_for(0, batch * dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / dim, d = r % dim;
      const ScanRow row{1,
                        npad,
                        x_p + r,
                        dt_p + r,
                        nullptr,  // D and z are applied below, over all rows at once
                        A_p + d * npad,
                        B_p + (b * gB + d / (dim / gB)) * npad,
                        C_p + (b * gC + d / (dim / gC)) * npad,
                        0,
                        0,
                        0.0f};
      fwd_row(row, st_p + r * npad, out_p + r);
    }
  });
  if (Df.defined()) out.addcmul_(xf, Df.unsqueeze(0));
  if (zf.defined()) out.mul_(at::silu(zf));
  if (!st.is_same(state)) state.copy_(st.narrow(2, 0, dstate));
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("selective_scan_fwd", &llmkernels::scan_cpu::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &llmkernels::scan_cpu::selective_scan_bwd_cpu);
  m.impl("selective_state_update", &llmkernels::scan_cpu::selective_state_update_cpu);
}
