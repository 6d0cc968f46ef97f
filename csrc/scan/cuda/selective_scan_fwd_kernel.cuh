// Selective scan forward (Mamba's S6): a chunked kernel, one CTA per (batch, channel) row, for every case (and
// the backward's recompute of chunk states), and below it a channel-parallel kernel that the launcher picks for
// the large dstate-16 per-token case (see use_wide_scan).
//
// Math, per channel d and state index n (dt = softplus(delta + delta_bias) when asked):
//   x_t[n] = exp(dt_t * A[d, n]) * x_{t-1}[n] + dt_t * B_t[n] * u_t,   x_{-1} = initial_state (or 0)
//   y_t = sum_n C_t[n] * x_t[n] + D[d] * u_t,   out_t = y_t * silu(z_t) when z is given.
//
// Tiling: the row's seqlen is cut into chunks of kChunk = kThreads * kItems timesteps, walked in order. Each
// thread loads its kItems consecutive timesteps of u, delta (and z) once per chunk with 16-byte vector loads
// and keeps them in registers. For every state index n the thread forms its kItems affine maps
// (a, b) = (exp(dt A), dt B u), composes them, and the CTA scans the 128 thread aggregates (warp shuffles,
// then the 4 warp totals through shared memory), starting from the state that entered the chunk. Each
// thread then replays its run from its exclusive prefix and accumulates C_t[n] x_t[n] into y in registers.
// The state leaving the chunk (one float per n) waits in shared memory for the next chunk. All fp32.
//
// Speed: u, delta, z, out are read/written once (8 bytes per timestep in fp16); B/C per token are shared by the
// channels of a group and mostly come from L2. Per timestep and state index the kernel issues one exp2 (MUFU,
// 16 per clock per SM on H100) and ~6 FMA-pipe instructions; the block scan adds 12 shuffles and one barrier
// per (chunk, n) per thread, amortised over kItems = 8 timesteps. At batch 8, dim 5120, seqlen 2048, dstate 16
// (fp16) that is ~0.2 ms of HBM traffic against ~0.36 ms of exp2 / instruction issue: issue-bound, at roughly
// half of copy bandwidth (the target is >= 50%). Replacing some exp2 by FMA polynomials does not pay here: the
// FMA pipe is nearly as loaded as MUFU. Larger dstate is proportionally more compute-bound.
// Measured on H100 (bf16, batch 8, dim 5120, seqlen 2048): 1.46 ms, not 0.4: the per-(chunk, n) barrier
// and block scan serialise, and each CTA re-reads its row's B/C slab from L2 (see the wide kernel below).
#pragma once

#include "scan/cuda/scan_common.cuh"

