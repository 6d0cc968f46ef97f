// Selective scan backward, one CTA per (batch, channel) row, chunks walked from the last to the first.
//
// Math (per channel, state index n; a_t = exp(dt_t A), or 0 where seq_idx starts a sequence; b_t = dt_t B_t u_t, dy_t = dout_t * silu(z_t) or dout_t):
//   g_t = dL/dx_t = C_t dy_t + a_{t+1} g_{t+1}, seeded by dlast_state. With q_t = a_t g_t (what step t hands
//   to t - 1) this is a reverse affine scan q_t = a_t q_{t+1} + a_t C_t dy_t, q_L = dlast_state, g_t = q_{t+1} +
//   C_t dy_t, and dinitial_state = q_0. Then
//     dC_t += dy_t x_t,  dB_t += g_t dt_t u_t,  du_t += g_t dt_t B_t (+ D dy_t),
//     ddt_t += g_t (A a_t x_{t-1} + B_t u_t),  dA += g_t dt_t a_t x_{t-1},  dD += dy_t u_t,
//     dz_t = dout_t y_t silu'(z_t),  ddelta_t = ddt_t * sigmoid(delta_t + bias) under softplus (1 above 20).
//
// Tiling: a forward pass (selective_scan_fwd_kernel with out = null) first stores the state entering each
// chunk, (batch, dim, nchunks, dstate) fp32: nchunks = seqlen / 1024 floats per state, not seqlen. For each
// chunk, in reverse, and each n, this kernel recomputes the chunk's states with the same block scan as the
// forward (starting from the stored state), runs the reverse block scan for q (shfl_down + warp totals in
// shared memory, carrying q across chunks), and walks each thread's run backwards accumulating the gradients.
// Per-timestep terms (du, ddelta, dz) stay in registers; dA and constant dB/dC are warp-reduced into shared
// accumulators and added to global fp32 buffers once per CTA; per-token dB/dC go straight to global fp32
// buffers with atomicAdd (every channel of a group adds into the same B_t gradient), as do dD/ddelta_bias.
//
// Speed: twice the forward's exp2 and scan work plus the dB/dC atomics, which dominate when B/C are per token
// (dstate * 2 atomics per timestep per channel, contended by the dim / ngroups channels of a group, and a warp's
// 32 lanes 8 floats apart: 32 sectors per atomic instruction). Measured on H100 (bf16, batch 8, dim 5120,
// seqlen 2048, per-token B/C): ~35 ms (fwd + bwd 36.2 ms), against ~3 ms for the recompute and the block scans
// (twice the chunked forward's 1.46 ms): the 2.7e9 atomics are the rest. LLMKERNELS_SCAN_BWD=fast takes the
// channel-parallel kernel of selective_scan_bwd_fast.cuh for the common case, without cross-channel atomics.
#pragma once

#include "scan/cuda/scan_common.cuh"

