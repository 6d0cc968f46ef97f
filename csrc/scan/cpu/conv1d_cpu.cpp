// Depthwise causal conv1d on the CPU (Mamba's short convolution), forward, backward and decode step.
//
// Math: out[t] = bias + sum_k w[k] x[t - (width - 1) + k] (x = 0 before t = 0), optional SiLU; arithmetic in fp32,
// the kernels in cpu/conv_rows.inc (one table with the scan's, per instruction set). Two layouts of x:
// - row-major (contiguous (batch, dim, seqlen)): rows run in parallel, vectorised over time; 16-bit rows convert
//   through per-thread one-row buffers (2-core VM, b=4 dim=1536 L=2048 width 4 SiLU: fp32 28.6 -> 15.9 ms, most of
//   it the page faults of the fresh output; bf16 32.1 -> 3.4 ms, where torch's bf16 conv1d + SiLU took 6-25 ms).
// - time-major ((batch, seqlen, dim) memory, channels adjacent: what Mamba layers hold after in_proj): read and
//   written in place in that layout (fp32 / bf16; other dtypes through fp32 copies), vectorised over channels.
//   The layers made contiguous copies first, and the backward was scalar loops over whole converted tensors.
// Packed sequences (seq_idx): each sequence of a row is convolved as a row of its own (segments.h). initial_states
// (the width - 1 inputs before t = 0): the inputs before the first sequence instead of zeros; the backward's
// gradient for them is dinitial_states.
// The decode step (causal_conv1d_update) updates an fp32 state in place (b=16, dim=2048, width 4, fp32: about
// 35 us of one core, the reference about 320 us).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "scan/cpu/host_dtypes.h"
#include "scan/cpu/kernel_table.h"
#include "scan/cpu/scan_kernels.h"
#include "scan/cpu/segments.h"
#include "scan/cpu/state_pool.h"

namespace llmkernels::scan_cpu {
namespace {

constexpr int64_t kMinWidth = 2, kMaxWidth = 4;

#define CONV_CHECK_FLOAT(op, t) LLMK_CHECK_FLOAT_IO(op, #t, t)

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                int64_t x_dims, bool need_contiguous) {
  LLMK_CHECK_DIM(op, x, x_dims);
  CONV_CHECK_FLOAT(op, x);
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  if (need_contiguous) LLMK_CHECK_CONTIGUOUS(op, x);
  LLMK_CHECK_DIM(op, weight, 2);
  LLMK_CHECK_ARG(weight.size(0) == x.size(1) && weight.size(1) >= kMinWidth && weight.size(1) <= kMaxWidth, op,
                 "weight", "must have shape (dim, width) with dim = ", x.size(1), " and width in 2..4, got ",
                 weight.sizes());
  CONV_CHECK_FLOAT(op, weight);
  if (bias_opt) {
    const at::Tensor& bias = *bias_opt;
    LLMK_CHECK_SHAPE(op, bias, x.size(1));
    CONV_CHECK_FLOAT(op, bias);
  }
}

// n elements of a contiguous floating tensor's data from offset, as fp32: in place when fp32, else converted into buf
// (bf16 by the vectorised converter of the kernel table).
const float* read_f32(const at::Tensor& t, int64_t offset, int64_t n, float* buf) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>() + offset;
  if (t.scalar_type() == at::kBFloat16) {
    kernels().bf16_to_f32(reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()) + offset, buf, n);
    return buf;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_f32", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>() + offset;
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  });
  return buf;
}

// The inverse: n fp32 values into t's data at offset, rounded as Tensor::copy_ rounds.
void write_f32(const float* src, at::Tensor& t, int64_t offset, int64_t n) {
  if (t.scalar_type() == at::kBFloat16) {
    kernels().f32_to_bf16(src, reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) + offset, n);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_f32", [&] {
    scalar_t* dst = t.data_ptr<scalar_t>() + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  });
}