namespace llmkernels::scan {

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(const ScanFwdParams p) {
  // running[2][dstate]: the state entering the current chunk, double-buffered by chunk parity so that thread 0
  // can write the next chunk's while the others still read this one's.
  extern __shared__ float running[];
  __shared__ float2 warp_total[2][kWarps];  // double-buffered by scan step parity: one barrier per step suffices

  const int row = blockIdx.x;  // batch * dim + channel
  const int b = row / p.dim, d = row % p.dim;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int L = p.seqlen, N = p.dstate;

  const T* u = static_cast<const T*>(p.u) + size_t(row) * L;
  const T* delta = static_cast<const T*>(p.delta) + size_t(row) * L;
  const T* z = p.z ? static_cast<const T*>(p.z) + size_t(row) * L : nullptr;
  const float* A = p.A + size_t(d) * N;
  // Start of this row's (batch, group) B/C slabs.
  const size_t B_slab = bc_slab(b, d, p.dim, p.B_ngroups, N, L), C_slab = bc_slab(b, d, p.dim, p.C_ngroups, N, L);
  const T* B_tok = p.B_per_token ? static_cast<const T*>(p.B) + B_slab : nullptr;
  const T* C_tok = p.C_per_token ? static_cast<const T*>(p.C) + C_slab : nullptr;
  const float* B_const = p.B_per_token ? nullptr : static_cast<const float*>(p.B) + size_t(d) * N;
  const float* C_const = p.C_per_token ? nullptr : static_cast<const float*>(p.C) + size_t(d) * N;
  const float D = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int32_t* seq_row = p.seq_idx ? p.seq_idx + size_t(b) * L : nullptr;

  for (int n = tid; n < N; n += kThreads) running[n] = p.initial_state ? p.initial_state[size_t(row) * N + n] : 0.f;
  __syncthreads();

  int step = 0;  // counts (chunk, n) scan steps, selects the warp_total buffer
  for (int chunk = 0; chunk < p.nchunks; ++chunk) {
    const int t0 = chunk * kChunk + tid * kItems;
    const float* state_in = running + (chunk & 1) * N;
    float* state_out = running + ((chunk + 1) & 1) * N;

    float uv[kItems], dt[kItems], dtu[kItems], y[kItems];
    bool carry[kItems];
    load_run(u, t0, L, p.vec, uv);
    load_run(delta, t0, L, p.vec, dt);
    load_carry(seq_row, t0, L, carry);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float v = dt[i] + bias;
      // Past the end dt = 0 makes the step (1, 0), the identity, so the padded tail leaves the state alone.
      dt[i] = t0 + i < L ? (p.delta_softplus ? softplus(v) : v) : 0.f;
      dtu[i] = dt[i] * uv[i];  // hoisted out of the n loop: b = dt u B
      y[i] = 0.f;
    }

    for (int n = 0; n < N; ++n, ++step) {
      const float A2 = A[n] * kLog2e;  // exp(dt A) = exp2(dt A log2 e)
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

      float a[kItems], bx[kItems];
      float agg_a = 1.f, agg_b = 0.f;  // this thread's kItems steps composed
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        // a = 0 where a sequence starts: the composed maps then drop everything before it
        a[i] = carry[i] ? exp2f(dt[i] * A2) : 0.f;
        bx[i] = dtu[i] * Bv[i];
        agg_b = apply_map(a[i], bx[i], agg_b);
        agg_a *= a[i];
      }
      warp_scan_forward(agg_a, agg_b);
      // Exclusive prefix within the warp: the inclusive result of the previous lane.
      float ex_a = __shfl_up_sync(kFullMask, agg_a, 1);
      float ex_b = __shfl_up_sync(kFullMask, agg_b, 1);
      if (lane == 0) ex_a = 1.f, ex_b = 0.f;
      float2* totals = warp_total[step & 1];
      if (lane == 31) totals[warp] = make_float2(agg_a, agg_b);
      __syncthreads();

      const float x_chunk = state_in[n];
      float x = x_chunk, x_end = x_chunk;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 t = totals[w];
        if (w < warp) x = apply_map(t.x, t.y, x);
        x_end = apply_map(t.x, t.y, x_end);
      }
      if (tid == 0) {
        state_out[n] = x_end;
        if (p.chunk_states) p.chunk_states[(size_t(row) * p.nchunks + chunk) * N + n] = x_chunk;
      }
      x = apply_map(ex_a, ex_b, x);  // the state just before this thread's first timestep
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        x = apply_map(a[i], bx[i], x);
        y[i] += Cv[i] * x;
      }
    }

    if (p.out) {
      float zv[kItems];
      if (z) load_run(z, t0, L, p.vec, zv);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        y[i] += D * uv[i];
        if (z) y[i] *= silu(zv[i]);
      }
      store_run(static_cast<T*>(p.out) + size_t(row) * L, t0, L, p.vec, y);
    }
  }

  __syncthreads();
  const float* final_state = running + (p.nchunks & 1) * N;
  for (int n = tid; n < N; n += kThreads) p.last_state[size_t(row) * N + n] = final_state[n];
}

