// Pieces shared by the selective-scan CUDA kernels: the launch geometry, the parameter structs, dtype-generic
// loads/stores of a thread's run of consecutive timesteps, and the algebra of the affine maps the scans compose.
//
// A scan step x -> a * x + b is an affine map; two steps compose into one, (a1, b1) then (a2, b2) =
// (a2 * a1, a2 * b1 + b2), and composition is associative, so a block can scan a chunk of timesteps in
// parallel: each thread composes its own kItems steps sequentially, a warp combines its 32 threads with
// shuffles, and the kWarps warp totals meet in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace llmkernels::scan {

constexpr int kThreads = 128;            // threads of a scan CTA, spread along seqlen
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;                // consecutive timesteps per thread: one 16-byte load of fp16/bf16, two of fp32
constexpr int kChunk = kThreads * kItems;  // timesteps a CTA scans per pass; longer sequences carry the state over
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// Forward scan over one (batch, channel) row per CTA. Tensors are contiguous; B/C per token are viewed as
// (batch, ngroups, dstate, seqlen) (ngroups = 1 for the (batch, dstate, seqlen) layout), channel d reading
// group d / (dim / ngroups).
struct ScanFwdParams {
  int batch, dim, seqlen, dstate, nchunks;
  int B_ngroups, C_ngroups;       // groups of the per-token layouts (1 for (batch, dstate, seqlen))
  bool B_per_token, C_per_token;  // false: (dim, dstate) fp32
  bool delta_softplus;
  bool vec;                        // rows start 16-byte aligned: full runs of kItems use vector loads
  const void* u;                   // (batch, dim, seqlen), input dtype
  const void* delta;               // (batch, dim, seqlen), input dtype
  const void* z;                   // (batch, dim, seqlen) or null
  const float* A;                  // (dim, dstate)
  const void* B;                   // (dim, dstate) fp32 or (batch, ngroups, dstate, seqlen) input dtype
  const void* C;
  const float* D;                  // (dim,) or null
  const float* delta_bias;         // (dim,) or null
  const float* initial_state;      // (batch, dim, dstate) or null
  const int32_t* seq_idx;          // (batch, seqlen) or null: packed sequences, the state restarts where it changes
  void* out;                       // (batch, dim, seqlen) input dtype; null: states only (backward's recompute)
  float* last_state;               // (batch, dim, dstate)
  float* chunk_states;             // (batch, dim, nchunks, dstate): state entering each chunk, or null
};

// Backward: the forward's inputs plus the incoming gradients and the gradient buffers. Accumulated gradients
// (dA, dD, ddelta_bias, and dB/dC in both layouts) are fp32 buffers the host zeroes and converts afterwards.
struct ScanBwdParams : ScanFwdParams {
  const void* dout;                // (batch, dim, seqlen), input dtype
  const float* dlast_state;        // (batch, dim, dstate) or null
  const float* chunk_states_in;    // (batch, dim, nchunks, dstate) from the forward recompute pass
  void* du;                        // (batch, dim, seqlen), input dtype
  void* ddelta;                    // (batch, dim, seqlen), input dtype
  void* dz;                        // (batch, dim, seqlen) input dtype, or null
  float* dA;                       // (dim, dstate), accumulated
  float* dB;                       // like B, fp32, accumulated
  float* dC;
  float* dD;                       // (dim,) or null, accumulated
  float* ddelta_bias;              // (dim,) or null, accumulated
  float* dinitial_state;           // (batch, dim, dstate) or null, written
};

// Offset of (batch b, channel d)'s (dstate, seqlen) slab in a per-token B or C of `ngroups` groups.
__host__ __device__ inline size_t bc_slab(int b, int d, int dim, int ngroups, int dstate, int seqlen) {
  return (size_t(b) * ngroups + d / (dim / ngroups)) * dstate * seqlen;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Loads row[t0 .. t0 + kItems) as floats; timesteps at or past seqlen read as 0. A full run on an aligned row
// takes kItems * sizeof(T) / 16 vector loads (t0 is a multiple of kItems, so the run is 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_run(const T* row, int t0, int seqlen, bool vec, float (&v)[kItems]) {
  constexpr int kPerVec = 16 / sizeof(T);
  static_assert(kItems % kPerVec == 0, "a run must be whole 16-byte vectors");
  if (vec && t0 + kItems <= seqlen) {
#pragma unroll
    for (int j = 0; j < kItems / kPerVec; ++j) {
      union {
        uint4 raw;
        T e[kPerVec];
      } pack;
      pack.raw = *reinterpret_cast<const uint4*>(row + t0 + j * kPerVec);
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) v[j * kPerVec + i] = to_float(pack.e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = t0 + i < seqlen ? to_float(row[t0 + i]) : 0.f;
  }
}

// Stores v into row[t0 .. min(t0 + kItems, seqlen)).
template <typename T>
__device__ __forceinline__ void store_run(T* row, int t0, int seqlen, bool vec, const float (&v)[kItems]) {
  constexpr int kPerVec = 16 / sizeof(T);
  if (vec && t0 + kItems <= seqlen) {
#pragma unroll
    for (int j = 0; j < kItems / kPerVec; ++j) {
      union {
        uint4 raw;
        T e[kPerVec];
      } pack;
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) pack.e[i] = from_float<T>(v[j * kPerVec + i]);
      *reinterpret_cast<uint4*>(row + t0 + j * kPerVec) = pack.raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (t0 + i < seqlen) row[t0 + i] = from_float<T>(v[i]);
  }
}

// Packed sequences: whether each timestep of the run t0 .. t0 + kItems carries the state of the one before
// (false where seq_idx changes). Timestep 0 carries the initial state; past the end the step is the identity
// either way. seq_row: this batch element's seq_idx row, or null (one sequence).
__device__ __forceinline__ void load_carry(const int32_t* seq_row, int t0, int seqlen, bool (&carry)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int t = t0 + i;
    carry[i] = seq_row == nullptr || t == 0 || t >= seqlen || seq_row[t] == seq_row[t - 1];
  }
}

// mamba_ssm's softplus: log(1 + e^x), and x itself above 20 where the two agree in fp32.
__device__ __forceinline__ float softplus(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x).
__device__ __forceinline__ float silu_grad(float x) {
  const float s = sigmoid(x);
  return s * (1.f + x * (1.f - s));
}

// x -> a * x + b, where a = 0 (a packed sequence's start, or a decay that underflowed) gives b itself: the state
// before it is dropped, not multiplied by 0, so an inf or NaN there cannot reach the next sequence (0 * inf is NaN).
// For finite x the two agree exactly.
__device__ __forceinline__ float apply_map(float a, float b, float x) { return a == 0.f ? b : fmaf(a, x, b); }

// Inclusive scan of affine maps across a warp, in lane order: lane l ends with lanes 0..l composed
// (lane 0's map applied first).
__device__ __forceinline__ void warp_scan_forward(float& a, float& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float pa = __shfl_up_sync(kFullMask, a, offset);
    const float pb = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {  // (pa, pb) covers earlier lanes and is applied first
      b = apply_map(a, b, pb);
      a = a * pa;
    }
  }
}

// Inclusive scan in reverse lane order: lane l ends with lanes 31..l composed (lane 31's map applied first).
__device__ __forceinline__ void warp_scan_reverse(float& a, float& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float pa = __shfl_down_sync(kFullMask, a, offset);
    const float pb = __shfl_down_sync(kFullMask, b, offset);
    if (lane + offset < 32) {  // (pa, pb) covers later lanes and is applied first
      b = apply_map(a, b, pb);
      a = a * pa;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace llmkernels::scan
