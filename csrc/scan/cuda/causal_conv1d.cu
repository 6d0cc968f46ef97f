// Depthwise causal conv1d (width 2..4), as Mamba runs it before the scan:
//   pre_t = bias + sum_k w[k] x[t - (width - 1) + k]  (x = 0 before t = 0),  out_t = silu(pre_t) or pre_t.
// Backward: dpre_t = dout_t * silu'(pre_t); dx_s = sum_k w[k] dpre[s + width - 1 - k];
//   dw[k] = sum_{batch, t} dpre_t x[t - (width - 1) + k];  dbias = sum_{batch, t} dpre_t.
// Tiling: forward, one thread per output timestep, a CTA covering 256 consecutive timesteps of one row, so loads
// and stores are coalesced along seqlen and the width - 1 overlapping reads hit L1. Backward, one CTA per row
// walking 256-timestep tiles: dpre of the tile plus its width - 1 halo goes through shared memory, weight and
// bias gradients are CTA reductions with one fp32 atomic per CTA. Decode: one thread per (batch, channel).
// Packed sequences (seq_idx): a tap s counts for output t only when seq_idx[s] == seq_idx[t]; initial_states: the
// inputs at s < 0 (the backward's first tile also writes their gradient, from the dpre it holds).
// Speed: memory-bound (one read of x, one write of out; backward reads x and dout, writes dx).
#include "scan/cuda/scan_launch.h"