// initial_states (batch, dim, width - 1) as fp32, checked against x and weight; undefined when absent.
at::Tensor checked_initial_states(const char* op, const std::optional<at::Tensor>& initial_states,
                                  const std::optional<at::Tensor>& seq_idx, const at::Tensor& x, int64_t W) {
  if (!initial_states) return at::Tensor();
  LLMK_CHECK_ARG(!seq_idx, op, "initial_states", "cannot be combined with seq_idx");
  const at::Tensor& s = *initial_states;
  CONV_CHECK_FLOAT(op, s);
  LLMK_CHECK_ARG(s.device() == x.device(), op, "initial_states", "must be on ", x.device(), ", got ", s.device());
  LLMK_CHECK_ARG(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == x.size(1) && s.size(2) == W - 1, op,
                 "initial_states", "must have shape (batch, dim, width - 1) = (", x.size(0), ", ", x.size(1), ", ",
                 W - 1, "), got ", s.sizes());
  return f32(s);
}

// Time-major: (batch, seqlen, dim) memory seen as (batch, dim, seqlen), channels adjacent (in_proj's output
// transposed, as mamba_ssm and transformers pass it). The outputs keep x's layout by this rule, which the fake
// kernels in ops/causal_conv1d.py repeat; other layouts are made contiguous (row-major) first.
bool time_major(const at::Tensor& x) { return x.size(1) > 1 && x.size(2) > 1 && x.stride(1) == 1 && x.stride(2) != 1; }

at::Tensor empty_layout(const at::Tensor& x, bool tm, at::ScalarType dtype) {
  if (!tm) return at::empty(x.sizes(), x.options().dtype(dtype));
  return at::empty({x.size(0), x.size(2), x.size(1)}, x.options().dtype(dtype)).transpose(1, 2);
}

// The element type the time-major kernels run on: fp32 and bf16 in place, anything else through fp32 copies.
at::ScalarType tm_kernel_dtype(at::ScalarType s) { return s == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// t with channels adjacent in dtype: itself when it already is, else a time-major copy.
at::Tensor time_major_operand(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.stride(1) == 1) return t;
  at::Tensor out = empty_layout(t, true, dtype);
  out.copy_(t);
  return out;
}

// Pointer to element (b, c, t) of a time-major tensor (channel stride 1).
const char* tm_ptr(const at::Tensor& t, int64_t b, int64_t c, int64_t s) {
  return static_cast<const char*>(t.const_data_ptr()) + (b * t.stride(0) + s * t.stride(2) + c) * t.element_size();
}
char* tm_ptr(at::Tensor& t, int64_t b, int64_t c, int64_t s) {
  return static_cast<char*>(t.data_ptr()) + (b * t.stride(0) + s * t.stride(2) + c) * t.element_size();
}

// Channels per work item of the time-major kernels: 4 AVX-512 vectors (a 256-byte piece of each row).
constexpr int64_t kTmChannels = 64;

// What the time-major forward and backward share: x in the kernels' element type, the weights as (width, dim), the
// initial states as (batch, width - 1, dim), and the walk over items of (batch row, kTmChannels channels) in
// parallel, each sequence of the row in turn.
struct TimeMajorConv {
  at::ScalarType kd;
  at::Tensor xk, wt, hist, bias;
  int64_t dim, W, pre;
  bool silu;

  TimeMajorConv(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& bf, const at::Tensor& init, bool silu_,
                bool force_f32 = false)
      : kd(force_f32 ? at::kFloat : tm_kernel_dtype(x.scalar_type())),
        xk(time_major_operand(x, kd)),
        wt(wf.t().contiguous()),
        hist(init.defined() ? init.transpose(1, 2).contiguous() : at::Tensor()),
        bias(bf),
        dim(x.size(1)),
        W(wf.size(1)),
        pre(init.defined() ? wf.size(1) - 1 : 0),
        silu(silu_) {}