// ---------------------------------------------------------------------------------------------------------------
// Channel-parallel forward for the common large case (dstate 16, per-token or grouped B/C, aligned rows, many
// (batch, channel) rows, no chunk states). The chunked kernel above is limited by its per-(chunk, n) block scan
// (shuffles, a barrier and a shared-memory round trip for each of the 16 states per 8 timesteps) and by every
// CTA re-reading the whole B/C slab of its row from L2 (2 * 16 * seqlen elements per channel: 5.4 GB at batch 8,
// dim 5120, seqlen 2048, several times the HBM traffic). Here a pair of threads walks one channel sequentially in
// time, each holding 8 of its 16 states in registers, so there is no scan to combine: the 8 state recurrences
// are independent chains that hide each other's latency. A CTA covers kWideCh channels of one (batch, group) and
// walks seqlen in tiles of kWideT timesteps, staged through shared memory:
//   load:     u, delta, z tiles (channel-major, 16-byte cp.async, coalesced) and the group's B/C tile once for all
//             kWideCh channels; the next tile's loads are issued before this tile's scan, so they overlap it;
//   prepare:  dt = softplus(delta + bias) and dt * u per (channel, t) in fp32, once per element (not once per
//             thread of the pair), and B/C transposed to [t][n] fp32 so the inner loop reads them as broadcasts;
//   scan:     per t and state: one exp2 (MUFU), one FMUL for dt * A2, FMUL + FFMA for the state, FFMA for y;
//             the pair's two partial y meet with one shuffle per timestep and y overwrites dt * u in shared memory;
//   store:    out = (y + D u) * silu(z), 16-byte vector stores.
// Per state update: 1 MUFU and 4 FP32-pipe instructions; per (channel, t) the prepare and store phases add ~3
// MUFU (softplus, silu) and ~50 other instructions. SFU-bound near 0.36 ms x 19/16 = 0.43 ms for batch 8,
// dim 5120, seqlen 2048, dstate 16 (640 CTAs, 5 per SM by registers (96) and shared memory (44 KB, 16-bit)),
// against ~0.23 ms of HBM traffic. Measured on H100 (2026-11-23): 0.751 ms (895 GB/s, 30% of copy bandwidth;
// the chunked kernel 1.46 ms): 1.75x the estimate, so something other than the SFU limits it (not profiled yet).
constexpr int kWideN = 16;                     // dstate of this path
constexpr int kWideHalf = kWideN / 2;          // states per thread: a channel's two threads hold 8 each
constexpr int kWideCh = 64;                    // channels per CTA
constexpr int kWideThreads = 2 * kWideCh;
constexpr int kWideT = 32;                     // timesteps per tile
constexpr int kWideBCP = 2 * kWideN + 4;       // fp32 row stride of the [t][B | C] tile
constexpr int kWideMinRows = 16384;            // below ~2 CTAs per SM the chunked kernel keeps more warps busy

// Shared memory: u and z double-buffered (the next tile's arrive during this one's scan and store), delta and
// B/C single (the next tile's arrive once this one's are converted), then fp32 dt, dt*u (y) and [t][B | C].
template <typename T>
constexpr size_t wide_smem_bytes() {
  return (5 * kWideCh + 2 * kWideN) * kWideT * sizeof(T) + (2 * kWideCh * kWideT + kWideT * kWideBCP) * sizeof(float);
}

// Index of (channel, t) in a [kWideCh][kWideT] fp32 tile whose float4 groups are XOR-swizzled by channel: the
// scan's float4 reads of 16 channels at one t spread over 8 bank groups (2 wavefronts, the minimum).
__device__ __forceinline__ int wide_swz(int ch, int t) {
  return ch * kWideT + ((((t >> 2) ^ ch) & (kWideT / 4 - 1)) << 2) + (t & 3);
}

// 16-byte global -> shared copy that bypasses registers; src_bytes 0 fills zeros (nothing is read).
__device__ __forceinline__ void wide_cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void wide_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void wide_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// 16-byte vectors of one row's tile: kVec per row, kPerVec timesteps each.
template <typename T>
struct WideVec {
  static constexpr int kPerVec = 16 / sizeof(T);
  static constexpr int kVec = kWideT / kPerVec;
  static_assert(kWideT % kPerVec == 0 && kPerVec % 4 == 0, "tiles must be whole vectors of whole float4s");
};