namespace llmkernels::scan {

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(const ScanBwdParams p) {
  // Shared: q_carry[2][N] (q entering a chunk from its right, double-buffered by chunk parity), then the per-CTA
  // accumulators dA_acc[N], dB_acc[N], dC_acc[N] (the last two for constant B/C).
  extern __shared__ float smem[];
  __shared__ float2 fwd_total[2][kWarps], rev_total[2][kWarps];  // double-buffered by scan step parity
  __shared__ float reduce_buf[2][kWarps];

  const int row = blockIdx.x;
  const int b = row / p.dim, d = row % p.dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int L = p.seqlen, N = p.dstate;
  float* q_carry = smem;
  float* dA_acc = smem + 2 * N;
  float* dB_acc = dA_acc + N;
  float* dC_acc = dB_acc + N;

  const size_t row_off = size_t(row) * L;
  const T* u = static_cast<const T*>(p.u) + row_off;
  const T* delta = static_cast<const T*>(p.delta) + row_off;
  const T* z = p.z ? static_cast<const T*>(p.z) + row_off : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + row_off;
  const float* A = p.A + size_t(d) * N;
  const size_t B_slab = bc_slab(b, d, p.dim, p.B_ngroups, N, L), C_slab = bc_slab(b, d, p.dim, p.C_ngroups, N, L);
  const T* B_tok = p.B_per_token ? static_cast<const T*>(p.B) + B_slab : nullptr;
  const T* C_tok = p.C_per_token ? static_cast<const T*>(p.C) + C_slab : nullptr;
  float* dB_tok = p.B_per_token ? p.dB + B_slab : nullptr;
  float* dC_tok = p.C_per_token ? p.dC + C_slab : nullptr;
  const float* B_const = p.B_per_token ? nullptr : static_cast<const float*>(p.B) + size_t(d) * N;
  const float* C_const = p.C_per_token ? nullptr : static_cast<const float*>(p.C) + size_t(d) * N;
  const float D = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int32_t* seq_row = p.seq_idx ? p.seq_idx + size_t(b) * L : nullptr;

  for (int n = tid; n < N; n += kThreads) {
    q_carry[n] = p.dlast_state ? p.dlast_state[size_t(row) * N + n] : 0.f;
    dA_acc[n] = dB_acc[n] = dC_acc[n] = 0.f;
  }
  __syncthreads();

  float dD_part = 0.f, dbias_part = 0.f;
  int step = 0;
  for (int chunk = p.nchunks - 1, pass = 0; chunk >= 0; --chunk, ++pass) {
    const int t0 = chunk * kChunk + tid * kItems;
    const float* q_in_chunk = q_carry + (pass & 1) * N;
    float* q_out_chunk = q_carry + ((pass + 1) & 1) * N;

    float uv[kItems], pre[kItems], dt[kItems], dy[kItems], zv[kItems];
    bool carry[kItems];
    load_carry(seq_row, t0, L, carry);
    load_run(u, t0, L, p.vec, uv);
    load_run(delta, t0, L, p.vec, pre);
    load_run(dout, t0, L, p.vec, dy);  // zero past the end, which zeroes every gradient term there
    if (z) load_run(z, t0, L, p.vec, zv);
    float du[kItems], ddt[kItems], y[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      pre[i] += bias;
      dt[i] = t0 + i < L ? (p.delta_softplus ? softplus(pre[i]) : pre[i]) : 0.f;  // identity step past the end
      if (z) dy[i] *= silu(zv[i]);
      du[i] = ddt[i] = y[i] = 0.f;
    }

    for (int n = 0; n < N; ++n, ++step) {
      const float An = A[n], A2 = An * kLog2e;
      float Bv[kItems], Cv[kItems];
      if (B_tok) {
        load_run(B_tok + size_t(n) * L, t0, L, p.vec, Bv);
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) Bv[i] = B_const[n];
      }
      if (C_tok) {
        load_run(C_tok + size_t(n) * L, t0, L, p.vec, Cv);
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) Cv[i] = C_const[n];
      }

      // Per-step maps: forward (a, b u dt), reverse (a, a C dy).
      float a[kItems], bx[kItems];
      float fa = 1.f, fb = 0.f, ra = 1.f, rb = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        // a = 0 where a sequence starts: no gradient flows to the previous sequence's states, nor into dA / ddt
        a[i] = carry[i] ? exp2f(dt[i] * A2) : 0.f;
        bx[i] = dt[i] * Bv[i] * uv[i];
        fb = apply_map(a[i], bx[i], fb);
        fa *= a[i];
      }
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        rb = a[i] == 0.f ? 0.f : a[i] * (rb + Cv[i] * dy[i]);  // (no 0 * inf: see apply_map)
        ra *= a[i];
      }
      warp_scan_forward(fa, fb);
      warp_scan_reverse(ra, rb);
      float fex_a = __shfl_up_sync(kFullMask, fa, 1), fex_b = __shfl_up_sync(kFullMask, fb, 1);
      float rex_a = __shfl_down_sync(kFullMask, ra, 1), rex_b = __shfl_down_sync(kFullMask, rb, 1);
      if (lane == 0) fex_a = 1.f, fex_b = 0.f;
      if (lane == 31) rex_a = 1.f, rex_b = 0.f;
      float2* ftot = fwd_total[step & 1];
      float2* rtot = rev_total[step & 1];
      if (lane == 31) ftot[warp] = make_float2(fa, fb);
      if (lane == 0) rtot[warp] = make_float2(ra, rb);
      __syncthreads();

      // State just before this thread's first timestep, from the stored chunk-entry state.
      float x = p.chunk_states_in[(size_t(row) * p.nchunks + chunk) * N + n];
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 t = ftot[w];
        if (w < warp) x = apply_map(t.x, t.y, x);
      }
      x = apply_map(fex_a, fex_b, x);
      // q entering this thread's last timestep from the right, and q leaving the chunk's first timestep.
      const float q_chunk = q_in_chunk[n];
      float q = q_chunk, q_start = q_chunk;