  // The kernel's arguments for channels c0 .. c0 + n of batch row b over steps t0 .. t1 (sequence s of the row:
  // the initial states stand before the first one only).
  ConvTimeMajor args(int64_t b, int64_t c0, int64_t n, int64_t s, int64_t t0, int64_t t1) const {
    return ConvTimeMajor{t1 - t0, n, W, kd == at::kBFloat16, tm_ptr(xk, b, c0, t0), xk.stride(2),
                         s == 0 && pre > 0 ? hist.const_data_ptr<float>() + b * pre * dim + c0 : nullptr, dim,
                         wt.const_data_ptr<float>() + c0, dim,
                         bias.defined() ? bias.const_data_ptr<float>() + c0 : nullptr, silu, nullptr, 0};
  }

  // fn(b, c0, n, s, t0, t1) for every item and sequence; tasks of at least ~grain_elems elements.
  template <typename Fn>
  void for_each(const Segments& segs, int64_t batch, int64_t L, int64_t grain_elems, const Fn& fn) const {
    const int64_t blocks = (dim + kTmChannels - 1) / kTmChannels;
    at::parallel_for(0, batch * blocks, std::max<int64_t>(1, grain_elems / (L * kTmChannels)), [&](int64_t begin,
                                                                                                   int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, c0 = item % blocks * kTmChannels, n = std::min(kTmChannels, dim - c0);
        const int64_t* starts = segs.begin(b);
        for (int64_t s = 0; s < segs.count(b); ++s) fn(b, c0, n, s, starts[s], starts[s + 1]);
      }
    });
  }
};

at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 bool silu, const std::optional<at::Tensor>& seq_idx,
                                 const std::optional<at::Tensor>& initial_states) {
  const char* op = "causal_conv1d_fwd";
  check_conv(op, x, weight, bias, 3, /*need_contiguous=*/false);
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(1);
  const Segments segs = find_segments(op, seq_idx, batch, L);
  const at::Tensor init = checked_initial_states(op, initial_states, seq_idx, x, W);
  const int64_t pre = init.defined() ? W - 1 : 0;  // the inputs before t = 0 that the row is extended by
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  const Kernels& k = kernels();
  if (time_major(x)) {
    const TimeMajorConv conv(x, wf, bf, init, silu);
    at::Tensor out = empty_layout(x, true, x.scalar_type());
    at::Tensor outk = conv.kd == x.scalar_type() ? out : empty_layout(x, true, conv.kd);
    conv.for_each(segs, batch, L, 16 << 10, [&](int64_t b, int64_t c0, int64_t n, int64_t s, int64_t t0, int64_t t1) {
      ConvTimeMajor c = conv.args(b, c0, n, s, t0, t1);
      c.out = tm_ptr(outk, b, c0, t0);
      c.ld_out = outk.stride(2);
      k.conv_tm_fwd(c);
    });
    if (!outk.is_same(out)) out.copy_(outk);
    return out;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({batch, dim, L}, x.options());
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const bool direct = out_f32 && pre == 0;  // read x and write out in place
  // Rows of at least ~16K elements a task; 16-bit rows convert through per-thread buffers of one row each.
  at::parallel_for(0, batch * dim, std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(L, 1)), [&](int64_t begin,
                                                                                                       int64_t end) {
    std::vector<float> xbuf(direct ? 0 : pre + L), obuf(direct ? 0 : pre + L);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / dim, d = r % dim;
      const float* w = wf.const_data_ptr<float>() + d * W;
      const float bias_d = bf.defined() ? bf.const_data_ptr<float>()[d] : 0.0f;
      const float* xr;
      if (pre > 0) {
        std::copy_n(init.const_data_ptr<float>() + r * pre, pre, xbuf.data());
        const float* src = read_f32(xc, r * L, L, xbuf.data() + pre);
        if (src != xbuf.data() + pre) std::copy_n(src, L, xbuf.data() + pre);
        xr = xbuf.data();
      } else {
        xr = read_f32(xc, r * L, L, xbuf.data());
      }
      float* o = direct ? out.data_ptr<float>() + r * L : obuf.data();
      const int64_t* starts = segs.begin(b);
      for (int64_t s = 0; s < segs.count(b); ++s) {
        const int64_t t0 = starts[s] == 0 ? 0 : pre + starts[s], t1 = pre + starts[s + 1];  // in the extended row
        k.conv_row(ConvRow{t1 - t0, W, xr + t0, w, bias_d, silu, o + t0});
      }
      if (!direct) write_f32(o + pre, out, r * L, L);
    }
  });
  return out;
}

