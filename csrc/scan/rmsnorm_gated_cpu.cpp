// Gated RMSNorm on the CPU (Mamba-2's norm; mamba_ssm's rmsnorm_fn): the host side of cpu/norm_rows.inc.
//
// Rows (tokens) run in parallel; a row's groups go through the kernel's two or three passes in L1. fp32 and bf16
// rows are read and written in place (row stride free, channels contiguous); fp16 / fp64 through fp32 copies. The
// backward recomputes each group's rms instead of saving it, and sums dweight / dbias per chunk of rows (a fixed
// split, so the sums do not depend on the thread count) before adding the chunks.
// It replaces ~12 PyTorch ops (each a pass over memory, several with fresh fp32 temporaries): Mamba2Mixer's norm,
// 1024 tokens x 2048 channels, bf16, forward + backward took ~28 ms of one core that way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "scan/cpu/host_dtypes.h"
#include "scan/cpu/kernel_table.h"
#include "scan/cpu/scan_kernels.h"

namespace llmkernels::scan_cpu {
namespace {

struct NormArgs {
  int64_t rows, H, G;
  at::ScalarType kd;  // the kernels' element type: bf16 or fp32
};

// The checks of both ops (dout: the backward's, or nullptr); the kernels run bf16 in place only when every row
// operand is bf16 (an fp32 z or dout beside bf16 x must not be rounded to bf16 on the way in).
NormArgs check_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& z, double eps, int64_t group_size,
                    const at::Tensor* dout = nullptr) {
  LLMK_CHECK_DIM(op, x, 2);
  LLMK_CHECK_FLOAT_IO(op, "x", x);
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  const int64_t rows = x.size(0), H = x.size(1);
  auto check_operand = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_norm_operand(op, name, t, shape, x);
  };
  check_operand("weight", weight, {H});
  if (bias) check_operand("bias", *bias, {H});
  if (z) check_operand("z", *z, {rows, H});
  if (dout != nullptr) check_operand("dout", *dout, {rows, H});
  LLMK_CHECK_ARG(group_size > 0 && H % group_size == 0, op, "group_size", "must be positive and divide ", H,
                 " (the channels), got ", group_size);
  LLMK_CHECK_ARG(std::isfinite(eps) && eps >= 0, op, "eps", "must be finite and >= 0, got ", eps);
  auto is_bf16 = [](const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; };
  const bool bf16 = is_bf16(x) && (!z || is_bf16(*z)) && (dout == nullptr || is_bf16(*dout));
  return {rows, H, group_size, bf16 ? at::kBFloat16 : at::kFloat};
}

// t as the kernels read it: kd elements, channels contiguous (rows at any stride); else a contiguous copy.
at::Tensor operand(const at::Tensor& t, at::ScalarType kd) {
  if (t.scalar_type() == kd && (t.stride(1) == 1 || t.size(1) <= 1)) return t;
  return t.to(kd).contiguous();
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// Row r0 of t (rows at row_stride(t), elements of esize bytes), as the kernels take it.
const char* row_at(const at::Tensor& t, int64_t r0, int64_t esize) {
  return static_cast<const char*>(t.const_data_ptr()) + r0 * row_stride(t) * esize;
}

// Rows per chunk of parallel work (and of the backward's dweight sums): ~64K elements, at least one row.
int64_t chunk_rows(int64_t H) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(H, 1)); }