template <typename T>
__global__ void __launch_bounds__(kWideThreads, 5) selective_scan_fwd_wide_kernel(const ScanFwdParams p) {
  using V = WideVec<T>;
  constexpr int kPerVec = V::kPerVec, kVec = V::kVec, kTile = kWideCh * kWideT;
  extern __shared__ float4 smem_f4[];
  T* uz_raw = reinterpret_cast<T*>(smem_f4);  // [stage 2][u, z][kWideCh][kWideT], as loaded
  T* d_raw = uz_raw + 4 * kTile;              // [kWideCh][kWideT]
  T* bc_raw = d_raw + kTile;                  // [B, C][kWideN][kWideT]
  float* dt_s = reinterpret_cast<float*>(bc_raw + 2 * kWideN * kWideT);  // swizzled [kWideCh][kWideT]
  float* dtu_s = dt_s + kTile;  // swizzled [kWideCh][kWideT]: dt * u, then y
  float* bc_s = dtu_s + kTile;  // [kWideT][kWideBCP]: B[0..16), C[16..32)
  __shared__ float D_s[kWideCh], bias_s[kWideCh];

  const int L = p.seqlen;
  const int blocks_per_batch = p.dim / kWideCh;
  const int b = blockIdx.x / blocks_per_batch, d0 = (blockIdx.x % blocks_per_batch) * kWideCh;
  const size_t row0 = size_t(b) * p.dim + d0;  // the CTA's first (batch, channel) row
  const int tid = threadIdx.x;

  const T* u = static_cast<const T*>(p.u) + row0 * L;
  const T* delta = static_cast<const T*>(p.delta) + row0 * L;
  const T* z = p.z ? static_cast<const T*>(p.z) + row0 * L : nullptr;
  T* out = static_cast<T*>(p.out) + row0 * L;
  // The host checks that all kWideCh channels fall in one group of B and one of C.
  const T* B_tok = static_cast<const T*>(p.B) + bc_slab(b, d0, p.dim, p.B_ngroups, kWideN, L);
  const T* C_tok = static_cast<const T*>(p.C) + bc_slab(b, d0, p.dim, p.C_ngroups, kWideN, L);

  // Tile loads. Rows hold whole vectors (host: vec), so a vector lies entirely before or past the end (zeros).
  auto load_uz = [&](int t0, int stage) {
    T* dst = uz_raw + stage * 2 * kTile;
    for (int i = tid; i < kWideCh * kVec; i += kWideThreads) {
      const int ch = i / kVec, t = t0 + (i % kVec) * kPerVec;
      const bool in = t < L;
      const size_t off = in ? size_t(ch) * L + t : 0;
      wide_cp_async16(dst + i * kPerVec, u + off, in);
      if (z) wide_cp_async16(dst + kTile + i * kPerVec, z + off, in);
    }
  };
  auto load_dbc = [&](int t0) {
    for (int i = tid; i < kWideCh * kVec; i += kWideThreads) {
      const int ch = i / kVec, t = t0 + (i % kVec) * kPerVec;
      const bool in = t < L;
      wide_cp_async16(d_raw + i * kPerVec, delta + (in ? size_t(ch) * L + t : 0), in);
    }
    for (int i = tid; i < 2 * kWideN * kVec; i += kWideThreads) {
      const int which = i / (kWideN * kVec), r = i % (kWideN * kVec);
      const int n = r / kVec, t = t0 + (r % kVec) * kPerVec;
      const bool in = t < L;
      wide_cp_async16(bc_raw + i * kPerVec, (which ? C_tok : B_tok) + (in ? size_t(n) * L + t : 0), in);
    }
  };

  if (L > 0) {
    load_uz(0, 0);
    load_dbc(0);
    wide_cp_async_commit();
  }
  if (tid < kWideCh) {
    D_s[tid] = p.D ? p.D[d0 + tid] : 0.f;
    bias_s[tid] = p.delta_bias ? p.delta_bias[d0 + tid] : 0.f;
  }

  // This thread's channel and half of the states.
  const int c = tid >> 1, h = tid & 1;
  float A2[kWideHalf], x[kWideHalf];
#pragma unroll
  for (int k = 0; k < kWideHalf; ++k) {
    const int n = h * kWideHalf + k;
    A2[k] = p.A[size_t(d0 + c) * kWideN + n] * kLog2e;  // exp(dt A) = exp2(dt A log2 e)
    x[k] = p.initial_state ? p.initial_state[(row0 + c) * kWideN + n] : 0.f;
  }

  for (int t0 = 0, stage = 0; t0 < L; t0 += kWideT, stage ^= 1) {
    const T* u_raw = uz_raw + stage * 2 * kTile;
    const T* z_raw = u_raw + kTile;
    // This tile's loads have landed (each thread waits for its own copies, the barrier for everyone's); the
    // barrier also ends the previous tile's store phase, which read dtu_s (y) and the other u/z stage.
    wide_cp_async_wait_all();
    __syncthreads();

    // Prepare dt and dt * u (fp32). Past the end dt = 0: the step is the identity, so the state is unchanged.
    for (int i = tid; i < kWideCh * kVec; i += kWideThreads) {
      const int ch = i / kVec, j = (i % kVec) * kPerVec;
      union {
        uint4 raw;
        T e[kPerVec];
      } uv, dv;
      uv.raw = reinterpret_cast<const uint4*>(u_raw)[i];
      dv.raw = reinterpret_cast<const uint4*>(d_raw)[i];
      const float bias = bias_s[ch];
#pragma unroll
      for (int q = 0; q < kPerVec; q += 4) {
        float dt4[4], dtu4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = to_float(dv.e[q + e]) + bias;
          dt4[e] = t0 + j + q + e < L ? (p.delta_softplus ? softplus(v) : v) : 0.f;
          dtu4[e] = dt4[e] * to_float(uv.e[q + e]);
        }
        const int at = wide_swz(ch, j + q);
        *reinterpret_cast<float4*>(dt_s + at) = make_float4(dt4[0], dt4[1], dt4[2], dt4[3]);
        *reinterpret_cast<float4*>(dtu_s + at) = make_float4(dtu4[0], dtu4[1], dtu4[2], dtu4[3]);
      }
    }
    // B/C to [t][n] fp32: consecutive lanes read consecutive timesteps of one state (conflict-free).
    for (int i = tid; i < 2 * kWideN * kWideT; i += kWideThreads) {
      const int which = i / (kWideN * kWideT), r = i % (kWideN * kWideT);
      const int n = r / kWideT, t = r % kWideT;
      bc_s[t * kWideBCP + which * kWideN + n] = to_float(bc_raw[i]);
    }
    __syncthreads();

    // delta and B/C are converted: fetch the next tile's, and its u and z into the other stage (whose last
    // reader, the previous tile's store phase, finished before the barrier at the top).
    if (t0 + kWideT < L) {
      load_uz(t0 + kWideT, stage ^ 1);
      load_dbc(t0 + kWideT);
      wide_cp_async_commit();
    }

    // Scan this tile: the channel's two threads run their 8 states each over the kWideT timesteps.
#pragma unroll 1
    for (int tq = 0; tq < kWideT; tq += 4) {
      const int at = wide_swz(c, tq);
      const float4 dt4 = *reinterpret_cast<const float4*>(dt_s + at);
      const float4 dtu4 = *reinterpret_cast<const float4*>(dtu_s + at);
      const float dtv[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, dtuv[4] = {dtu4.x, dtu4.y, dtu4.z, dtu4.w};
      float y[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float* bc = bc_s + (tq + e) * kWideBCP + h * kWideHalf;
        const float4 B0 = *reinterpret_cast<const float4*>(bc), B1 = *reinterpret_cast<const float4*>(bc + 4);
        const float4 C0 = *reinterpret_cast<const float4*>(bc + kWideN);
        const float4 C1 = *reinterpret_cast<const float4*>(bc + kWideN + 4);
        const float Bv[kWideHalf] = {B0.x, B0.y, B0.z, B0.w, B1.x, B1.y, B1.z, B1.w};
        const float Cv[kWideHalf] = {C0.x, C0.y, C0.z, C0.w, C1.x, C1.y, C1.z, C1.w};
        float y0 = 0.f, y1 = 0.f;  // two accumulators: shorter dependency chain
#pragma unroll
        for (int k = 0; k < kWideHalf; ++k) {
          x[k] = exp2f(dtv[e] * A2[k]) * x[k] + dtuv[e] * Bv[k];
          if (k % 2) {
            y1 += Cv[k] * x[k];
          } else {
            y0 += Cv[k] * x[k];
          }
        }
        y[e] = y0 + y1;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) y[e] += __shfl_xor_sync(kFullMask, y[e], 1);  // the other half's states
      // Both threads of the pair have consumed dtu_s there (the shuffle orders them), so y may replace it.
      if (h == 0) *reinterpret_cast<float4*>(dtu_s + at) = make_float4(y[0], y[1], y[2], y[3]);
    }
    __syncthreads();

    // Store out = (y + D u) * silu(z) for the timesteps before the end.
    for (int i = tid; i < kWideCh * kVec; i += kWideThreads) {
      const int ch = i / kVec, j = (i % kVec) * kPerVec;
      if (t0 + j >= L) continue;
      union {
        uint4 raw;
        T e[kPerVec];
      } uv, zv, ov;
      uv.raw = reinterpret_cast<const uint4*>(u_raw)[i];
      if (z) zv.raw = reinterpret_cast<const uint4*>(z_raw)[i];
      const float D = D_s[ch];
#pragma unroll
      for (int q = 0; q < kPerVec; q += 4) {
        const float4 y4 = *reinterpret_cast<const float4*>(dtu_s + wide_swz(ch, j + q));
        const float yv[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float o = yv[e] + D * to_float(uv.e[q + e]);
          if (z) o *= silu(to_float(zv.e[q + e]));
          ov.e[q + e] = from_float<T>(o);
        }
      }
      *reinterpret_cast<uint4*>(out + size_t(ch) * L + t0 + j) = ov.raw;
    }
  }

#pragma unroll
  for (int k = 0; k < kWideHalf; ++k) p.last_state[(row0 + c) * kWideN + h * kWideHalf + k] = x[k];
}

