// One decode step of the selective scan, updating the state in place:
//   dt = softplus(dt + dt_bias) when asked;  state[n] = exp(dt A[d, n]) state[n] + dt B[n] x;
//   y = sum_n C[n] state[n] + D x;  y *= silu(z) when z is given.
// Tiling: `lanes` consecutive threads (a power of two <= 32, about dstate) own one (batch, channel) and stride
// over dstate, so a warp's state accesses are contiguous; the dot product with C is a shuffle reduction
// inside the lane group. Speed: one read and one write of the state, memory-bound.
#include "scan/cuda/scan_launch.h"

namespace llmkernels::scan {

constexpr int kUpdateThreads = 128;

template <typename T, typename S>
__global__ void __launch_bounds__(kUpdateThreads) selective_state_update_kernel(const StateUpdateParams p, int lanes) {
  const int gid = blockIdx.x * kUpdateThreads + threadIdx.x;
  const int channel = gid / lanes, lane = gid % lanes;  // channel = batch * dim + d
  // Threads past the last channel stay to the end: the group reductions shuffle over full warps.
  const bool active = channel < p.batch * p.dim;
  const int b = active ? channel / p.dim : 0, d = active ? channel % p.dim : 0;
  const int g = d / p.channels_per_group;

  float acc = 0.f, x = 0.f;
  if (active) {
    x = to_float(static_cast<const T*>(p.x)[channel]);
    float dt = to_float(static_cast<const T*>(p.dt)[channel]) + (p.dt_bias ? p.dt_bias[d] : 0.f);
    if (p.dt_softplus) dt = softplus(dt);
    S* state = static_cast<S*>(p.state) + b * p.state_stride_b + d * p.state_stride_d;
    const T* B = static_cast<const T*>(p.B) + (size_t(b) * p.ngroups + g) * p.dstate;
    const T* C = static_cast<const T*>(p.C) + (size_t(b) * p.ngroups + g) * p.dstate;
    const float* A = p.A + size_t(d) * p.dstate;
    for (int n = lane; n < p.dstate; n += lanes) {
      S* s = state + n * p.state_stride_n;
      const float next = to_float(*s) * exp2f(dt * A[n] * kLog2e) + dt * to_float(B[n]) * x;
      *s = from_float<S>(next);
      acc += next * to_float(C[n]);  // the fp32 state, before rounding to the state's dtype
    }
  }
  for (int offset = lanes / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(kFullMask, acc, offset);
  if (active && lane == 0) {
    float y = acc + (p.D ? p.D[d] * x : 0.f);
    if (p.z) y *= silu(to_float(static_cast<const T*>(p.z)[channel]));
    static_cast<T*>(p.out)[channel] = from_float<T>(y);
  }
}

template <typename T, typename S>
void launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream) {
  int lanes = 1;
  while (lanes < p.dstate && lanes < 32) lanes <<= 1;
  const int64_t threads = int64_t(p.batch) * p.dim * lanes;
  const int blocks = int((threads + kUpdateThreads - 1) / kUpdateThreads);
  selective_state_update_kernel<T, S><<<blocks, kUpdateThreads, 0, stream>>>(p, lanes);
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
