// One decode step of the selective scan, updating the state in place:
//   dt = softplus(dt + dt_bias) when asked;  state[n] = exp(dt A[d, n]) state[n] + dt B[n] x  (A (dim,): A[d]);
//   y = sum_n C[n] state[n] + D x;  y *= silu(z) when z is given.
// Tiling: `lanes` consecutive threads (a power of two <= 32) own one (batch, channel); each thread takes runs of
// kRun consecutive state entries, strided by lanes * kRun, so a warp's accesses are contiguous. When the state is
// contiguous along dstate and 4-entry aligned (the usual cache layout) a run is one vector load/store of the
// state and of B and C (8 or 16 bytes); otherwise the run is read entry by entry. The dot product with C is a
// shuffle reduction inside the lane group. Speed: one read and one write of the state, memory-bound.
#include <type_traits>

#include "scan/cuda/scan_launch.h"

namespace llmkernels::scan {

constexpr int kUpdateThreads = 128;
constexpr int kRun = 4;  // consecutive state entries per thread and step

// kRun consecutive elements as floats / from floats; `vec` uses one 8- or 16-byte access (p must be aligned to it).
template <typename T>
__device__ __forceinline__ void load_4(const T* p, bool vec, float (&v)[kRun]) {
  if (vec) {
    union {
      typename std::conditional<sizeof(T) == 4, uint4, uint2>::type raw;
      T e[kRun];
    } pack;
    pack.raw = *reinterpret_cast<const decltype(pack.raw)*>(p);
#pragma unroll
    for (int i = 0; i < kRun; ++i) v[i] = to_float(pack.e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) v[i] = to_float(p[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store_4(T* p, bool vec, const float (&v)[kRun]) {
  if (vec) {
    union {
      typename std::conditional<sizeof(T) == 4, uint4, uint2>::type raw;
      T e[kRun];
    } pack;
#pragma unroll
    for (int i = 0; i < kRun; ++i) pack.e[i] = from_float<T>(v[i]);
    *reinterpret_cast<decltype(pack.raw)*>(p) = pack.raw;
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) p[i] = from_float<T>(v[i]);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kUpdateThreads)
    selective_state_update_kernel(const StateUpdateParams p, int lanes, bool vec) {
  const int gid = blockIdx.x * kUpdateThreads + threadIdx.x;
  const int channel = gid / lanes, lane = gid % lanes;  // channel = batch * dim + d
  // Threads past the last channel stay to the end: the group reductions shuffle over full warps.
  const bool active = channel < p.batch * p.dim;
  const int b = active ? channel / p.dim : 0, d = active ? channel % p.dim : 0;
  const int g = d / p.channels_per_group;
  // A state_batch_indices entry outside the state's rows (negative: a pad slot) leaves the row out: no state
  // access, output 0. (Never clamped into range: that row would belong to another request.)
  int64_t sb = b;
  bool live = active;
  if (active && p.state_rows) {
    sb = p.state_rows[b];
    live = sb >= 0 && sb < p.state_batch;
  }

  float acc = 0.f, x = 0.f;
  if (live) {
    x = to_float(static_cast<const T*>(p.x)[channel]);
    float dt = to_float(static_cast<const T*>(p.dt)[channel]) + (p.dt_bias ? p.dt_bias[d] : 0.f);
    if (p.dt_softplus) dt = softplus(dt);
    S* state = static_cast<S*>(p.state) + sb * p.state_stride_b + d * p.state_stride_d;
    const T* B = static_cast<const T*>(p.B) + (size_t(b) * p.ngroups + g) * p.dstate;
    const T* C = static_cast<const T*>(p.C) + (size_t(b) * p.ngroups + g) * p.dstate;
    const float* A = p.A + size_t(d) * p.a_stride_d;
    const int a_n = p.a_stride_n;  // 0: one A per channel (Mamba-2's per-head decay)
    if (vec) {  // stride_n == 1 and dstate % kRun == 0: whole aligned runs
      for (int n0 = lane * kRun; n0 < p.dstate; n0 += lanes * kRun) {
        float s[kRun], Bv[kRun], Cv[kRun];
        load_4(state + n0, true, s);
        load_4(B + n0, true, Bv);
        load_4(C + n0, true, Cv);
#pragma unroll
        for (int i = 0; i < kRun; ++i) {
          s[i] = s[i] * exp2f(dt * A[(n0 + i) * a_n] * kLog2e) + dt * Bv[i] * x;
          acc += s[i] * Cv[i];  // the fp32 state, before rounding to the state's dtype
        }
        store_4(state + n0, true, s);
      }
    } else {
      for (int n = lane; n < p.dstate; n += lanes) {
        S* s = state + n * p.state_stride_n;
        const float next = to_float(*s) * exp2f(dt * A[n * a_n] * kLog2e) + dt * to_float(B[n]) * x;
        *s = from_float<S>(next);
        acc += next * to_float(C[n]);
      }
    }
  }
  for (int offset = lanes / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(kFullMask, acc, offset);
  if (active && lane == 0) {
    float y = 0.f;
    if (live) {
      y = acc + (p.D ? p.D[d] * x : 0.f);
      if (p.z) y *= silu(to_float(static_cast<const T*>(p.z)[channel]));
    }
    static_cast<T*>(p.out)[channel] = from_float<T>(y);
  }
}

template <typename T, typename S>
void launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream) {
  // Vector runs need the state contiguous along dstate with every (batch, channel) row aligned to a run, and
  // B/C (contiguous, dstate per row) aligned likewise.
  const auto aligned = [](const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  const bool vec = p.state_stride_n == 1 && p.dstate % kRun == 0 && p.state_stride_b % kRun == 0 &&
                   p.state_stride_d % kRun == 0 && aligned(p.state, kRun * sizeof(S)) &&
                   aligned(p.B, kRun * sizeof(T)) && aligned(p.C, kRun * sizeof(T));
  const int per_thread = vec ? kRun : 1;
  int lanes = 1;
  while (lanes * per_thread < p.dstate && lanes < 32) lanes <<= 1;
  const int64_t threads = int64_t(p.batch) * p.dim * lanes;
  const int blocks = int((threads + kUpdateThreads - 1) / kUpdateThreads);
  selective_state_update_kernel<T, S><<<blocks, kUpdateThreads, 0, stream>>>(p, lanes, vec);
}

#define LLMK_INSTANTIATE_UPDATE(T)                                                                         \
  template void launch_selective_state_update<T, float>(const StateUpdateParams&, cudaStream_t);          \
  template void launch_selective_state_update<T, __half>(const StateUpdateParams&, cudaStream_t);         \
  template void launch_selective_state_update<T, __nv_bfloat16>(const StateUpdateParams&, cudaStream_t);
LLMK_INSTANTIATE_UPDATE(float)
LLMK_INSTANTIATE_UPDATE(__half)
LLMK_INSTANTIATE_UPDATE(__nv_bfloat16)
#undef LLMK_INSTANTIATE_UPDATE

}  // namespace llmkernels::scan