// Whether the channel-parallel kernel applies: see its comment for the conditions' reasons.
inline bool use_wide_scan(const ScanFwdParams& p) {
  return p.dstate == kWideN && p.vec && p.B_per_token && p.C_per_token && p.out != nullptr &&
         p.seq_idx == nullptr && p.chunk_states == nullptr && p.dim % kWideCh == 0 && (p.dim / p.B_ngroups) % kWideCh == 0 &&
         (p.dim / p.C_ngroups) % kWideCh == 0 && int64_t(p.batch) * p.dim >= kWideMinRows;
}

template <typename T>
void launch_selective_scan_fwd(const ScanFwdParams& p, cudaStream_t stream) {
  if (use_wide_scan(p)) {
    constexpr size_t smem = wide_smem_bytes<T>();
    if constexpr (smem > 48 * 1024)  // fp32: dynamic shared memory above 48 KB needs the opt-in
      cudaFuncSetAttribute(selective_scan_fwd_wide_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    // 5 CTAs of ~44 KB per SM (16-bit) need the largest shared-memory carveout; ask for it rather than rely on
    // the driver's choice.
    cudaFuncSetAttribute(selective_scan_fwd_wide_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                         int(cudaSharedmemCarveoutMaxShared));
    selective_scan_fwd_wide_kernel<T><<<p.batch * (p.dim / kWideCh), kWideThreads, smem, stream>>>(p);
    return;
  }
  const size_t smem = 2 * size_t(p.dstate) * sizeof(float);
  selective_scan_fwd_kernel<T><<<p.batch * p.dim, kThreads, smem, stream>>>(p);
}

}  // namespace llmkernels::scan
