// Residual add + LayerNorm / RMSNorm on the CPU (mamba_ssm's / flash_attn's layer_norm_fn and rms_norm_fn, the
// norm between a pre-norm block's mixers): the host side of cpu/add_norm_rows.inc.
//
// Rows (tokens) run in parallel; each row is read once from memory (x, residual), its sum kept in L1 for the
// norm's passes. fp32 and bf16 operands are read and written in place (row stride free, channels contiguous), each
// in its own dtype (Mamba's fp32 residual stream beside bf16 activations); fp16 / fp64 go through fp32 copies. The
// backward recomputes s = x + residual, mean and rstd rather than saving them, and sums dweight / dbias per
// chunk of rows (a fixed split: the sums do not depend on the thread count) before adding the chunks.
// What it replaces: the add, a cast and F.rms_norm / F.layer_norm (or ~6 ops of a hand-written RMSNorm), each a
// pass over memory with fp32 temporaries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "scan/cpu/host_dtypes.h"
#include "scan/cpu/kernel_table.h"
#include "scan/cpu/scan_kernels.h"

namespace llmkernels::scan_cpu {
namespace {

bool in_place_type(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16; }

// t as the kernels read it: fp32 or bf16, channels contiguous (rows at any stride); else a contiguous fp32 copy.
at::Tensor row_operand(const at::Tensor& t) {
  if (in_place_type(t.scalar_type()) && (t.stride(1) == 1 || t.size(1) <= 1)) return t;
  return t.to(at::kFloat).contiguous();
}

// An output of dtype `dtype` the kernels write: itself when fp32 / bf16, else an fp32 buffer copied over after.
at::Tensor kernel_output(const at::Tensor& out) {
  return in_place_type(out.scalar_type()) ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
}

int64_t rows_apart(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }
bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// Rows per chunk of parallel work (and of the backward's dweight sums): ~64K elements, at least one row.
int64_t chunk_rows(int64_t H) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(H, 1)); }

void check_add_norm(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                    const at::Tensor* dy = nullptr, const std::optional<at::Tensor>* dres_out = nullptr) {
  LLMK_CHECK_DIM(op, x, 2);
  LLMK_CHECK_FLOAT_IO(op, "x", x);
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  const int64_t rows = x.size(0), H = x.size(1);
  auto check_operand = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_norm_operand(op, name, t, shape, x);
  };
  if (residual) check_operand("residual", *residual, {rows, H});
  check_operand("weight", weight, {H});
  if (bias) check_operand("bias", *bias, {H});
  if (dy != nullptr) check_operand("dy", *dy, {rows, H});
  if (dres_out != nullptr && *dres_out) check_operand("dresidual_out", **dres_out, {rows, H});
  LLMK_CHECK_ARG(std::isfinite(eps) && eps >= 0, op, "eps", "must be finite and >= 0, got ", eps);
}

// Row r0 of an operand as the kernels read it (rows rows_apart(t) elements apart).
const char* in_row(const at::Tensor& t, int64_t r0) {
  return static_cast<const char*>(t.const_data_ptr()) + r0 * rows_apart(t) * t.element_size();
}

// The kernels' description of the rows [r0, r0 + n) of the (already converted) operands.
AddNormRows rows_of(const at::Tensor& xk, const at::Tensor& rk, const at::Tensor& wf, const at::Tensor& bf, double eps,
                    bool rms, int64_t r0, int64_t n, float* scratch) {
  return AddNormRows{n, xk.size(1), in_row(xk, r0), rows_apart(xk), is_bf16(xk),
                     rk.defined() ? in_row(rk, r0) : nullptr, rk.defined() ? rows_apart(rk) : 0,
                     rk.defined() && is_bf16(rk), wf.const_data_ptr<float>(),
                     bf.defined() ? bf.const_data_ptr<float>() : nullptr, static_cast<float>(eps), rms, nullptr, 0,
                     nullptr, 0, false, scratch};
}

// Row r0 of a contiguous (rows, H) kernel output.
void* out_row(const at::Tensor& t, int64_t r0) {
  return static_cast<char*>(t.data_ptr()) + r0 * t.size(1) * t.element_size();
}