// Backward, time-major: items of (batch, kTmChannels channels) walk each sequence once (conv_rows.inc).
void conv_bwd_time_major(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& wf, const at::Tensor& bf,
                         bool silu, const Segments& segs, const at::Tensor& init, at::Tensor& dx, at::Tensor& dw_b,
                         at::Tensor& db_b, at::Tensor& dinit_t) {
  // bf16 in place only when dout is bf16 too (an fp32 dout must not be rounded to bf16 on the way in)
  const TimeMajorConv conv(x, wf, bf, init, silu, dout.scalar_type() != at::kBFloat16);
  const int64_t dim = conv.dim, W = conv.W, pre = conv.pre;
  const at::Tensor gk = time_major_operand(dout, conv.kd);
  at::Tensor dxk = conv.kd == dx.scalar_type() ? dx : empty_layout(x, true, conv.kd);
  const Kernels& k = kernels();
  conv.for_each(segs, x.size(0), x.size(2), 8 << 10, [&](int64_t b, int64_t c0, int64_t n, int64_t s, int64_t t0,
                                                         int64_t t1) {
    const bool first = s == 0 && pre > 0;  // the initial states stand before this sequence: their gradient
    k.conv_tm_bwd(conv.args(b, c0, n, s, t0, t1),
                  ConvTimeMajorGrad{tm_ptr(gk, b, c0, t0), gk.stride(2), tm_ptr(dxk, b, c0, t0), dxk.stride(2),
                                    first ? dinit_t.data_ptr<float>() + b * pre * dim + c0 : nullptr, dim,
                                    dw_b.data_ptr<float>() + b * W * dim + c0, dim,
                                    db_b.data_ptr<float>() + b * dim + c0});
  });
  if (!dxk.is_same(dx)) dx.copy_(dxk);
}

