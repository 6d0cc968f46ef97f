// Per-row selective-scan kernels for the CPU, compiled once per instruction set (scan_isa_*.cpp) and
// chosen at run time. This header is plain C++ (no torch): the ISA files compile it under
// `#pragma GCC target`, and torch's inline functions must never be compiled that way (the linker could
// then pick an AVX-512 copy of a torch function for an AVX2-only machine).
//
// A "row" is one (batch, channel) pair: its inputs over time and its state vector. The host code
// (scan_cpu.cpp) converts inputs to fp32, applies delta_bias / softplus, and packs A, B, C with dstate
// padded to a multiple of 16 with zeros (A = 0, B = 0, C = 0 lanes keep a zero state that adds nothing).
#pragma once

#include <cstdint>

namespace llmkernels::scan_cpu {

constexpr int kStatePad = 16;    // dstate is padded to a multiple of this (the AVX-512 width)
constexpr int kMaxState = 256;   // largest dstate supported
// Backward: a state checkpoint every kChunk steps; a chunk's B, C, dB, dC and states (5 x 16 x 512 bytes at dstate
// 128) stay in L1 while the rows of a block pass over it. Blocks of up to kBwdRows rows, fewer where the host's
// per-row scratch (checkpoints, L x npad / kChunk floats, plus dy and its row tiles) would pass kBwdScratchFloats;
// never fewer than one, so one very long row takes what it needs (~(9 + npad / kChunk) x L floats a thread).
// kChunk 8 / 32 and blocks of 8 / 32 rows measured within 10% of these (dstate 128, 1536 rows of 1024 steps).
constexpr int64_t kChunk = 16;
constexpr int64_t kBwdRows = 16;
constexpr int64_t kBwdScratchFloats = int64_t{8} << 20;  // 32 MB a thread

inline int64_t padded_state(int64_t dstate) { return (dstate + kStatePad - 1) / kStatePad * kStatePad; }

// Scratch floats bwd_rows needs for nrows rows of length L with padded dstate npad.
inline int64_t bwd_scratch_floats(int64_t nrows, int64_t L, int64_t npad) {
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  return nrows * (L + (chunks + 1) * npad + npad) + (kChunk + 1) * npad + kChunk * npad;
}

struct ScanRow {
  int64_t L;
  int64_t npad;
  const float* u;      // (L,)
  const float* delta;  // (L,) after delta_bias and softplus
  const float* z;      // (L,) or nullptr
  const float* A;      // (npad,)
  const float* B;      // B_t at B + t * b_stride: (npad,) each
  const float* C;
  int64_t b_stride;  // 0 for constant B, npad for per-token B
  int64_t c_stride;
  float D;  // 0 when absent
  // A[0] == A[n] for every n < dstate (Mamba-2's per-head A, flattened): exp(delta_t A) is one number per step,
  // taken W steps at a time, instead of one per state entry; the padding lanes meet a zero state either way.
  bool a_const = false;
};

struct ScanRowGrad {
  const float* dout;   // (L,)
  const float* dlast;  // (npad,) gradient of the last state, or nullptr
  float* du;           // (L,) written
  float* ddelta;       // (L,) written: gradient w.r.t. delta after softplus
  float* dz;           // (L,) written when z is given
  float* dA;           // (npad,) accumulated
  float* dB;           // accumulated at dB + t * b_stride (same strides as B)
  float* dC;           // accumulated at dC + t * c_stride
  float* dD;           // (1,) accumulated
  float* dinit;        // (npad,) written: gradient of the initial state
};

// One decode step (selective_state_update) of n consecutive channels of one batch element, all in one B/C
// group. Per-channel vectors are (n,) fp32; state and A are (n, npad), zero padded; the state is updated in place.
struct UpdateRows {
  int64_t n;
  int64_t npad;
  const float* x;
  const float* dt;       // before dt_bias and softplus
  const float* dt_bias;  // or nullptr
  bool softplus;
  const float* z;  // or nullptr
  const float* D;  // or nullptr
  const float* A;  // (n, npad), or (n,) when a_per_channel
  bool a_per_channel;  // one A per channel for all its state entries (Mamba-2's per-head decay): one exp per channel
  const float* B;  // (npad,)
  const float* C;  // (npad,)
  float* state;
  float* out;  // (n,) fp32
};

// One causal conv1d decode step (conv1d_cpu.cpp) of n channels: each channel's window of the last `width` inputs
// shifts left by one and takes x as its newest; out = bias + weight . window, through SiLU when asked.
struct ConvUpdate {
  int64_t n;
  int64_t width;  // 2..4
  const float* x;
  const float* weight;  // (n, width)
  const float* bias;    // or nullptr
  bool silu;
  float* state;       // (n, state_len), updated in place
  int64_t state_len;  // >= width - 1: the last state_len inputs, oldest first
  int64_t slot;       // circular state (cache_seqlens): x's slot in 0..state_len-1; -1: the state shifts left
  float* out;         // (n,)
};

// Causal conv1d forward of one (batch, channel) row (conv1d_cpu.cpp): out[t] = bias + sum_k weight[k]
// x[t - (width - 1) + k] (x = 0 before the row), through SiLU when asked.
struct ConvRow {
  int64_t L;
  int64_t width;  // 2..4
  const float* x;       // (L,)
  const float* weight;  // (width,)
  float bias;
  bool silu;
  float* out;  // (L,)
};
// Backward of one row-major row (conv1d_cpu.cpp). xe (L + width - 1): the row after the width - 1 inputs before it
// (zeros, initial states or nothing of an earlier sequence), so out[t] = bias + sum_k weight[k] xe[t + k].
struct ConvRowGrad {
  int64_t L;
  int64_t width;  // 2..4
  const float* xe;
  const float* weight;  // (width,)
  float bias;
  bool silu;
  const float* dout;  // (L,)
  float* gpad;        // scratch, L + 2 (width - 1) floats
  float* dxe;         // (L + width - 1,) written: the gradient of xe
  float* dw;          // (width,) accumulated
  float* db;          // (1,) accumulated
};

// Causal conv1d over time-major data (conv1d_cpu.cpp): n channels of one batch row, element (t, c) at
// x + t * ld_x + c, fp32 or bf16 (as its bits). hist: the width - 1 inputs before t = 0, oldest first, fp32 at
// hist + j * ld_hist + c, or nullptr for zeros. weight (width, n) fp32 at weight + k * ld_w + c.
struct ConvTimeMajor {
  int64_t L;
  int64_t n;
  int64_t width;  // 2..4
  bool bf16;      // x, out, dout and dx hold bf16; else fp32
  const void* x;
  int64_t ld_x;
  const float* hist;
  int64_t ld_hist;
  const float* weight;
  int64_t ld_w;
  const float* bias;  // (n,) or nullptr
  bool silu;
  void* out;  // forward: written at out + t * ld_out + c
  int64_t ld_out;
};

struct ConvTimeMajorGrad {
  const void* dout;  // x's element type, at dout + t * ld_dout + c
  int64_t ld_dout;
  void* dx;  // written, x's element type
  int64_t ld_dx;
  float* dhist;  // written: the gradient of hist (width - 1 rows), or nullptr to drop it
  int64_t ld_dhist;
  float* dw;  // (width, n) at dw + k * ld_dw + c, accumulated
  int64_t ld_dw;
  float* db;  // (n,) accumulated
};

// Gated RMSNorm of `rows` rows of H channels in groups of G (rmsnorm_gated_cpu.cpp, norm_rows.inc): x, z, out
// fp32 or bf16 (as its bits), row i at x + i * ld_x (channels contiguous); weight, bias (H,) fp32; z or nullptr.
struct NormRows {
  int64_t rows;
  int64_t H;
  int64_t G;
  bool bf16;
  const void* x;
  int64_t ld_x;
  const void* z;
  int64_t ld_z;
  const float* weight;
  const float* bias;  // or nullptr
  float eps;
  bool norm_before_gate;  // y = norm(x) w * silu(z); else norm(x * silu(z)) w
  void* out;              // forward only
  int64_t ld_out;
  float* scratch;  // 2 H floats
};

struct NormRowsGrad {
  const void* dout;  // x's element type
  int64_t ld_dout;
  void* dx;  // written
  int64_t ld_dx;
  void* dz;  // written when z is given
  int64_t ld_dz;
  float* dw;  // (H,) accumulated
  float* db;  // (H,) accumulated, or nullptr
};

// Residual add + LayerNorm / RMSNorm (add_norm_cpu.cpp, add_norm_rows.inc): rows of H contiguous channels, rows
// ld_* elements apart. Each row operand is bf16 (its bits) or fp32, said by its *_bf16 flag.
struct AddNormRows {
  int64_t rows;
  int64_t H;
  const void* x;
  int64_t ld_x;
  bool x_bf16;
  const void* residual;  // or nullptr
  int64_t ld_res;
  bool res_bf16;
  const float* weight;
  const float* bias;  // or nullptr
  float eps;
  bool rms;         // RMSNorm, else LayerNorm
  void* y;          // forward: x's element type
  int64_t ld_y;
  void* res_out;    // forward: x + residual, or nullptr
  int64_t ld_res_out;
  bool res_out_bf16;
  float* scratch;  // 2 H floats
};

struct AddNormRowsGrad {
  const void* dy;
  int64_t ld_dy;
  bool dy_bf16;
  const void* dres_out;  // the gradient of res_out, or nullptr
  int64_t ld_dres_out;
  bool dres_out_bf16;
  void* dx;  // written, x's element type
  int64_t ld_dx;
  void* dres;  // written, residual's element type, or nullptr
  int64_t ld_dres;
  float* dw;  // (H,) accumulated
  float* db;  // (H,) accumulated, or nullptr
};

// Forward: state (npad,) holds the initial state and receives the last; out (L,) fp32.
using FwdRowFn = void (*)(const ScanRow& r, float* state, float* out);
// Backward of nrows rows of one length: init[j] (npad,) row j's initial state (zeros when absent); recomputes the
// states from checkpoints; scratch holds bwd_scratch_floats(nrows, L, npad) floats.
using BwdRowsFn = void (*)(int64_t nrows, const ScanRow* rows, const float* const* init, const ScanRowGrad* g,
                           float* scratch);
using UpdateRowsFn = void (*)(const UpdateRows& u);
using ConvUpdateFn = void (*)(const ConvUpdate& c);
using ConvRowFn = void (*)(const ConvRow& c);
using ConvRowBwdFn = void (*)(const ConvRowGrad& c);
using ConvTmFwdFn = void (*)(const ConvTimeMajor& c);
using ConvTmBwdFn = void (*)(const ConvTimeMajor& c, const ConvTimeMajorGrad& g);
using NormFwdFn = void (*)(const NormRows& p);
using NormBwdFn = void (*)(const NormRows& p, const NormRowsGrad& q);
using AddNormFwdFn = void (*)(const AddNormRows& p);
using AddNormBwdFn = void (*)(const AddNormRows& p, const AddNormRowsGrad& q);

// Elementwise, vectorised: grad <- grad * sigmoid(pre).
using SoftplusBwdFn = void (*)(float* grad, const float* pre, int64_t n);
// dst = softplus(src + bias) (or src + bias), n elements; dst may be src.
using DeltaRowFn = void (*)(const float* src, float bias, bool softplus, float* dst, int64_t n);
// bf16 (as its bits) to and from fp32, n elements; to bf16 rounds to nearest even with NaN -> 0x7FC0, as c10.
using Bf16ToF32Fn = void (*)(const uint16_t* src, float* dst, int64_t n);
using F32ToBf16Fn = void (*)(const float* src, uint16_t* dst, int64_t n);

struct Kernels {
  FwdRowFn fwd_row;
  BwdRowsFn bwd_rows;
  UpdateRowsFn update_rows;
  ConvUpdateFn conv_update;
  ConvRowFn conv_row;
  ConvRowBwdFn conv_row_bwd;
  ConvTmFwdFn conv_tm_fwd;
  ConvTmBwdFn conv_tm_bwd;
  NormFwdFn norm_fwd_rows;
  NormBwdFn norm_bwd_rows;
  AddNormFwdFn add_norm_fwd_rows;
  AddNormBwdFn add_norm_bwd_rows;
  SoftplusBwdFn softplus_backward;
  DeltaRowFn delta_row;
  Bf16ToF32Fn bf16_to_f32;
  F32ToBf16Fn f32_to_bf16;
  const char* isa;
};

// Implemented in scan_isa_avx512.cpp, scan_isa_avx2.cpp, scan_isa_scalar.cpp.
Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_scalar();

}  // namespace llmkernels::scan_cpu
