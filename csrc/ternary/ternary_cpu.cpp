// Host side of the ternary linear ops on CPU: argument checks, activation quantisation (one pass per token
// row into a zero-padded int8 buffer), the integer / fp32 matmuls of cpu/ternary_cpu_kernels.cpp, and the
// fp32 epilogue. Semantics: llmkernels/reference/ternary.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_amx.h"
#include "common/cpu_parallel.h"
#include "ternary/ternary_checks.h"
#include "ternary/cpu/ternary_cpu_kernels.h"

namespace llmkernels {
namespace {

using namespace ternary_cpu;

constexpr int64_t kBlasMinTokens = 32;  // weight-only: from here unpacking W for a BLAS GEMM wins
// weight-only, bf16 x: from here the vdpbf16ps GEMM (which unpacks the weights once) beats the fused GEMV on
// fp32 x (1 core of Zen 4, 4 tokens: 0.66 vs 1.35 ms at 4096 x 4096, 0.64 vs 0.68 at 6912 x 2560, 0.24 vs 0.25
// at 2560 x 2560; 8 tokens 1.5-3x; below 4 tokens about even)
constexpr int64_t kBf16GemmMinTokens = 4;
constexpr int64_t kAmxMinTokens = 64;  // weight-only bf16 on AMX CPUs: from here torch's AMX GEMM on unpacked panels
// weight-only bf16 with AMX tiles of our own: tokens [8, 512] on those (every strip of weights reads all the bf16
// activations again: at 2048 tokens 0.46-0.88x bf16 F.linear), torch's GEMM on unpacked panels above
constexpr int64_t kAmxTileMinTokens = 8, kAmxTileMaxTokens = 512;

constexpr int64_t kPanelBytes = 2 << 20;  // weight-only prefill: fp32 weights unpacked per GEMM (cache-sized)

// act_bits=8 on AMX-INT8 CPUs: from here the tile GEMM, which unpacks each strip of weights once for all tokens
// (4096 x 4096, 2 threads: 0.37 ms at 2 to 8 tokens, where the VNNI kernels take 0.14 / 0.21 / 0.40 ms at 2 / 4 /
// 8; 0.38 against 0.48 at 12).
constexpr int64_t kAmxInt8MinTokens = 8;

bool amx_int8(int64_t m) { return m >= kAmxInt8MinTokens && ::llmkernels::use_amx_int8_tiles(); }

// x W_t^T on AMX tiles (x: one or more planes of m rows of `words` 32-bit words, zero-padded to k_pad, summed),
// into `out` (cpu/ternary_cpu_kernels.h TileOut).
void amx_gemm(AmxKind kind, const std::vector<const void*>& x_planes, int64_t m, int64_t words, const uint8_t* w,
              int64_t N, int64_t k_pad, const TileOut& out) {
  const int planes = static_cast<int>(x_planes.size());
  // Strips of output features: every strip reads all the activations once, so many tokens want wide strips
  // (up to 1 MB of unpacked weights, L2); a few tokens want narrow ones, whose unpacked weights stay nearer
  // (measured with int8 at 4096 x 4096: 64 features best to 128 tokens, 256 from 512).
  const int64_t row_bytes = kind == AmxKind::kInt8 ? k_pad : 2 * k_pad;
  const int64_t widest = std::clamp<int64_t>((1 << 20) / row_bytes / 32 * 32, 32, 256);
  const int64_t features = m <= 256 ? std::min<int64_t>(64, widest) : widest;
  const int64_t strips = (N + features - 1) / features;
  // (64-byte aligned, as ATen allocates: tile rows that straddle cache lines cost two loads each)
  at::Tensor xt_tensor = at::zeros({planes * words * ((m + 31) / 32 * 32)}, at::kInt);
  uint32_t* xt = reinterpret_cast<uint32_t*>(xt_tensor.data_ptr<int32_t>());
  activations_as_amx_b(x_planes.data(), planes, m, words, xt);
  const double macs = static_cast<double>(m) * static_cast<double>(N) * static_cast<double>(k_pad);
  at::parallel_for(0, strips, parallel_grain(strips, macs, 1 << 22), [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({amx_strip_scratch_bytes(kind, features, k_pad)}, at::kByte);  // (64-aligned)
    for (int64_t s = begin; s < end; ++s) {
      amx_strip(kind, xt, planes, m, w, N, k_pad, s * features, features, scratch.data_ptr<uint8_t>(), out);
    }
  });
}

// acc (m, N) = x_q W_t^T in int32, exactly (x_q (m, k_pad) zero-padded, xsum its row sums).
void int8_gemm(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w, int64_t N, int64_t k_pad,
               int32_t* acc) {
  if (amx_int8(m)) {
    return amx_gemm(AmxKind::kInt8, {x_q}, m, k_pad / 4, w, N, k_pad, TileOut{acc, nullptr, 0, nullptr, 0.f, nullptr});
  }
  matmul_int8(x_q, xsum, m, w, N, k_pad, acc);
}

// x: (m, K) contiguous -> x_q (m, k_pad) zero-padded, s (m,) fp32, xsum (m,) int32.
void quantize_rows(const at::Tensor& x, int64_t k_pad, at::Tensor& x_q, at::Tensor& s, at::Tensor& xsum) {
  const int64_t m = x.size(0), K = x.size(1);
  x_q = at::empty({m, k_pad}, x.options().dtype(at::kChar));
  s = at::empty({m}, x.options().dtype(at::kFloat));
  xsum = at::empty({m}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternary_quantize_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int8_t* qp = x_q.data_ptr<int8_t>();
    float* sp = s.data_ptr<float>();
    int32_t* sum = xsum.data_ptr<int32_t>();
    // rows of at least ~64K elements per task: threads only where the pass is long enough to pay for them
    at::parallel_for(0, m, std::max<int64_t>(1, (64 << 10) / k_pad), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) sp[i] = quantize_row(xp + i * K, K, k_pad, qp + i * k_pad, sum + i);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "ternary_quantize_activation";
  LLMK_CHECK_DEVICE(op, x_in, at::kCPU);
  const auto st = x_in.scalar_type();  // (not isFloatingType: that also admits the float8 types)
  LLMK_CHECK_ARG(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, op, "x",
                 "must be float16, bfloat16 or float32, got ", st);
  LLMK_CHECK_ARG(x_in.dim() >= 1 && x_in.size(-1) > 0, op, "x", "must have a non-empty last dimension, got ",
                 x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  at::Tensor x_q, s, xsum;
  quantize_rows(x.view({-1, K}), K, x_q, s, xsum);
  return {x_q.view(x.sizes()), s.view(x.sizes().slice(0, x.dim() - 1))};
}

at::Tensor matmul_int8_cpu(const at::Tensor& x_q, const at::Tensor& w_packed, int64_t in_features) {
  constexpr const char* op = "ternary_matmul_int8";
  LLMK_CHECK_DEVICE(op, x_q, at::kCPU);
  LLMK_CHECK_DTYPE(op, x_q, at::kChar);
  LLMK_CHECK_DIM(op, x_q, 2);
  LLMK_CHECK_ARG(x_q.size(1) == in_features, op, "x_q", "must have in_features = ", in_features,
                 " columns, got ", x_q.sizes());
  const int64_t k_pad = ternary::check_packed_weight(op, w_packed, x_q, in_features);
  const int64_t m = x_q.size(0), N = w_packed.size(0);
  // the kernels read whole 256-weight blocks: give them a zero-padded copy unless x_q already is one
  at::Tensor xp = x_q.contiguous();
  if (k_pad != in_features) {
    xp = at::constant_pad_nd(xp, {0, k_pad - in_features}, 0);
  }
  const at::Tensor xsum = xp.sum(1, /*keepdim=*/false, at::kInt);
  at::Tensor acc = at::empty({m, N}, x_q.options().dtype(at::kInt));
  if (m > 0 && N > 0) {
    int8_gemm(xp.data_ptr<int8_t>(), xsum.data_ptr<int32_t>(), m, w_packed.data_ptr<uint8_t>(), N, k_pad,
              acc.data_ptr<int32_t>());
  }
  return acc;
}

at::Tensor linear_a8_cpu(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "ternary_linear_a8";
  LLMK_CHECK_DEVICE(op, x_in, at::kCPU);
  ternary::check_linear_args(op, x_in, w_packed, w_scale, bias, in_features);
  const int64_t k_pad = ternary::padded_in_features(in_features);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), N = w_packed.size(0);
  at::Tensor out = at::empty({m, N}, x.options());
  if (m == 0 || N == 0) return out;
  at::Tensor x_q, s, xsum;
  quantize_rows(x, k_pad, x_q, s, xsum);
  const float gamma = w_scale.item<float>();
  if (amx_int8(m)) {  // the epilogue fused into the tile GEMM: no int32 (m, N) pass through memory
    const at::Tensor row_scale = s.mul(gamma).div_(127.0f);  // (s * gamma) / 127 per token, as below
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const int dtype = x.scalar_type() == at::kFloat ? 0 : x.scalar_type() == at::kBFloat16 ? 1 : 2;
    amx_gemm(AmxKind::kInt8, {x_q.data_ptr<int8_t>()}, m, k_pad / 4, w_packed.data_ptr<uint8_t>(), N, k_pad,
             TileOut{nullptr, out.data_ptr(), dtype, row_scale.data_ptr<float>(), 0.f,
                     b.defined() ? b.data_ptr<float>() : nullptr});
    return out;
  }
  at::Tensor acc = at::empty({m, N}, x.options().dtype(at::kInt));
  int8_gemm(x_q.data_ptr<int8_t>(), xsum.data_ptr<int32_t>(), m, w_packed.data_ptr<uint8_t>(), N, k_pad,
            acc.data_ptr<int32_t>());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternary_linear_a8_epilogue", [&] {
    const int32_t* ap = acc.data_ptr<int32_t>();
    const float* sp = s.data_ptr<float>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, std::max<int64_t>(1, (64 << 10) / N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float row_scale = (sp[i] * gamma) / 127.0f;  // same order as the reference
        for (int64_t n = 0; n < N; ++n) {
          float y = static_cast<float>(ap[i * N + n]) * row_scale;
          if (bp != nullptr) y += static_cast<float>(bp[n]);
          op_[i * N + n] = static_cast<scalar_t>(y);
        }
      }
    });
  });
  return out;
}