// Backward, row-major: each row (each sequence of it) extended by the width - 1 inputs before it (initial states
// or zeros), its gradient computed whole by conv_row_bwd and split back into dx and dinitial_states.
void conv_bwd_rows(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& wf, const at::Tensor& bf, bool silu,
                   const Segments& segs, const at::Tensor& init, at::Tensor& dx, at::Tensor& dw_rows,
                   at::Tensor& db_rows, at::Tensor& dinit) {
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = wf.size(1), P = W - 1;
  const bool pre = init.defined();
  const at::Tensor xc = x.contiguous(), gc = dout.contiguous();
  const Kernels& k = kernels();
  at::parallel_for(0, batch * dim, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin,
                                                                                             int64_t end) {
    std::vector<float> xbuf(L), gbuf(L), dxrow(L), xe(L + P), gpad(L + 2 * P), dxe(L + P);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / dim, d = r % dim;
      const float* xr = read_f32(xc, r * L, L, xbuf.data());
      const float* go = read_f32(gc, r * L, L, gbuf.data());
      const int64_t* starts = segs.begin(b);
      for (int64_t s = 0; s < segs.count(b); ++s) {
        const int64_t t0 = starts[s], n = starts[s + 1] - t0;
        if (s == 0 && pre) {
          std::copy_n(init.const_data_ptr<float>() + r * P, P, xe.data());
        } else {
          std::fill_n(xe.data(), P, 0.0f);
        }
        std::copy_n(xr + t0, n, xe.data() + P);
        k.conv_row_bwd(ConvRowGrad{n, W, xe.data(), wf.const_data_ptr<float>() + d * W,
                                   bf.defined() ? bf.const_data_ptr<float>()[d] : 0.0f, silu, go + t0, gpad.data(),
                                   dxe.data(), dw_rows.data_ptr<float>() + r * W, db_rows.data_ptr<float>() + r});
        std::copy_n(dxe.data() + P, n, dxrow.data() + t0);
        if (s == 0 && pre) std::copy_n(dxe.data(), P, dinit.data_ptr<float>() + r * P);
      }
      write_f32(dxrow.data(), dx, r * L, L);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    bool silu, const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states) {
  const char* op = "causal_conv1d_bwd";
  check_conv(op, x, weight, bias, 3, /*need_contiguous=*/false);
  LLMK_CHECK_SHAPE(op, dout, x.size(0), x.size(1), x.size(2));
  CONV_CHECK_FLOAT(op, dout);
  LLMK_CHECK_DEVICE(op, dout, at::kCPU);
  const int64_t batch = x.size(0), dim = x.size(1), W = weight.size(1);
  const Segments segs = find_segments(op, seq_idx, batch, x.size(2));
  const at::Tensor init = checked_initial_states(op, initial_states, seq_idx, x, W);
  const int64_t pre = init.defined() ? W - 1 : 0;
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  const at::TensorOptions f32_opts = x.options().dtype(at::kFloat);
  const bool tm = time_major(x);
  at::Tensor dx = empty_layout(x, tm, x.scalar_type()), dw, db;
  at::Tensor dinit = pre > 0 ? at::empty({batch, dim, pre}, f32_opts) : at::empty({0}, f32_opts);
  if (tm) {
    at::Tensor dw_b = at::zeros({batch, W, dim}, f32_opts), db_b = at::zeros({batch, dim}, f32_opts);
    at::Tensor dinit_t = pre > 0 ? at::empty({batch, pre, dim}, f32_opts) : at::Tensor();
    conv_bwd_time_major(dout, x, wf, bf, silu, segs, init, dx, dw_b, db_b, dinit_t);
    dw = dw_b.sum(0).t();
    db = db_b.sum(0);
    if (pre > 0) dinit.copy_(dinit_t.transpose(1, 2));
  } else {
    at::Tensor dw_rows = at::zeros({batch, dim, W}, f32_opts), db_rows = at::zeros({batch, dim}, f32_opts);
    conv_bwd_rows(dout, x, wf, bf, silu, segs, init, dx, dw_rows, db_rows, dinit);
    dw = dw_rows.sum(0);
    db = db_rows.sum(0);
  }
  return {dx, dw.to(weight.scalar_type()).contiguous(),
          bias ? db.to(bias->scalar_type()) : at::empty({0}, f32_opts),
          pre > 0 ? dinit.to(initial_states->scalar_type()) : dinit};
}

// The decode step reads and writes each window once: memory bound but for the SiLU. It was whole-tensor passes
// (fp32 copies of x and the state, a clone of the state, a copy back, a conversion of the output) around a loop
// with Tensor accessors and a scalar std::exp per channel: about 45 ns of one core per channel, 4x the reference.
// Now the kernel (conv_rows.inc) updates an fp32 state in place, and other dtypes go through per-chunk copies.
//
// cache_seqlens (batch,) int32 / int64: each row's slot in a circular state, as Python's remainder by state_len
// (-1: no circular state, the state shifts).
std::vector<int64_t> circular_slots(const char* op, const std::optional<at::Tensor>& cache_seqlens, const at::Tensor& x,
                                    int64_t state_len) {
  std::vector<int64_t> slots(x.size(0), -1);
  if (!cache_seqlens.has_value() || !cache_seqlens->defined()) return slots;
  const at::Tensor& t = *cache_seqlens;
  LLMK_CHECK_ARG(t.device() == x.device(), op, "cache_seqlens", "must be on x's device (", x.device(), "), got ",
                 t.device());
  LLMK_CHECK_ARG(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, "cache_seqlens",
                 "must have dtype int32 or int64, got ", t.scalar_type());
  LLMK_CHECK_ARG(t.dim() == 1 && t.size(0) == x.size(0), op, "cache_seqlens", "must have shape (", x.size(0),
                 "), got ", t.sizes());
  const at::Tensor lens = t.to(at::kLong).contiguous();
  const int64_t* p = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < x.size(0); ++b) slots[b] = (p[b] % state_len + state_len) % state_len;
  return slots;
}

