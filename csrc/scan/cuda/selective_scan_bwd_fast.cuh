// Channel-parallel selective scan backward for the large common case (dstate 16, per-token or grouped B/C,
// rows of whole 16-byte vectors, dim a multiple of 64 per group), taken when LLMKERNELS_SCAN_BWD=fast.
//
// Why the chunked backward (selective_scan_bwd_kernel.cuh) takes ~35 ms at batch 8, dim 5120, seqlen 2048 while
// the forward takes 0.75 ms: per-token dB/dC are accumulated with one fp32 atomicAdd per (channel, state, token)
// into the group's B_t/C_t gradient, 2 * 16 * 84M = 2.7e9 atomics, each address hit by all 5120 channels of the
// batch, and a warp's atomics are strided by kItems (8 floats: one 32-byte sector per lane instead of 4 sectors
// per warp). At ~80 G contended atomics/s in L2 that alone is ~33 ms; the recompute pass, the per-(chunk, state)
// block scans (two per step here) and the B/C re-reads from L2 are the forward's ~1.5 ms twice over.
//
// Here, as in the forward's wide kernel, a CTA holds kFastCh channels of one (batch, group), two threads per
// channel with 8 states each, walking time sequentially, so there is no scan to combine and the channel sum of
// dB_t/dC_t becomes an in-CTA reduction over 64 channels:
//   phase 1 (forward): over tiles of kFastT timesteps, stores the state entering each tile (checkpoint, fp32,
//            [CTA][tile][channel][16], read back by the same thread, so no fence is needed);
//   phase 2 (backward), tiles from the last: from the tile's checkpoint, pass A recomputes the state entering
//            each sub-tile of kFastS steps into shared memory; then per sub-tile, from the last, pass B recomputes
//            the sub-tile's a_t = exp(dt A) and x_t into registers and the reverse sweep runs
//              g = q + C_t dy_t,  dC_t = dy_t x_t,  dB_t = g dt_t u_t,  sum_n g B_t,  sum_n A g a_t x_{t-1},
//              dA += g dt_t a_t x_{t-1},  y_t += C_t x_t,  q = a_t g     (q starts at dlast_state, ends dinit)
//            dB_t/dC_t (32 values per channel and t) are summed over the CTA's channels through shared memory
//            (two timesteps per round) and written once per CTA to a partial buffer [CTA][t][32];
//   finish:  small kernels sum the partials over a group's CTAs (dB, dC) and over batch (dA, dD, ddelta_bias).
// Every sum has a fixed order: the gradients are deterministic (no atomics), at the cost of writing and reading
// the dB/dC partials (2 bytes per (batch, channel, t)) and the checkpoints (4 bytes).
//
// Cost per (batch, channel, t, state): 3 exp2 (phase 1, pass A, pass B) and ~25 other instructions; per
// (batch, channel, t) ~30 bytes of HBM traffic in 16-bit (u, delta twice; dout, z in; du, ddelta, dz out; the
// checkpoint and the dB/dC partials written and read back). Estimate for batch 8, dim 5120, seqlen 2048,
// dstate 16: 1.34e9 (t, n, channel) x ~28 issue slots / (128 per clock x 132 SMs x 1.75 GHz) = 1.3 ms
// issue-bound (HBM: 2.5 GB, 0.9 ms, overlapped), ~2.2 ms if it runs at the forward wide kernel's measured
// efficiency (0.75 ms vs 0.43 estimated). Registers 168 (3 CTAs of 128 threads per SM; 12 bytes spilled), shared
// memory 61 KB (16-bit) / 70 KB (fp32) per CTA. Not measured yet.
// Scratch: the checkpoints take 4 bytes and the partials 2 bytes per (batch, channel, t) (0.5 GB for the case
// above); 32-step checkpoints would halve the first at the cost of a 32 KB sub-tile entry buffer.
#pragma once

#include "scan/cuda/scan_common.cuh"
#include "scan/cuda/scan_launch.h"

