// Depthwise causal conv1d on the CPU (Mamba's short convolution), forward, backward and decode step.
//
// Math: out[t] = bias + sum_k w[k] x[t - (width - 1) + k] (x = 0 before t = 0), optional SiLU. Each
// (batch, channel) row is independent; rows run in parallel (at::parallel_for), arithmetic in fp32 on
// fp32 copies of the inputs. Speed: memory bound (width <= 4 multiply-adds per element), the inner
// loops over time vectorise; the conversion passes cost about as much again as the kernel for 16-bit input.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace llmkernels::scan_cpu {
namespace {

constexpr int64_t kMinWidth = 2, kMaxWidth = 4;

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                int64_t x_dims) {
  LLMK_CHECK_DIM(op, x, x_dims);
  LLMK_CHECK_ARG(x.is_floating_point(), op, "x", "must be a floating-point tensor, got ", x.scalar_type());
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  LLMK_CHECK_CONTIGUOUS(op, x);
  LLMK_CHECK_DIM(op, weight, 2);
  LLMK_CHECK_ARG(weight.size(0) == x.size(1) && weight.size(1) >= kMinWidth && weight.size(1) <= kMaxWidth, op,
                 "weight", "must have shape (dim, width) with dim = ", x.size(1), " and width in 2..4, got ",
                 weight.sizes());
  LLMK_CHECK_ARG(weight.is_floating_point(), op, "weight", "must be floating point, got ", weight.scalar_type());
  if (bias_opt) {
    const at::Tensor& bias = *bias_opt;
    LLMK_CHECK_SHAPE(op, bias, x.size(1));
  }
}

// Pre-activation of one row: o[t] = bias + sum_k w[k] x[t - (W - 1) + k].
inline void conv_row(const float* x, const float* w, float b, int64_t W, int64_t L, float* o) {
  for (int64_t t = 0; t < L; ++t) o[t] = b;
  for (int64_t k = 0; k < W; ++k) {
    const int64_t shift = W - 1 - k;  // o[t] += w[k] x[t - shift]
    for (int64_t t = shift; t < L; ++t) o[t] += w[k] * x[t - shift];
  }
}

at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 bool silu) {
  check_conv("causal_conv1d_fwd", x, weight, bias, 3);
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(1);
  const at::Tensor xf = f32(x), wf = f32(weight), bf = bias ? f32(*bias) : at::zeros({dim}, xf.options());
  at::Tensor out = at::empty({batch, dim, L}, xf.options());
  at::parallel_for(0, batch * dim, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t d = r % dim;
      float* o = out.data_ptr<float>() + r * L;
      conv_row(xf.const_data_ptr<float>() + r * L, wf.const_data_ptr<float>() + d * W, bf.const_data_ptr<float>()[d],
               W, L, o);
      if (silu)
        for (int64_t t = 0; t < L; ++t) o[t] *= sigmoid(o[t]);
    }
  });
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     const std::optional<at::Tensor>& bias, bool silu) {
  const char* op = "causal_conv1d_bwd";
  check_conv(op, x, weight, bias, 3);
  LLMK_CHECK_SHAPE(op, dout, x.size(0), x.size(1), x.size(2));
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(1);
  const at::Tensor xf = f32(x), wf = f32(weight), gf = f32(dout);
  const at::Tensor bf = bias ? f32(*bias) : at::zeros({dim}, xf.options());
  at::Tensor dx = at::empty({batch, dim, L}, xf.options());
  at::Tensor dw_rows = at::empty({batch, dim, W}, xf.options()), db_rows = at::empty({batch, dim}, xf.options());
  at::parallel_for(0, batch * dim, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> g(L);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t d = r % dim;
      const float* xr = xf.const_data_ptr<float>() + r * L;
      const float* w = wf.const_data_ptr<float>() + d * W;
      const float* go = gf.const_data_ptr<float>() + r * L;
      if (silu) {  // g = dout * silu'(o), silu'(o) = s (1 + o (1 - s))
        conv_row(xr, w, bf.const_data_ptr<float>()[d], W, L, g.data());
        for (int64_t t = 0; t < L; ++t) {
          const float s = sigmoid(g[t]);
          g[t] = go[t] * s * (1.0f + g[t] * (1.0f - s));
        }
      } else {
        std::copy(go, go + L, g.begin());
      }
      float* dxr = dx.data_ptr<float>() + r * L;  // dx[s] = sum_k w[k] g[s + shift_k]
      for (int64_t s = 0; s < L; ++s) dxr[s] = 0.0f;
      float db = 0.0f;
      for (int64_t t = 0; t < L; ++t) db += g[t];
      for (int64_t k = 0; k < W; ++k) {
        const int64_t shift = W - 1 - k;
        float dw = 0.0f;
        for (int64_t t = shift; t < L; ++t) {
          dxr[t - shift] += w[k] * g[t];
          dw += g[t] * xr[t - shift];
        }
        dw_rows.data_ptr<float>()[r * W + k] = dw;
      }
      db_rows.data_ptr<float>()[r] = db;
    }
  });
  return {dx.to(x.scalar_type()), dw_rows.sum(0).to(weight.scalar_type()),
          bias ? db_rows.sum(0).to(bias->scalar_type()) : at::empty({0}, xf.options())};
}

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, bool silu) {
  const char* op = "causal_conv1d_update";
  check_conv(op, x, weight, bias, 2);
  const int64_t batch = x.size(0), dim = x.size(1), W = weight.size(1);
  LLMK_CHECK_SHAPE(op, conv_state, batch, dim, W);
  LLMK_CHECK_ARG(conv_state.is_floating_point(), op, "conv_state", "must be floating point, got ",
                 conv_state.scalar_type());
  const at::Tensor xf = f32(x), wf = f32(weight), bf = bias ? f32(*bias) : at::zeros({dim}, xf.options());
  at::Tensor st = f32(conv_state);
  if (st.data_ptr() == conv_state.data_ptr()) st = st.clone();  // keep the op's input untouched until copy_
  at::Tensor out = at::empty({batch, dim}, xf.options());
  at::parallel_for(0, batch * dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t d = r % dim;
      float* s = st.data_ptr<float>() + r * W;
      const float* w = wf.const_data_ptr<float>() + d * W;
      for (int64_t k = 0; k + 1 < W; ++k) s[k] = s[k + 1];  // shift left, append the new input
      s[W - 1] = xf.const_data_ptr<float>()[r];
      float o = bf.const_data_ptr<float>()[d];
      for (int64_t k = 0; k < W; ++k) o += w[k] * s[k];
      out.data_ptr<float>()[r] = silu ? o * sigmoid(o) : o;
    }
  });
  conv_state.copy_(st);
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("causal_conv1d_fwd", &llmkernels::scan_cpu::causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_bwd", &llmkernels::scan_cpu::causal_conv1d_bwd_cpu);
  m.impl("causal_conv1d_update", &llmkernels::scan_cpu::causal_conv1d_update_cpu);
}