// Channels d0 .. d0 + n of state row r, (n, state_len), between a state of any strides and dtype and fp32 buf: a
// strided state (causal_conv1d's and vLLM's channel-last layout, a slice of a pool) is read and written where it
// lies, only the rows a step touches. (One dtype dispatch per item: move_column per channel cost 3.6x on a
// 4096-channel pool.)
template <bool kToBuf>
void move_strided_state(const at::Tensor& st, int64_t r, int64_t d0, int64_t n, float* buf) {
  const int64_t L = st.size(2), sr = st.stride(0), sd = st.stride(1), sl = st.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st.scalar_type(), "conv_state", [&] {
    scalar_t* base = st.data_ptr<scalar_t>() + r * sr + d0 * sd;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        scalar_t& e = base[i * sd + j * sl];
        if constexpr (kToBuf) {
          buf[i * L + j] = static_cast<float>(e);
        } else {
          e = static_cast<scalar_t>(buf[i * L + j]);
        }
      }
    }
  });
}

// Element i of n at t's data offset + i * stride, as fp32 (load), or from fp32 with Tensor::copy_'s rounding (store):
// one token's column of a (batch, dim, seqlen) x or output.
template <bool kLoad>
void move_column(const at::Tensor& t, int64_t offset, int64_t stride, int64_t n, float* buf) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "conv_column", [&] {
    scalar_t* p = t.data_ptr<scalar_t>() + offset;
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (kLoad) {
        buf[i] = static_cast<float>(p[i * stride]);
      } else {
        p[i * stride] = static_cast<scalar_t>(buf[i]);
      }
    }
  });
}