#pragma unroll
      for (int w = kWarps - 1; w >= 0; --w) {
        const float2 t = rtot[w];
        if (w > warp) q = apply_map(t.x, t.y, q);
        q_start = apply_map(t.x, t.y, q_start);
      }
      q = apply_map(rex_a, rex_b, q);
      if (tid == 0) {
        q_out_chunk[n] = q_start;
        if (chunk == 0 && p.dinitial_state) p.dinitial_state[size_t(row) * N + n] = q_start;
      }

      float x_prev[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        x_prev[i] = x;
        x = apply_map(a[i], bx[i], x);
      }
      float dA_part = 0.f, dB_part = 0.f, dC_part = 0.f;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float x_t = apply_map(a[i], bx[i], x_prev[i]);
        y[i] += Cv[i] * x_t;
        const float g_t = q + Cv[i] * dy[i];
        q = a[i] == 0.f ? 0.f : a[i] * g_t;
        const float dB_t = g_t * dt[i] * uv[i];
        const float dC_t = dy[i] * x_t;
        du[i] += g_t * dt[i] * Bv[i];
        const float ax = a[i] == 0.f ? 0.f : a[i] * x_prev[i];  // the decay's term: none where the state restarts
        ddt[i] += g_t * (An * ax + Bv[i] * uv[i]);
        dA_part += g_t * dt[i] * ax;
        if (t0 + i < L) {
          if (dB_tok) atomicAdd(dB_tok + size_t(n) * L + t0 + i, dB_t);
          if (dC_tok) atomicAdd(dC_tok + size_t(n) * L + t0 + i, dC_t);
        }
        dB_part += dB_t;  // zero past the end (dt = 0) and unused for per-token B
        dC_part += dC_t;
      }
      dA_part = warp_sum(dA_part);
      if (!dB_tok) dB_part = warp_sum(dB_part);
      if (!dC_tok) dC_part = warp_sum(dC_part);
      if (lane == 0) {
        atomicAdd(dA_acc + n, dA_part);
        if (!dB_tok) atomicAdd(dB_acc + n, dB_part);
        if (!dC_tok) atomicAdd(dC_acc + n, dC_part);
      }
    }

    float ddelta_v[kItems], dz_v[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      y[i] += D * uv[i];
      du[i] += D * dy[i];
      dD_part += dy[i] * uv[i];
      // d softplus(v) / dv = sigmoid(v); above the threshold softplus is the identity.
      ddelta_v[i] = p.delta_softplus && pre[i] <= 20.f ? ddt[i] * sigmoid(pre[i]) : ddt[i];
      if (t0 + i < L) dbias_part += ddelta_v[i];
    }
    store_run(static_cast<T*>(p.du) + row_off, t0, L, p.vec, du);
    store_run(static_cast<T*>(p.ddelta) + row_off, t0, L, p.vec, ddelta_v);
    if (z) {
      float dout_v[kItems];  // reloaded (L1/L2 hit) rather than kept live through the n loop: fewer registers
      load_run(dout, t0, L, p.vec, dout_v);
#pragma unroll
      for (int i = 0; i < kItems; ++i) dz_v[i] = dout_v[i] * y[i] * silu_grad(zv[i]);
      store_run(static_cast<T*>(p.dz) + row_off, t0, L, p.vec, dz_v);
    }
  }

  // CTA-wide sums of dD and ddelta_bias, then one atomic per CTA (the batch's rows of a channel meet there).
  dD_part = warp_sum(dD_part);
  dbias_part = warp_sum(dbias_part);
  if (lane == 0) reduce_buf[0][warp] = dD_part, reduce_buf[1][warp] = dbias_part;
  __syncthreads();
  if (tid == 0) {
    float sD = 0.f, sbias = 0.f;
    for (int w = 0; w < kWarps; ++w) sD += reduce_buf[0][w], sbias += reduce_buf[1][w];
    if (p.dD) atomicAdd(p.dD + d, sD);
    if (p.ddelta_bias) atomicAdd(p.ddelta_bias + d, sbias);
  }
  for (int n = tid; n < N; n += kThreads) {
    atomicAdd(p.dA + size_t(d) * N + n, dA_acc[n]);
    if (!p.B_per_token) atomicAdd(p.dB + size_t(d) * N + n, dB_acc[n]);
    if (!p.C_per_token) atomicAdd(p.dC + size_t(d) * N + n, dC_acc[n]);
  }
}

template <typename T>
void launch_selective_scan_bwd(const ScanBwdParams& p, cudaStream_t stream) {
  const size_t smem = 5 * size_t(p.dstate) * sizeof(float);
  selective_scan_bwd_kernel<T><<<p.batch * p.dim, kThreads, smem, stream>>>(p);
}

}  // namespace llmkernels::scan