namespace llmkernels::scan {

// kFastN (16 states), kFastCh (64 channels per CTA), kFastT (16 timesteps per tile): scan_launch.h.
constexpr int kFastHalf = kFastN / 2;        // states per thread
constexpr int kFastThreads = 2 * kFastCh;
constexpr int kFastS = 4;                    // timesteps per sub-tile (registers: a and x for kFastS x 8 states)
constexpr int kFastSub = kFastT / kFastS;
constexpr int kFastBCP = 2 * kFastN + 4;     // fp32 row stride of the [t][B | C] tile
constexpr int kFastRedP = 2 * kFastN + 4;    // fp32 row stride of the reduction buffer: conflict-free float4s
constexpr int kFastTile = kFastCh * kFastT;  // elements of a [channel][t] tile
static_assert(kFastS == 4, "a sub-tile is one float4 of a [channel][t] row");

template <typename T>
struct FastVec {
  static constexpr int kPerVec = 16 / sizeof(T);
  static constexpr int kVec = kFastT / kPerVec;  // 16-byte vectors per row of a tile
  static_assert(kFastT % kPerVec == 0 && kPerVec % 4 == 0, "tiles must be whole vectors of whole float4s");
};

// Shared memory: raw tiles of u, delta, dout, z ([channel][t]) and B, C ([n][t]) as loaded, fp32 tiles of dt, u,
// dy = dout silu(z) and zg = dout silu'(z) (reused for du, ddelta, dz), B/C as [t][n] fp32, the sub-tile entry
// states ([sub][2][thread][4]) and the dB/dC reduction buffer ([2 timesteps][channel][kFastRedP]).
template <typename T>
constexpr size_t fast_bwd_smem_bytes() {
  return (4 * kFastTile + 2 * kFastN * kFastT) * sizeof(T) +
         (4 * kFastTile + kFastT * kFastBCP + kFastSub * kFastN * kFastCh + 2 * kFastCh * kFastRedP) * sizeof(float);
}

// Index of (channel, t) in a [kFastCh][kFastT] fp32 tile with its float4s XOR-swizzled so that the four channels
// of a quarter warp (two threads each, same address) read four different bank groups.
__device__ __forceinline__ int fast_swz(int ch, int t) {
  return ch * kFastT + ((((t >> 2) ^ (ch >> 1)) & (kFastT / 4 - 1)) << 2) + (t & 3);
}

__device__ __forceinline__ void fast_cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void fast_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void fast_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T>
__global__ void __launch_bounds__(kFastThreads, 3) selective_scan_bwd_fast_kernel(const ScanBwdFastParams p) {
  using V = FastVec<T>;
  constexpr int kPerVec = V::kPerVec, kVec = V::kVec;
  extern __shared__ float4 smem_f4[];
  T* u_raw = reinterpret_cast<T*>(smem_f4);
  T* d_raw = u_raw + kFastTile;
  T* o_raw = d_raw + kFastTile;   // dout
  T* z_raw = o_raw + kFastTile;
  T* bc_raw = z_raw + kFastTile;  // [B, C][kFastN][kFastT]
  float* dt_s = reinterpret_cast<float*>(bc_raw + 2 * kFastN * kFastT);  // then du
  float* u_s = dt_s + kFastTile;
  float* dy_s = u_s + kFastTile;   // then ddelta
  float* zg_s = dy_s + kFastTile;  // then dz
  float* bc_s = zg_s + kFastTile;  // [kFastT][kFastBCP]: B[0..16), C[16..32)
  float* sub_s = bc_s + kFastT * kFastBCP;
  float* red_s = sub_s + kFastSub * kFastN * kFastCh;
  __shared__ float bias_s[kFastCh];

  const int L = p.seqlen, ntiles = (L + kFastT - 1) / kFastT;
  const int blocks_per_batch = p.dim / kFastCh;
  const int b = blockIdx.x / blocks_per_batch, d0 = (blockIdx.x % blocks_per_batch) * kFastCh;
  const size_t row0 = size_t(b) * p.dim + d0;
  const int tid = threadIdx.x, c = tid >> 1, h = tid & 1;

  const T* u = static_cast<const T*>(p.u) + row0 * L;
  const T* delta = static_cast<const T*>(p.delta) + row0 * L;
  const T* z = p.z ? static_cast<const T*>(p.z) + row0 * L : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + row0 * L;
  T* du_g = static_cast<T*>(p.du) + row0 * L;
  T* ddelta_g = static_cast<T*>(p.ddelta) + row0 * L;
  T* dz_g = p.z ? static_cast<T*>(p.dz) + row0 * L : nullptr;
  // The host checks that all kFastCh channels fall in one group of B and one of C.
  const T* B_tok = static_cast<const T*>(p.B) + bc_slab(b, d0, p.dim, p.B_ngroups, kFastN, L);
  const T* C_tok = static_cast<const T*>(p.C) + bc_slab(b, d0, p.dim, p.C_ngroups, kFastN, L);
  float* ckpt = p.ckpt + size_t(blockIdx.x) * ntiles * kFastCh * kFastN + c * kFastN + h * kFastHalf;
  float* part_bc = p.part_bc + size_t(blockIdx.x) * L * 2 * kFastN;

  // Tile loads; phase 1 needs u, delta and B only. Rows hold whole vectors (host: vec), so a vector lies
  // entirely before the end or past it (zero-filled: dt = 0 there, the identity step; dout = 0, no gradient).
  auto load_tile = [&](int t0, bool bwd) {
    for (int i = tid; i < kFastCh * kVec; i += kFastThreads) {
      const int ch = i / kVec, t = t0 + (i % kVec) * kPerVec;
      const bool in = t < L;
      const size_t off = in ? size_t(ch) * L + t : 0;
      fast_cp_async16(u_raw + i * kPerVec, u + off, in);
      fast_cp_async16(d_raw + i * kPerVec, delta + off, in);
      if (bwd) {
        fast_cp_async16(o_raw + i * kPerVec, dout + off, in);
        if (z) fast_cp_async16(z_raw + i * kPerVec, z + off, in);
      }
    }
    for (int i = tid; i < (bwd ? 2 : 1) * kFastN * kVec; i += kFastThreads) {
      const int which = i / (kFastN * kVec), r = i % (kFastN * kVec);
      const int n = r / kVec, t = t0 + (r % kVec) * kPerVec;
      const bool in = t < L;
      fast_cp_async16(bc_raw + i * kPerVec, (which ? C_tok : B_tok) + (in ? size_t(n) * L + t : 0), in);
    }
    fast_cp_async_commit();
  };

  // Raw tiles to fp32: dt = softplus(delta + bias) (0 past the end), u, and for the backward dy, zg.
  auto prepare = [&](int t0, bool bwd) {
    for (int i = tid; i < kFastCh * kVec; i += kFastThreads) {
      const int ch = i / kVec, j = (i % kVec) * kPerVec;
      union {
        uint4 raw;
        T e[kPerVec];
      } uv, dv, ov, zv;
      uv.raw = reinterpret_cast<const uint4*>(u_raw)[i];
      dv.raw = reinterpret_cast<const uint4*>(d_raw)[i];
      if (bwd) {
        ov.raw = reinterpret_cast<const uint4*>(o_raw)[i];
        if (z) zv.raw = reinterpret_cast<const uint4*>(z_raw)[i];
      }
      const float bias = bias_s[ch];
#pragma unroll
      for (int q = 0; q < kPerVec; q += 4) {
        float dt4[4], u4[4], dy4[4], zg4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = to_float(dv.e[q + e]) + bias;
          dt4[e] = t0 + j + q + e < L ? (p.delta_softplus ? softplus(v) : v) : 0.f;
          u4[e] = to_float(uv.e[q + e]);
          dy4[e] = zg4[e] = 0.f;
          if (bwd) {
            const float o = to_float(ov.e[q + e]);
            if (z) {
              const float zz = to_float(zv.e[q + e]), s = sigmoid(zz);
              dy4[e] = o * zz * s;
              zg4[e] = o * s * (1.f + zz * (1.f - s));  // dout silu'(z)
            } else {
              dy4[e] = o;
            }
          }
        }
        const int at = fast_swz(ch, j + q);
        *reinterpret_cast<float4*>(dt_s + at) = make_float4(dt4[0], dt4[1], dt4[2], dt4[3]);
        *reinterpret_cast<float4*>(u_s + at) = make_float4(u4[0], u4[1], u4[2], u4[3]);
        if (bwd) {
          *reinterpret_cast<float4*>(dy_s + at) = make_float4(dy4[0], dy4[1], dy4[2], dy4[3]);
          *reinterpret_cast<float4*>(zg_s + at) = make_float4(zg4[0], zg4[1], zg4[2], zg4[3]);
        }
      }
    }
    // B/C to [t][n] fp32: consecutive lanes read consecutive timesteps of one state.
    for (int i = tid; i < (bwd ? 2 : 1) * kFastN * kFastT; i += kFastThreads) {
      const int which = i / (kFastN * kFastT), r = i % (kFastN * kFastT);
      const int n = r / kFastT, t = r % kFastT;
      bc_s[t * kFastBCP + which * kFastN + n] = to_float(bc_raw[i]);
    }
  };