// What a state of dtype `dtype` stores of v: the next token of the same call reads it back rounded, as a separate
// step would.
inline float stored_as(at::ScalarType dtype, float v) {
  if (dtype == at::kBFloat16) return static_cast<float>(static_cast<at::BFloat16>(v));
  if (dtype == at::kHalf) return static_cast<float>(static_cast<at::Half>(v));
  return v;
}

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, bool silu,
                                    const std::optional<at::Tensor>& conv_state_indices,
                                    const std::optional<at::Tensor>& cache_seqlens) {
  const char* op = "causal_conv1d_update";
  // x (batch, dim) or (batch, dim, seqlen): seqlen steps in one call, token t at cache_seqlens + t
  LLMK_CHECK_ARG(x.dim() == 2 || x.dim() == 3, op, "x", "must be (batch, dim) or (batch, dim, seqlen), got ",
                 x.sizes());
  check_conv(op, x, weight, bias, x.dim(), /*need_contiguous=*/true);
  const int64_t batch = x.size(0), dim = x.size(1), W = weight.size(1), T = x.dim() == 3 ? x.size(2) : 1;
  // conv_state_indices: a pool of states (state_pool.h); without, conv_state has x's batch.
  const bool pooled = conv_state_indices.has_value() && conv_state_indices->defined();
  LLMK_CHECK_DIM(op, conv_state, 3);
  const int64_t L = conv_state.size(2);
  LLMK_CHECK_ARG(conv_state.size(0) == (pooled ? conv_state.size(0) : batch) && conv_state.size(1) == dim && L >= W - 1,
                 op, "conv_state", "must have shape (", pooled ? "rows" : std::to_string(batch), ", ", dim,
                 ", state_len >= width - 1 = ", W - 1, "), got ", conv_state.sizes());
  const std::vector<int64_t> slots = circular_slots(op, cache_seqlens, x, L);
  const PoolRows pool = checked_pool_rows(op, "conv_state_indices", conv_state_indices, x, conv_state.size(0));
  const int32_t* state_rows = pool.rows();
  const bool any_skipped = pool.any_skipped;
  CONV_CHECK_FLOAT(op, conv_state);
  LLMK_CHECK_NO_OVERLAP(op, conv_state);
  const at::Tensor wf = f32(weight), bf = bias ? f32(*bias) : at::Tensor();
  // fp32 and contiguous: the kernel updates the state in place; other dtypes go through per-item fp32 copies
  // (vectorised converters when contiguous, element by element through the strides otherwise).
  at::Tensor& st = conv_state;
  const bool contiguous = st.is_contiguous(), in_place = contiguous && st.scalar_type() == at::kFloat;
  at::Tensor out = any_skipped ? at::zeros(x.sizes(), x.options()) : at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const bool out_f32 = out.scalar_type() == at::kFloat && T == 1;  // (else per token through ob)
  const at::ScalarType state_dtype = st.scalar_type();
  const Kernels& k = kernels();
  const float *w_p = wf.const_data_ptr<float>(), *b_p = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  float* st_p = in_place ? st.data_ptr<float>() : nullptr;
  float* out_p = out_f32 ? out.data_ptr<float>() : nullptr;

  // Channels per work item: 512, fewer for long states so that a 16-bit state's fp32 copy fits the stack buffer.
  constexpr int64_t kChannels = 512, kStateFloats = kChannels * kMaxWidth;
  const int64_t cn = std::max<int64_t>(1, std::min(kChannels, kStateFloats / L));
  const int64_t chunks = (dim + cn - 1) / cn, items = batch * chunks;
  auto run_item = [&](int64_t item) {
    float xb[kChannels], ob[kChannels], sb[kStateFloats];
    const int64_t b = item / chunks, d0 = item % chunks * cn, n = std::min(dim, d0 + cn) - d0;
    if (state_rows != nullptr && state_rows[b] < 0) return;  // a pad slot: its output stays 0
    const int64_t srow = state_rows != nullptr ? state_rows[b] : b, r0 = b * dim + d0, s0 = srow * dim + d0;
    // (a state longer than kStateFloats goes one channel at a time through a heap copy)
    std::vector<float> long_state(!in_place && n * L > kStateFloats ? n * L : 0);
    float* buf = long_state.empty() ? sb : long_state.data();
    float* s = in_place ? st_p + s0 * L : buf;
    if (!in_place && contiguous) read_f32(st, s0 * L, n * L, buf);
    if (!contiguous) move_strided_state<true>(st, srow, d0, n, buf);
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = xb;
      if (T == 1) {
        xt = read_f32(x, r0, n, xb);
      } else {
        move_column<true>(x, r0 * T + t, T, n, xb);
      }
      const int64_t slot = slots[b] < 0 ? -1 : (slots[b] + t) % L;
      k.conv_update(ConvUpdate{n, W, xt, w_p + d0 * W, b_p ? b_p + d0 : nullptr, silu, s, L, slot,
                               out_f32 ? out_p + r0 : ob});
      if (T == 1 && !out_f32) write_f32(ob, out, r0, n);
      if (T > 1) move_column<false>(out, r0 * T + t, T, n, ob);
      if (T > 1 && !in_place && state_dtype != at::kFloat) {  // the token as the state holds it, for the next ones
        const int64_t written = slot >= 0 ? slot : L - 1;
        for (int64_t i = 0; i < n; ++i) s[i * L + written] = stored_as(state_dtype, s[i * L + written]);
      }
    }
    if (!in_place && contiguous) write_f32(buf, st, s0 * L, n * L);
    if (!contiguous) move_strided_state<false>(st, srow, d0, n, buf);
  };
  // As selective_state_update: a small step stays on the calling thread; larger ones share out items.
  constexpr int64_t kSerialChannels = 8192;
  const int64_t workers = batch * dim <= kSerialChannels ? 1 : std::min<int64_t>(at::get_num_threads(), items);
  if (workers <= 1) {
    for (int64_t item = 0; item < items; ++item) run_item(item);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t item; (item = next.fetch_add(1)) < items;) run_item(item);
    });
  }
  return out;
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("causal_conv1d_fwd", &llmkernels::scan_cpu::causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_bwd", &llmkernels::scan_cpu::causal_conv1d_bwd_cpu);
  m.impl("causal_conv1d_update", &llmkernels::scan_cpu::causal_conv1d_update_cpu);
}