at::Tensor linear_w2_cpu(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "ternary_linear_w2";
  LLMK_CHECK_DEVICE(op, x_in, at::kCPU);
  ternary::check_linear_args(op, x_in, w_packed, w_scale, bias, in_features);
  const int64_t k_pad = ternary::padded_in_features(in_features);
  const int64_t m = x_in.size(0), N = w_packed.size(0);
  at::Tensor out = at::empty({m, N}, x_in.options());
  if (m == 0 || N == 0) return out;
  const at::Tensor scale = w_scale.to(at::kFloat);
  if (m >= kAmxTileMinTokens && m <= kAmxTileMaxTokens && ::llmkernels::use_amx_tiles()) {
    // On our bf16 tiles: weights unpacked straight into the A tiles' bf16 rows, x (zero-padded to whole blocks)
    // laid out once as B, gamma and the bias applied as the outputs leave the tiles. fp32 / fp16 x as 3 / 2 bf16
    // planes that sum to it exactly (bf16 of x, then of the remainders).
    const at::Tensor xp =
        k_pad == in_features ? x_in : at::constant_pad_nd(x_in, {0, k_pad - in_features}, 0);  // (no copy if whole)
    std::vector<at::Tensor> planes;
    at::Tensor row_scale;  // fp32 / fp16: gamma 2^e per token, undoing the scaling below
    if (x_in.scalar_type() == at::kBFloat16) {
      planes.push_back(xp.contiguous());
    } else {
      // Each token scaled by 2^-e, e its largest |x|'s exponent (exact): the lower planes then stay bf16 normals
      // (the tiles read bf16 subnormals as zero: rows of |x| < ~1e-34 lost their low bits) and bf16(x) finite
      // (above 3.39e38 it was inf, the remainder NaN). e clamped to [-120, 120] keeps 2^e normal.
      at::Tensor rest = xp.to(at::kFloat);
      const at::Tensor e = std::get<1>(at::frexp(rest.abs().amax(1, /*keepdim=*/true))).clamp(-120, 120);
      auto pow2 = [](const at::Tensor& k) { return (k.to(at::kInt) + 127).bitwise_left_shift(23).view(at::kFloat); };
      rest = rest * pow2(-e);
      row_scale = (pow2(e) * scale.item<float>()).reshape({m}).contiguous();
      const int count = x_in.scalar_type() == at::kFloat ? 3 : 2;
      for (int i = 0; i < count; ++i) {
        planes.push_back(rest.to(at::kBFloat16).contiguous());
        // Exact in fp32; an infinite x leaves inf - inf = NaN there, which the first plane's inf already stands for
        // (a NaN in a lower plane would turn the row's every output NaN, where the reference gives +-inf).
        if (i + 1 < count) rest = (rest - planes.back().to(at::kFloat)).nan_to_num_(0.0);
      }
    }
    std::vector<const void*> plane_ptrs;
    for (const at::Tensor& t : planes) plane_ptrs.push_back(t.data_ptr());
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const int dtype = x_in.scalar_type() == at::kFloat ? 0 : x_in.scalar_type() == at::kBFloat16 ? 1 : 2;
    amx_gemm(AmxKind::kBf16, plane_ptrs, m, k_pad / 2, w_packed.data_ptr<uint8_t>(), N, k_pad,
             TileOut{nullptr, out.data_ptr(), dtype, row_scale.defined() ? row_scale.data_ptr<float>() : nullptr,
                     scale.item<float>(), b.defined() ? b.data_ptr<float>() : nullptr});
    return out;
  }
  if (x_in.scalar_type() == at::kBFloat16 && m >= kAmxMinTokens && ::llmkernels::use_amx_bf16()) {
    // bf16 prefill where torch's bf16 GEMM runs on AMX tiles: that GEMM per panel of weights unpacked (exactly)
    // into bf16; it sums in fp32 and rounds once, as the other paths do. (The vdpbf16ps kernel below ran at a
    // tenth of it there.)
    const at::Tensor xb = x_in.contiguous();
    // Wider panels than the fp32 path's: oneDNN's AMX GEMM pays per call and per narrow output.
    const int64_t panel = std::min<int64_t>(N, std::max<int64_t>(64, 4 * kPanelBytes / (k_pad * 2)));
    at::Tensor w16 = at::empty({panel, k_pad}, xb.options());
    const at::Scalar gamma = scale.item();
    const at::Tensor b = bias.has_value() ? bias->to(at::kBFloat16) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += panel) {
      const int64_t rows = std::min(panel, N - n0);
      unpack_bf16(w_packed.data_ptr<uint8_t>() + n0 * (k_pad / 4), rows, k_pad,
                  reinterpret_cast<uint16_t*>(w16.data_ptr<at::BFloat16>()));
      const at::Tensor w16_rows = w16.narrow(0, 0, rows);
      at::Tensor y_panel = out.narrow(1, n0, rows);
      const at::Tensor base = b.defined() ? b.narrow(0, n0, rows) : y_panel;
      at::addmm_out(y_panel, base, xb, w16_rows.narrow(1, 0, in_features).t(), /*beta=*/b.defined() ? 1 : 0,
                    /*alpha=*/gamma);
    }
    return out;
  }
  if (x_in.scalar_type() == at::kBFloat16 && m >= kBf16GemmMinTokens && bf16_linear_w2_available()) {
    // bf16 x times ternary weights: exact products, so bf16 dot products with fp32 sums are the fp32 GEMM
    const at::Tensor xb = in_features % 2 == 0 ? x_in.contiguous() : at::constant_pad_nd(x_in, {0, 1}, 0);
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bias_f32 = b.defined() ? b.data_ptr<float>() : nullptr;
    linear_w2_bf16(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), m, xb.size(1),
                   w_packed.data_ptr<uint8_t>(), N, k_pad, scale.item<float>(), bias_f32,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  if (m >= kBlasMinTokens) {
    // prefill: a BLAS GEMM per panel of output features, on weights unpacked (exactly) into one panel-sized
    // fp32 buffer that stays in cache between its unpacking and the GEMM that reads it. Unpacking the whole
    // matrix instead costs a fresh (N, in_features) fp32 allocation per call, whose page faults alone took
    // longer than a 128-token GEMM.
    const at::Tensor xf = x_in.to(at::kFloat).contiguous();
    at::Tensor y = x_in.scalar_type() == at::kFloat ? out : at::empty({m, N}, xf.options());
    const int64_t panel = std::min<int64_t>(N, std::max<int64_t>(16, kPanelBytes / (k_pad * 4)));
    at::Tensor w_panel = at::empty({panel, k_pad}, xf.options());
    const at::Scalar gamma = scale.item();
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += panel) {
      const int64_t rows = std::min(panel, N - n0);
      unpack_f32(w_packed.data_ptr<uint8_t>() + n0 * (k_pad / 4), rows, k_pad, w_panel.data_ptr<float>());
      const at::Tensor wt = w_panel.narrow(0, 0, rows).narrow(1, 0, in_features).t();
      at::Tensor y_panel = y.narrow(1, n0, rows);
      // gamma (x W^T) (+ bias); beta = 0 ignores y_panel's (uninitialised) contents
      const at::Tensor base = b.defined() ? b.narrow(0, n0, rows) : y_panel;
      at::addmm_out(y_panel, base, xf, wt, /*beta=*/b.defined() ? 1 : 0, /*alpha=*/gamma);
    }
    if (!y.is_same(out)) out.copy_(y);
    return out;
  }
  // decode: fp32 x zero-padded to whole blocks, weights unpacked a few rows at a time
  const at::Tensor xf = at::constant_pad_nd(x_in.to(at::kFloat), {0, k_pad - in_features}, 0).contiguous();
  at::Tensor y = at::empty({m, N}, x_in.options().dtype(at::kFloat));
  matmul_f32(xf.data_ptr<float>(), m, w_packed.data_ptr<uint8_t>(), N, k_pad, y.data_ptr<float>());
  y.mul_(scale);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  out.copy_(y);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("ternary_quantize_activation", &quantize_activation_cpu);
  m.impl("ternary_matmul_int8", &matmul_int8_cpu);
  m.impl("ternary_linear_a8", &linear_a8_cpu);
  m.impl("ternary_linear_w2", &linear_w2_cpu);
}

}  // namespace llmkernels