std::tuple<at::Tensor, at::Tensor> add_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                    double eps, bool is_rms_norm,
                                                    std::optional<at::ScalarType> residual_out_dtype) {
  const char* op = "add_norm_fwd";
  check_add_norm(op, x, residual, weight, bias, eps);
  if (residual_out_dtype) {
    LLMK_CHECK_ARG(is_float_io(*residual_out_dtype), op, "residual_out_dtype",
                   "must be float32, float16, bfloat16 or float64, got ", *residual_out_dtype);
  }
  const int64_t rows = x.size(0), H = x.size(1);
  const at::Tensor xk = row_operand(x), rk = residual ? row_operand(*residual) : at::Tensor();
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  at::Tensor y = at::empty({rows, H}, x.options());
  // y in the kernels' type follows xk's (fp32 for an fp16 / fp64 x, converted after)
  at::Tensor yk = y.scalar_type() == xk.scalar_type() ? y : at::empty({rows, H}, xk.options());
  at::Tensor res_out = residual_out_dtype ? at::empty({rows, H}, x.options().dtype(*residual_out_dtype))
                                          : at::empty({0}, x.options());
  at::Tensor rok = residual_out_dtype ? kernel_output(res_out) : at::Tensor();
  const int64_t per = chunk_rows(H);
  const Kernels& k = kernels();
  at::parallel_for(0, (rows + per - 1) / per, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * H);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * per, n = std::min(per, rows - r0);
      AddNormRows p = rows_of(xk, rk, wf, bf, eps, is_rms_norm, r0, n, scratch.data());
      p.y = out_row(yk, r0);
      p.ld_y = H;
      if (rok.defined()) {
        p.res_out = out_row(rok, r0);
        p.ld_res_out = H;
        p.res_out_bf16 = is_bf16(rok);
      }
      k.add_norm_fwd_rows(p);
    }
  });
  if (!yk.is_same(y)) y.copy_(yk);
  if (rok.defined() && !rok.is_same(res_out)) res_out.copy_(rok);
  return {y, res_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dresidual_out, const at::Tensor& x,
    const std::optional<at::Tensor>& residual, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps, bool is_rms_norm) {
  const char* op = "add_norm_bwd";
  check_add_norm(op, x, residual, weight, bias, eps, &dy, &dresidual_out);
  const int64_t rows = x.size(0), H = x.size(1);
  const at::Tensor xk = row_operand(x), rk = residual ? row_operand(*residual) : at::Tensor();
  const at::Tensor dyk = row_operand(dy), drok = dresidual_out ? row_operand(*dresidual_out) : at::Tensor();
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  at::Tensor dx = at::empty({rows, H}, x.options());
  at::Tensor dxk = dx.scalar_type() == xk.scalar_type() ? dx : at::empty({rows, H}, xk.options());
  at::Tensor dres = residual ? at::empty({rows, H}, residual->options()) : at::Tensor();
  at::Tensor dresk = residual ? (dres.scalar_type() == rk.scalar_type() ? dres : at::empty({rows, H}, rk.options()))
                              : at::Tensor();
  const int64_t per = chunk_rows(H), chunks = (rows + per - 1) / per;
  at::Tensor dw_parts = at::zeros({chunks, H}, x.options().dtype(at::kFloat));
  at::Tensor db_parts = bias ? at::zeros({chunks, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * H);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * per, n = std::min(per, rows - r0);
      const AddNormRows p = rows_of(xk, rk, wf, bf, eps, is_rms_norm, r0, n, scratch.data());
      const AddNormRowsGrad q{in_row(dyk, r0), rows_apart(dyk), is_bf16(dyk),
                              drok.defined() ? in_row(drok, r0) : nullptr, drok.defined() ? rows_apart(drok) : 0,
                              drok.defined() && is_bf16(drok), out_row(dxk, r0), H,
                              dresk.defined() ? out_row(dresk, r0) : nullptr, H,
                              dw_parts.data_ptr<float>() + chunk * H,
                              bias ? db_parts.data_ptr<float>() + chunk * H : nullptr};
      k.add_norm_bwd_rows(p, q);
    }
  });
  if (!dxk.is_same(dx)) dx.copy_(dxk);
  if (residual && !dresk.is_same(dres)) dres.copy_(dresk);
  const at::TensorOptions empty_opts = x.options().dtype(at::kFloat);
  return {dx, residual ? dres : at::empty({0}, empty_opts), dw_parts.sum(0).to(weight.scalar_type()),
          bias ? db_parts.sum(0).to(bias->scalar_type()) : at::empty({0}, empty_opts)};
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("add_norm_fwd", &llmkernels::scan_cpu::add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &llmkernels::scan_cpu::add_norm_bwd_cpu);
}
