// Launchers of the scan-family CUDA kernels, defined in the per-kernel .cu files and called by scan_api.cu.
// T is the activations' dtype (float, __half, __nv_bfloat16); S the decode state's dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "scan/cuda/scan_common.cuh"

namespace llmkernels::scan {

template <typename T>
void launch_selective_scan_fwd(const ScanFwdParams& p, cudaStream_t stream);
template <typename T>
void launch_selective_scan_bwd(const ScanBwdParams& p, cudaStream_t stream);

// The channel-parallel backward (selective_scan_bwd_fast.cuh, LLMKERNELS_SCAN_BWD=fast): the backward's
// parameters plus fp32 scratch the host allocates (nothing needs zeroing: every element is written before it is
// read). It writes dA, dB, dC, dD, ddelta_bias (no accumulation) and ignores chunk_states_in.
constexpr int kFastN = 16;   // dstate of the fast backward
constexpr int kFastCh = 64;  // channels per CTA
constexpr int kFastT = 16;   // timesteps per tile and per checkpoint
struct ScanBwdFastParams : ScanBwdParams {
  float* ckpt;       // (batch * dim / kFastCh, ceil(seqlen / kFastT), kFastCh, kFastN): state entering each tile
  float* part_bc;    // (batch * dim / kFastCh, seqlen, 2 * kFastN): each CTA's dB_t/dC_t summed over its channels
  float* part_A;     // (batch, dim, kFastN)
  float* part_D;     // (batch, dim)
  float* part_bias;  // (batch, dim)
};
template <typename T>
void launch_selective_scan_bwd_fast(const ScanBwdFastParams& p, cudaStream_t stream);
// Whether the fast backward applies (dstate 16, per-token B/C, aligned rows, 64-channel CTAs within a group).
inline bool fast_scan_bwd_supported(const ScanBwdParams& p) {
  return p.dstate == kFastN && p.vec && p.B_per_token && p.C_per_token && p.seq_idx == nullptr &&
         p.dim % kFastCh == 0 &&
         (p.dim / p.B_ngroups) % kFastCh == 0 && (p.dim / p.C_ngroups) % kFastCh == 0;
}

// One decode step of the scan. x, dt, z: (batch, dim); B, C: (batch, ngroups, dstate); all contiguous.
// state: (batch, dim, dstate) with any strides, updated in place.
struct StateUpdateParams {
  int batch, dim, dstate, ngroups, channels_per_group;
  bool dt_softplus;
  void* state;
  int64_t state_stride_b, state_stride_d, state_stride_n;
  const int32_t* state_rows;  // state_batch_indices (batch,): row b steps state row state_rows[b]; null: row b
  int state_batch;            // the state's rows (an index outside them leaves its batch row out)
  const void* x;
  const void* dt;
  const void* z;         // or null
  const float* A;        // A[d * a_stride_d + n * a_stride_n]: (dim, dstate), or (dim,) with a_stride_n 0
  int a_stride_d, a_stride_n;
  const void* B;
  const void* C;
  const float* D;        // (dim,) or null
  const float* dt_bias;  // (dim,) or null
  void* out;             // (batch, dim)
};
template <typename T, typename S>
void launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream);

// Depthwise causal conv1d. x, out, dout, dx: (batch, dim, seqlen) contiguous; weight (dim, width) and bias
// (dim,) fp32; dweight/dbias fp32 accumulators the host zeroes.
struct ConvParams {
  int batch, dim, seqlen, width;
  bool silu;
  const void* x;
  const float* weight;
  const float* bias;  // or null
  void* out;
  const void* dout;
  void* dx;
  float* dweight;
  float* dbias;       // or null
  const int32_t* seq_idx;       // (batch, seqlen) or null: a tap across a change of seq_idx reads 0
  const float* initial_states;  // (batch, dim, width - 1) fp32 or null: the inputs before t = 0
  float* dinitial_states;       // like initial_states, written by the backward
};
template <typename T>
void launch_causal_conv1d_fwd(const ConvParams& p, cudaStream_t stream);
template <typename T>
void launch_causal_conv1d_bwd(const ConvParams& p, cudaStream_t stream);

// One decode step: conv_state (batch, dim, state_len >= width - 1), any strides, shifted left by one with x appended
// in place; out = act(bias + sum_k weight[k] * window[k]), window the last `width` of the old state's entries and x.
// With cache_seqlens the state is circular: x goes to slot cache_seqlens[b] mod state_len, the window's other
// entries are the width - 1 slots before it (cyclically), and nothing shifts. x, out: (batch, dim, seqlen)
// contiguous, seqlen steps in order (token t at cache_seqlens + t); seqlen 1 for a (batch, dim) x.
struct ConvUpdateParams {
  int batch, dim, width, state_len, seqlen;
  bool silu;
  const void* x;
  void* conv_state;
  int64_t state_stride_b, state_stride_d, state_stride_w;
  const void* cache_seqlens;  // (batch,) int32, or int64 when cache_seqlens_64; null: the state shifts
  bool cache_seqlens_64;
  const int32_t* state_rows;  // conv_state_indices (batch,): row b steps state row state_rows[b]; null: row b
  int state_batch;            // the state's rows (an index outside them leaves its batch row out)
  const float* weight;
  const float* bias;
  void* out;
};
template <typename T, typename S>  // S: conv_state's dtype
void launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream);

}  // namespace llmkernels::scan