namespace llmkernels::scan {

constexpr int kConvThreads = 256;
constexpr int kMaxWidth = 4;

// Input s (-(width - 1) <= s < seqlen) of row `row` as seen from output t: x[s], the initial state for s < 0 (0
// without one), and 0 where seq_idx says s belongs to another sequence than t.
template <typename T>
__device__ __forceinline__ float conv_input(const ConvParams& p, const T* x, const int32_t* seq, int row, int s, int t) {
  if (s >= 0) return seq != nullptr && seq[s] != seq[t] ? 0.f : to_float(x[s]);
  return p.initial_states ? p.initial_states[size_t(row) * (p.width - 1) + (p.width - 1) + s] : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_fwd_kernel(const ConvParams p) {
  const int row = blockIdx.x, d = row % p.dim;  // rows on x: batch * dim may exceed gridDim.y's 65535
  const int t = blockIdx.y * kConvThreads + threadIdx.x;
  if (t >= p.seqlen) return;
  const T* x = static_cast<const T*>(p.x) + size_t(row) * p.seqlen;
  const int32_t* seq = p.seq_idx ? p.seq_idx + size_t(row / p.dim) * p.seqlen : nullptr;
  float acc = p.bias ? p.bias[d] : 0.f;
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) {
    const int s = t - (p.width - 1) + k;
    if (k < p.width) acc += p.weight[d * p.width + k] * conv_input(p, x, seq, row, s, t);
  }
  if (p.silu) acc = silu(acc);
  static_cast<T*>(p.out)[size_t(row) * p.seqlen + t] = from_float<T>(acc);
}

template <typename T>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_bwd_kernel(const ConvParams p) {
  __shared__ float dpre_tile[kConvThreads + kMaxWidth - 1];
  __shared__ float partial[kConvThreads / 32][kMaxWidth + 1];
  const int row = blockIdx.x, d = row % p.dim;
  const int tid = threadIdx.x, L = p.seqlen, W = p.width;
  const T* x = static_cast<const T*>(p.x) + size_t(row) * L;
  const T* dout = static_cast<const T*>(p.dout) + size_t(row) * L;
  T* dx = static_cast<T*>(p.dx) + size_t(row) * L;
  const int32_t* seq = p.seq_idx ? p.seq_idx + size_t(row / p.dim) * L : nullptr;
  float w[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < W ? p.weight[d * W + k] : 0.f;
  const float bias = p.bias ? p.bias[d] : 0.f;

  // Gradient with respect to the pre-activation at t (0 past the end), recomputing pre_t under SiLU.
  auto dpre_at = [&](int t) -> float {
    if (t >= L) return 0.f;
    const float g = to_float(dout[t]);
    if (!p.silu) return g;
    float pre = bias;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const int s = t - (W - 1) + k;
      if (k < W) pre += w[k] * conv_input(p, x, seq, row, s, t);
    }
    return g * silu_grad(pre);
  };

  float dw[kMaxWidth] = {0.f, 0.f, 0.f, 0.f}, db = 0.f;
  for (int tile = 0; tile < L; tile += kConvThreads) {
    const int t = tile + tid;
    const float g = dpre_at(t);
    dpre_tile[tid] = g;
    if (tid < W - 1) dpre_tile[kConvThreads + tid] = dpre_at(tile + kConvThreads + tid);  // halo
    if (t < L) {
      db += g;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        const int s = t - (W - 1) + k;
        if (k < W) dw[k] += g * conv_input(p, x, seq, row, s, t);
      }
    }
    __syncthreads();
    if (t < L) {  // dx_t = sum_k w[k] dpre[t + shift_k], over the outputs of t's own sequence
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        const int u = t + (W - 1) - k;
        if (k < W && (seq == nullptr || u >= L || seq[u] == seq[t])) acc += w[k] * dpre_tile[tid + (W - 1) - k];
      }
      dx[t] = from_float<T>(acc);
    }
    // The initial states' gradient: input s = j - (W - 1) < 0 feeds outputs t = j - k (k <= j), all in tile 0.
    if (tile == 0 && p.dinitial_states && tid < W - 1) {
      float acc = 0.f;
      for (int k = 0; k <= tid; ++k) acc += w[k] * dpre_tile[tid - k];
      p.dinitial_states[size_t(row) * (W - 1) + tid] = acc;
    }
    __syncthreads();  // the next tile overwrites dpre_tile
  }

  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) dw[k] = warp_sum(dw[k]);
  db = warp_sum(db);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) partial[warp][k] = dw[k];
    partial[warp][kMaxWidth] = db;
  }
  __syncthreads();
  if (tid <= kMaxWidth) {  // thread k < W sums weight tap k; thread kMaxWidth sums the bias
    float s = 0.f;
    for (int i = 0; i < kConvThreads / 32; ++i) s += partial[i][tid];
    if (tid < W) atomicAdd(p.dweight + d * W + tid, s);
    if (tid == kMaxWidth && p.dbias) atomicAdd(p.dbias + d, s);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_update_kernel(const ConvUpdateParams p) {
  // (int64: the last block's threads pass INT32_MAX when batch * dim is within 256 of it)
  const int64_t channel = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  if (channel >= int64_t(p.batch) * p.dim) return;
  const int b = int(channel / p.dim), d = int(channel % p.dim);
  // A conv_state_indices entry outside the state's rows (negative: a pad slot) leaves the row out: no state
  // access, output 0. (Never clamped into range: that row would belong to another request.)
  const int64_t sb = p.state_rows ? p.state_rows[b] : b;
  if (sb < 0 || sb >= p.state_batch) {
    for (int t = 0; t < p.seqlen; ++t) static_cast<T*>(p.out)[channel * p.seqlen + t] = from_float<T>(0.f);
    return;
  }
  S* state = static_cast<S*>(p.conv_state) + sb * p.state_stride_b + d * p.state_stride_d;
  const float* w = p.weight + int64_t(d) * p.width;
  const int L = p.state_len, taps = p.width - 1;  // taps: the window's entries before x (L >= taps)
  int first_slot = 0;  // circular state: the first token's slot, Python's remainder (a negative length counts back)
  if (p.cache_seqlens) {
    const int64_t pos = p.cache_seqlens_64 ? static_cast<const int64_t*>(p.cache_seqlens)[b]
                                           : static_cast<const int32_t*>(p.cache_seqlens)[b];
    first_slot = int((pos % L + L) % L);
  }
  // Tokens in order, each a step on the state in global memory (this thread's channel alone), so the next token
  // reads what the state stores, rounded to its dtype, as separate calls would.
  for (int t = 0; t < p.seqlen; ++t) {
    const int64_t io = channel * p.seqlen + t;
    const float x = to_float(static_cast<const T*>(p.x)[io]);
    float acc = p.bias ? p.bias[d] : 0.f;
    if (p.cache_seqlens) {
      const int slot = int((int64_t(first_slot) + t) % L);
      int r = slot - taps;  // the oldest tap's slot (one wrap at most)
      if (r < 0) r += L;
      for (int k = 0; k < taps; ++k) {
        acc += w[k] * to_float(state[r * p.state_stride_w]);
        if (++r == L) r = 0;
      }
      state[slot * p.state_stride_w] = from_float<S>(x);
    } else {
      // Entry j moves to j - 1 after it is read; the window is old entries L - taps .. L - 1, then x.
      for (int j = 0; j < L; ++j) {
        const S v = state[j * p.state_stride_w];
        if (j >= L - taps) acc += w[j - (L - taps)] * to_float(v);
        if (j > 0) state[(j - 1) * p.state_stride_w] = v;
      }
      state[(L - 1) * p.state_stride_w] = from_float<S>(x);
    }
    // The new input enters the dot product unrounded, as the reference computes it, even where the state's dtype
    // is narrower than x's.
    acc += w[taps] * x;
    if (p.silu) acc = silu(acc);
    static_cast<T*>(p.out)[io] = from_float<T>(acc);
  }
}

template <typename T>
void launch_causal_conv1d_fwd(const ConvParams& p, cudaStream_t stream) {
  const dim3 grid(p.batch * p.dim, (p.seqlen + kConvThreads - 1) / kConvThreads);
  causal_conv1d_fwd_kernel<T><<<grid, kConvThreads, 0, stream>>>(p);
}

template <typename T>
void launch_causal_conv1d_bwd(const ConvParams& p, cudaStream_t stream) {
  causal_conv1d_bwd_kernel<T><<<p.batch * p.dim, kConvThreads, 0, stream>>>(p);
}

template <typename T, typename S>
void launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream) {
  const int blocks = int((int64_t(p.batch) * p.dim + kConvThreads - 1) / kConvThreads);  // (int64: see the kernel)
  causal_conv1d_update_kernel<T, S><<<blocks, kConvThreads, 0, stream>>>(p);
}

#define LLMK_INSTANTIATE_CONV(T)                                                                 \
  template void launch_causal_conv1d_fwd<T>(const ConvParams&, cudaStream_t);                   \
  template void launch_causal_conv1d_bwd<T>(const ConvParams&, cudaStream_t);                   \
  template void launch_causal_conv1d_update<T, float>(const ConvUpdateParams&, cudaStream_t);   \
  template void launch_causal_conv1d_update<T, __half>(const ConvUpdateParams&, cudaStream_t);  \
  template void launch_causal_conv1d_update<T, __nv_bfloat16>(const ConvUpdateParams&, cudaStream_t);
LLMK_INSTANTIATE_CONV(float)
LLMK_INSTANTIATE_CONV(__half)
LLMK_INSTANTIATE_CONV(__nv_bfloat16)
#undef LLMK_INSTANTIATE_CONV

}  // namespace llmkernels::scan