  // This thread's 8 states of B (which 0) or C (which 1) at tile timestep t, as a broadcast read.
  auto load_bc = [&](int t, int which, float (&v)[kFastHalf]) {
    const float* src = bc_s + t * kFastBCP + which * kFastN + h * kFastHalf;
    const float4 v0 = *reinterpret_cast<const float4*>(src), v1 = *reinterpret_cast<const float4*>(src + 4);
    v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
  };
  // The state across the kFastS steps of sub-tile s (exp2 of dt A, the step, as in the forward).
  float A2[kFastHalf];
  auto advance = [&](int s, float (&x)[kFastHalf]) {
    const int at = fast_swz(c, s * kFastS);
    const float4 dt4 = *reinterpret_cast<const float4*>(dt_s + at), u4 = *reinterpret_cast<const float4*>(u_s + at);
    const float dtv[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, uv[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
    for (int e = 0; e < kFastS; ++e) {
      float Bv[kFastHalf];
      load_bc(s * kFastS + e, 0, Bv);
      const float dtu = dtv[e] * uv[e];
#pragma unroll
      for (int k = 0; k < kFastHalf; ++k) x[k] = exp2f(dtv[e] * A2[k]) * x[k] + dtu * Bv[k];
    }
  };

  if (L > 0) load_tile(0, false);
  if (tid < kFastCh) bias_s[tid] = p.delta_bias ? p.delta_bias[d0 + tid] : 0.f;
  float x[kFastHalf];
#pragma unroll
  for (int k = 0; k < kFastHalf; ++k) {
    const int n = h * kFastHalf + k;
    A2[k] = p.A[size_t(d0 + c) * kFastN + n] * kLog2e;  // exp(dt A) = exp2(dt A log2 e)
    x[k] = p.initial_state ? p.initial_state[(row0 + c) * kFastN + n] : 0.f;
  }

  // Phase 1: checkpoints. Its last iteration prefetches phase 2's first (the last) tile.
  for (int tile = 0; tile < ntiles; ++tile) {
    const int t0 = tile * kFastT;
    fast_cp_async_wait_all();
    __syncthreads();  // the tile has landed, and the previous tile's scan is done with the fp32 tiles
    prepare(t0, false);
    __syncthreads();
    if (tile + 1 < ntiles) {
      load_tile(t0 + kFastT, false);
    } else {
      load_tile(t0, true);
    }
    float* ck = ckpt + size_t(tile) * kFastCh * kFastN;
    *reinterpret_cast<float4*>(ck) = make_float4(x[0], x[1], x[2], x[3]);
    *reinterpret_cast<float4*>(ck + 4) = make_float4(x[4], x[5], x[6], x[7]);
#pragma unroll 1
    for (int s = 0; s < kFastSub; ++s) advance(s, x);
  }

  // Phase 2.
  float q[kFastHalf], dA[kFastHalf];
#pragma unroll
  for (int k = 0; k < kFastHalf; ++k) {
    q[k] = p.dlast_state ? p.dlast_state[(row0 + c) * kFastN + h * kFastHalf + k] : 0.f;
    dA[k] = 0.f;
  }
  float dD_acc = 0.f, dbias_acc = 0.f;  // channel c's, kept by the h = 0 thread
  const float D = p.D ? p.D[d0 + c] : 0.f;
  float* my_sub = sub_s + tid * 4;  // [sub][half][thread][4]
  constexpr int kSubStride = 2 * kFastThreads * 4;

  for (int tile = ntiles - 1; tile >= 0; --tile) {
    const int t0 = tile * kFastT;
    fast_cp_async_wait_all();
    __syncthreads();  // landed; the previous tile's store phase is done with the fp32 tiles
    prepare(t0, true);
    __syncthreads();
    if (tile > 0) load_tile(t0 - kFastT, true);

    // Pass A: the state entering each sub-tile, from the tile's checkpoint (same thread wrote it).
    {
      const float* ck = ckpt + size_t(tile) * kFastCh * kFastN;
      const float4 c0 = *reinterpret_cast<const float4*>(ck), c1 = *reinterpret_cast<const float4*>(ck + 4);
      float xs[kFastHalf] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
#pragma unroll 1
      for (int s = 0; s < kFastSub; ++s) {
        *reinterpret_cast<float4*>(my_sub + s * kSubStride) = make_float4(xs[0], xs[1], xs[2], xs[3]);
        *reinterpret_cast<float4*>(my_sub + s * kSubStride + kFastThreads * 4) = make_float4(xs[4], xs[5], xs[6], xs[7]);
        if (s + 1 < kFastSub) advance(s, xs);
      }
    }

#pragma unroll 1
    for (int s = kFastSub - 1; s >= 0; --s) {
      const int at = fast_swz(c, s * kFastS);
      const float4 dt4 = *reinterpret_cast<const float4*>(dt_s + at), u4 = *reinterpret_cast<const float4*>(u_s + at);
      const float4 dy4 = *reinterpret_cast<const float4*>(dy_s + at);
      const float dtv[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, uv[4] = {u4.x, u4.y, u4.z, u4.w};
      const float dyv[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
      // The sub-tile's entry state, read where needed rather than kept live through the sweep (registers).
      auto load_entry = [&](float (&v)[kFastHalf]) {
        const float4 e0 = *reinterpret_cast<const float4*>(my_sub + s * kSubStride);
        const float4 e1 = *reinterpret_cast<const float4*>(my_sub + s * kSubStride + kFastThreads * 4);
        v[0] = e0.x, v[1] = e0.y, v[2] = e0.z, v[3] = e0.w, v[4] = e1.x, v[5] = e1.y, v[6] = e1.z, v[7] = e1.w;
      };
      float entry[kFastHalf];
      load_entry(entry);
      // Pass B: a_t and x_t of the sub-tile in registers.
      float a[kFastS][kFastHalf], xh[kFastS][kFastHalf];
#pragma unroll
      for (int e = 0; e < kFastS; ++e) {
        float Bv[kFastHalf];
        load_bc(s * kFastS + e, 0, Bv);
        const float dtu = dtv[e] * uv[e];
#pragma unroll
        for (int k = 0; k < kFastHalf; ++k) {
          a[e][k] = exp2f(dtv[e] * A2[k]);
          xh[e][k] = a[e][k] * (e > 0 ? xh[e > 0 ? e - 1 : 0][k] : entry[k]) + dtu * Bv[k];
        }
      }
      // Reverse sweep. sgb = sum_n g B, sag = sum_n A2 g a x_prev, yy = sum_n C x over this thread's states.
      float sgb[kFastS], sag[kFastS], yy[kFastS];
#pragma unroll
      for (int e = kFastS - 1; e >= 0; --e) {
        float Bv[kFastHalf], Cv[kFastHalf], dBv[kFastHalf], dCv[kFastHalf];
        load_bc(s * kFastS + e, 0, Bv);
        load_bc(s * kFastS + e, 1, Cv);
        const float dtu = dtv[e] * uv[e];
        float gb = 0.f, ga = 0.f, y = 0.f;
        if (e == 0) load_entry(entry);
#pragma unroll
        for (int k = 0; k < kFastHalf; ++k) {
          const float g = q[k] + Cv[k] * dyv[e];
          const float gax = g * a[e][k] * (e > 0 ? xh[e > 0 ? e - 1 : 0][k] : entry[k]);
          ga += A2[k] * gax;
          dA[k] += dtv[e] * gax;
          gb += g * Bv[k];
          y += Cv[k] * xh[e][k];
          dBv[k] = g * dtu;
          dCv[k] = dyv[e] * xh[e][k];
          q[k] = a[e][k] * g;
        }
        sgb[e] = gb, sag[e] = ga, yy[e] = y;
        // This channel's dB_t / dC_t into the reduction buffer: [slot][channel][h * 16 + which * 8 + k].
        float* red = red_s + ((e & 1) * kFastCh + c) * kFastRedP + h * 2 * kFastHalf;
        *reinterpret_cast<float4*>(red) = make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
        *reinterpret_cast<float4*>(red + 4) = make_float4(dBv[4], dBv[5], dBv[6], dBv[7]);
        *reinterpret_cast<float4*>(red + 8) = make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
        *reinterpret_cast<float4*>(red + 12) = make_float4(dCv[4], dCv[5], dCv[6], dCv[7]);
        if ((e & 1) == 0) {
          // Two timesteps written: sum over the 64 channels. Thread (group, part): group = (slot, float4 v4 of the
          // 32 values), 8 parts of 8 channels each (channel i * 8 + part: conflict-free), then the 8 parts meet
          // by shuffles and part 0 writes the float4 to this CTA's partial [t][32].
          __syncthreads();
          const int part = tid & 7, grp = tid >> 3, slot = grp >> 3, v4 = grp & 7;
          float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
          for (int i = 0; i < kFastCh / 8; ++i) {
            const float4 v = *reinterpret_cast<const float4*>(red_s + (slot * kFastCh + i * 8 + part) * kFastRedP + v4 * 4);
            acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
          }
#pragma unroll
          for (int off = 1; off < 8; off <<= 1) {
            acc.x += __shfl_xor_sync(kFullMask, acc.x, off);
            acc.y += __shfl_xor_sync(kFullMask, acc.y, off);
            acc.z += __shfl_xor_sync(kFullMask, acc.z, off);
            acc.w += __shfl_xor_sync(kFullMask, acc.w, off);
          }
          const int t = t0 + s * kFastS + e + slot;
          if (part == 0 && t < L) *reinterpret_cast<float4*>(part_bc + size_t(t) * 2 * kFastN + v4 * 4) = acc;
          __syncthreads();  // the buffer is free for the next two timesteps
        }
      }

      // The channel's two threads add their halves; then h = 0 writes du, ddelta over dt, dy and h = 1 writes dz
      // over zg (both have read those float4s above; __syncwarp orders the reads before the writes).
#pragma unroll
      for (int e = 0; e < kFastS; ++e) {
        sgb[e] += __shfl_xor_sync(kFullMask, sgb[e], 1);
        sag[e] += __shfl_xor_sync(kFullMask, sag[e], 1);
        yy[e] += __shfl_xor_sync(kFullMask, yy[e], 1);
      }
      __syncwarp();
      if (h == 0) {
        float du4[4], dd4[4];
#pragma unroll
        for (int e = 0; e < kFastS; ++e) {
          du4[e] = dtv[e] * sgb[e] + D * dyv[e];
          const float ddt = sag[e] * (1.f / kLog2e) + uv[e] * sgb[e];
          // d softplus(v)/dv = sigmoid(v) = 1 - exp(-softplus(v)); above the threshold softplus is the identity,
          // where 1 - exp(-dt) rounds to 1 in fp32 anyway.
          dd4[e] = p.delta_softplus ? ddt * -expm1f(-dtv[e]) : ddt;
          dD_acc += dyv[e] * uv[e];
          if (t0 + s * kFastS + e < L) dbias_acc += dd4[e];
        }
        *reinterpret_cast<float4*>(dt_s + at) = make_float4(du4[0], du4[1], du4[2], du4[3]);
        *reinterpret_cast<float4*>(dy_s + at) = make_float4(dd4[0], dd4[1], dd4[2], dd4[3]);
      } else if (z) {
        const float4 zg4 = *reinterpret_cast<const float4*>(zg_s + at);
        const float zgv[4] = {zg4.x, zg4.y, zg4.z, zg4.w};
        float dz4[4];
#pragma unroll
        for (int e = 0; e < kFastS; ++e) dz4[e] = zgv[e] * (yy[e] + D * uv[e]);
        *reinterpret_cast<float4*>(zg_s + at) = make_float4(dz4[0], dz4[1], dz4[2], dz4[3]);
      }
    }

    // Store du, ddelta, dz for the timesteps before the end.
    __syncthreads();
    for (int i = tid; i < kFastCh * kVec; i += kFastThreads) {
      const int ch = i / kVec, j = (i % kVec) * kPerVec;
      if (t0 + j >= L) continue;
      union {
        uint4 raw;
        T e[kPerVec];
      } a1, a2, a3;
#pragma unroll
      for (int q4 = 0; q4 < kPerVec; q4 += 4) {
        const int at = fast_swz(ch, j + q4);
        const float4 v1 = *reinterpret_cast<const float4*>(dt_s + at);
        const float4 v2 = *reinterpret_cast<const float4*>(dy_s + at);
        const float4 v3 = *reinterpret_cast<const float4*>(zg_s + at);
        a1.e[q4] = from_float<T>(v1.x), a1.e[q4 + 1] = from_float<T>(v1.y);
        a1.e[q4 + 2] = from_float<T>(v1.z), a1.e[q4 + 3] = from_float<T>(v1.w);
        a2.e[q4] = from_float<T>(v2.x), a2.e[q4 + 1] = from_float<T>(v2.y);
        a2.e[q4 + 2] = from_float<T>(v2.z), a2.e[q4 + 3] = from_float<T>(v2.w);
        a3.e[q4] = from_float<T>(v3.x), a3.e[q4 + 1] = from_float<T>(v3.y);
        a3.e[q4 + 2] = from_float<T>(v3.z), a3.e[q4 + 3] = from_float<T>(v3.w);
      }
      const size_t off = size_t(ch) * L + t0 + j;
      *reinterpret_cast<uint4*>(du_g + off) = a1.raw;
      *reinterpret_cast<uint4*>(ddelta_g + off) = a2.raw;
      if (z) *reinterpret_cast<uint4*>(dz_g + off) = a3.raw;
    }
  }

  // Per-row partials; the finish kernel sums them over batch in a fixed order.
#pragma unroll
  for (int k = 0; k < kFastHalf; ++k) {
    const size_t at = (row0 + c) * kFastN + h * kFastHalf + k;
    p.part_A[at] = dA[k];
    if (p.dinitial_state) p.dinitial_state[at] = q[k];
  }
  if (h == 0) {
    p.part_D[row0 + c] = dD_acc;
    p.part_bias[row0 + c] = dbias_acc;
  }
}

// dB, dC (batch, ngroups, 16, seqlen) fp32: the sum of the group's CTA partials, in CTA order. One thread per
// (which, batch, group, t), t fastest so that the writes of each state row coalesce.
__global__ void selective_scan_bwd_fast_finish_bc(const ScanBwdFastParams p) {
  const int L = p.seqlen;
  const int64_t nB = int64_t(p.batch) * p.B_ngroups * L, nC = int64_t(p.batch) * p.C_ngroups * L;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nB + nC) return;
  const int which = i >= nB;
  const int64_t r = which ? i - nB : i;
  const int ngroups = which ? p.C_ngroups : p.B_ngroups;
  const int t = int(r % L);
  const int64_t bg = r / L;
  const int g = int(bg % ngroups), b = int(bg / ngroups);
  const int blocks_per_group = p.dim / ngroups / kFastCh, blocks_per_batch = p.dim / kFastCh;
  float acc[kFastN] = {};
  for (int k = 0; k < blocks_per_group; ++k) {
    const int cta = b * blocks_per_batch + g * blocks_per_group + k;
    const float* src = p.part_bc + (size_t(cta) * L + t) * 2 * kFastN + which * kFastHalf;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // values h * 16 + which * 8 + k hold state h * 8 + k
      const float4 v0 = *reinterpret_cast<const float4*>(src + hh * 2 * kFastHalf);
      const float4 v1 = *reinterpret_cast<const float4*>(src + hh * 2 * kFastHalf + 4);
      float* a = acc + hh * kFastHalf;
      a[0] += v0.x, a[1] += v0.y, a[2] += v0.z, a[3] += v0.w, a[4] += v1.x, a[5] += v1.y, a[6] += v1.z, a[7] += v1.w;
    }
  }
  float* dst = (which ? p.dC : p.dB) + size_t(bg) * kFastN * L + t;
#pragma unroll
  for (int n = 0; n < kFastN; ++n) dst[size_t(n) * L] = acc[n];
}

// dA (dim, 16), dD, ddelta_bias (dim,): sums over batch of the per-row partials.
__global__ void selective_scan_bwd_fast_finish_params(const ScanBwdFastParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.dim * kFastN) return;
  float s = 0.f;
  for (int b = 0; b < p.batch; ++b) s += p.part_A[size_t(b) * p.dim * kFastN + i];
  p.dA[i] = s;
  if (i < p.dim) {
    float sD = 0.f, sb = 0.f;
    for (int b = 0; b < p.batch; ++b) sD += p.part_D[size_t(b) * p.dim + i], sb += p.part_bias[size_t(b) * p.dim + i];
    if (p.dD) p.dD[i] = sD;
    if (p.ddelta_bias) p.ddelta_bias[i] = sb;
  }
}

template <typename T>
void launch_selective_scan_bwd_fast(const ScanBwdFastParams& p, cudaStream_t stream) {
  constexpr size_t smem = fast_bwd_smem_bytes<T>();
  cudaFuncSetAttribute(selective_scan_bwd_fast_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  cudaFuncSetAttribute(selective_scan_bwd_fast_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                       int(cudaSharedmemCarveoutMaxShared));
  selective_scan_bwd_fast_kernel<T><<<p.batch * (p.dim / kFastCh), kFastThreads, smem, stream>>>(p);
  const int64_t nbc = int64_t(p.batch) * (p.B_ngroups + p.C_ngroups) * p.seqlen;
  if (nbc > 0) selective_scan_bwd_fast_finish_bc<<<int((nbc + 255) / 256), 256, 0, stream>>>(p);
  selective_scan_bwd_fast_finish_params<<<(p.dim * kFastN + 255) / 256, 256, 0, stream>>>(p);
}

}  // namespace llmkernels::scan