at::Tensor rmsnorm_gated_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& z, double eps, int64_t group_size,
                                 bool norm_before_gate) {
  const char* op = "rmsnorm_gated_fwd";
  const NormArgs a = check_norm(op, x, weight, bias, z, eps, group_size);
  const at::Tensor xk = operand(x, a.kd), zk = z ? operand(*z, a.kd) : at::Tensor();
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  at::Tensor out = at::empty({a.rows, a.H}, x.options());
  at::Tensor outk = a.kd == out.scalar_type() ? out : at::empty({a.rows, a.H}, x.options().dtype(a.kd));
  const int64_t esize = outk.element_size(), per = chunk_rows(a.H);
  const Kernels& k = kernels();
  at::parallel_for(0, (a.rows + per - 1) / per, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * a.H);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * per, n = std::min(per, a.rows - r0);
      k.norm_fwd_rows(NormRows{
          n, a.H, a.G, a.kd == at::kBFloat16, row_at(xk, r0, esize), row_stride(xk),
          zk.defined() ? row_at(zk, r0, esize) : nullptr, zk.defined() ? row_stride(zk) : 0, wf.const_data_ptr<float>(),
          bf.defined() ? bf.const_data_ptr<float>() : nullptr, static_cast<float>(eps), norm_before_gate,
          static_cast<char*>(outk.data_ptr()) + r0 * a.H * esize, a.H, scratch.data()});
    }
  });
  if (!outk.is_same(out)) out.copy_(outk);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rmsnorm_gated_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& z, double eps, int64_t group_size, bool norm_before_gate) {
  const char* op = "rmsnorm_gated_bwd";
  const NormArgs a = check_norm(op, x, weight, bias, z, eps, group_size, &dout);
  const at::Tensor xk = operand(x, a.kd), zk = z ? operand(*z, a.kd) : at::Tensor(), gk = operand(dout, a.kd);
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  const at::TensorOptions kopts = x.options().dtype(a.kd);
  at::Tensor dx = at::empty({a.rows, a.H}, x.options());
  at::Tensor dxk = a.kd == dx.scalar_type() ? dx : at::empty({a.rows, a.H}, kopts);
  at::Tensor dz = z ? at::empty({a.rows, a.H}, z->options()) : at::Tensor();
  at::Tensor dzk = z ? (a.kd == dz.scalar_type() ? dz : at::empty({a.rows, a.H}, kopts)) : at::Tensor();
  const int64_t esize = dxk.element_size(), per = chunk_rows(a.H), chunks = (a.rows + per - 1) / per;
  at::Tensor dw_parts = at::zeros({chunks, a.H}, x.options().dtype(at::kFloat));
  at::Tensor db_parts = bias ? at::zeros({chunks, a.H}, x.options().dtype(at::kFloat)) : at::Tensor();
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * a.H);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * per, n = std::min(per, a.rows - r0);
      const NormRows p{n, a.H, a.G, a.kd == at::kBFloat16, row_at(xk, r0, esize), row_stride(xk),
                       zk.defined() ? row_at(zk, r0, esize) : nullptr, zk.defined() ? row_stride(zk) : 0,
                       wf.const_data_ptr<float>(), bf.defined() ? bf.const_data_ptr<float>() : nullptr,
                       static_cast<float>(eps), norm_before_gate, nullptr, 0, scratch.data()};
      k.norm_bwd_rows(p, NormRowsGrad{row_at(gk, r0, esize), row_stride(gk),
                                      static_cast<char*>(dxk.data_ptr()) + r0 * a.H * esize, a.H,
                                      dzk.defined() ? static_cast<char*>(dzk.data_ptr()) + r0 * a.H * esize : nullptr,
                                      a.H, dw_parts.data_ptr<float>() + chunk * a.H,
                                      bias ? db_parts.data_ptr<float>() + chunk * a.H : nullptr});
    }
  });
  if (!dxk.is_same(dx)) dx.copy_(dxk);
  if (z && !dzk.is_same(dz)) dz.copy_(dzk);
  const at::TensorOptions empty_opts = x.options().dtype(at::kFloat);
  return {dx, dw_parts.sum(0).to(weight.scalar_type()),
          bias ? db_parts.sum(0).to(bias->scalar_type()) : at::empty({0}, empty_opts),
          z ? dz : at::empty({0}, empty_opts)};
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("rmsnorm_gated_fwd", &llmkernels::scan_cpu::rmsnorm_gated_fwd_cpu);
  m.impl("rmsnorm_gated_bwd", &llmkernels::scan_cpu::rmsnorm_gated_bwd_cpu);
}
