// Flash attention backward (FlashAttention-2) for fp16/bf16 on sm_80+ tensor cores.
//
// Math (per query head, s = softmax scores before the log2 change of base, see flash_fwd_kernel.cuh):
//   P_ij = exp(s_ij - lse_i)                  recomputed from the forward's lse (rows with lse = -inf: 0)
//   dV_j += sum_i P_ij dO_i                   dP_ij = dO_i . v_j
//   dS_ij = P_ij (dP_ij - delta_i) * ds/dqk   delta_i = dO_i . O_i (preprocess kernel, flash_aux.cu)
//   ds/dqk = scale, or scale * (1 - tanh^2) with softcap
//   dQ_i += sum_j dS_ij k_j                   dK_j += sum_i dS_ij q_i
// Tiling: one CTA per (KV tile of kBlockN keys, query head, batch), 8 warps. K and V of the tile stay in
// shared memory; the loop walks the query tiles (64 rows) that can see the tile (cut to the band),
// loading Q and dO, recomputing S and dP (a 4 x 2 warp grid over the 64 x kBlockN tile), staging P and dS
// in shared memory (fp16/bf16) so they can be re-read transposed by ldmatrix, and then
//   dV += P^T dO, dK += dS^T Q   accumulated in registers (warp grid over the kBlockN x d tile),
//   dQ += dS K                   computed in column chunks and added with fp32 atomics to dq_accum.
// At the end dK, dV are stored in the input dtype (group == 1: one CTA owns the keys) or, with GQA, added
// with fp32 atomics into dk_accum / dv_accum, which sums the query heads of a group; flash_aux.cu converts
// the fp32 buffers (dQ, and dK/dV with GQA) to the input dtype.
// Speed: 2.5x the forward's MMA work plus the dQ atomics (BM x d per KV tile per query tile). Q/dO loads
// are not overlapped with compute (single buffer): a second stage is the next step if profiles show
// the loads exposed. Deterministic reductions (a dQ pass of its own) would replace the atomics.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "attention/cuda/flash.h"
#include "attention/cuda/flash_utils.cuh"

namespace llmk::flash {

template <int kHeadDim_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;                       // query rows per inner iteration
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per CTA
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kHeadDim + 8;  // padded rows of Q, dO, K, V tiles
  static constexpr int kLdP = kBlockN + 8;  // padded rows of P, dS tiles
  // S, dP (kBlockM x kBlockN): 4 x 2 warps, each 16 x kSN.
  static constexpr int kSN = kBlockN / 2;
  // dK, dV (kBlockN x d): (kBlockN / 16) x kKVWarpsN warps, each 16 x kKVN.
  static constexpr int kKVWarpsM = kBlockN / 16;
  static constexpr int kKVWarpsN = kWarps / kKVWarpsM;
  static constexpr int kKVN = kHeadDim / kKVWarpsN;
  // dQ (kBlockM x d): 4 x 2 warps, each 16 x kDQN in chunks of kDQChunk columns (bounded registers).
  static constexpr int kDQN = kHeadDim / 2;
  static constexpr int kDQChunk = kDQN <= 64 ? kDQN : (kDQN % 64 == 0 ? 64 : 48);
  static constexpr int kSmemBytes = (2 * kBlockM * kLd + 2 * kBlockN * kLd + 2 * kBlockM * kLdP) * 2 + 2 * kBlockM * 4;
  static_assert(kBlockM == 4 * 16, "S / dQ warp grids are 4 x 2");
  static_assert(kSN % 16 == 0 && kKVN % 16 == 0 && kDQChunk % 16 == 0 && kDQN % kDQChunk == 0, "16-wide operands");
  static_assert((kHeadDim / 8) % 2 == 0 && (kBlockN / 8) % 2 == 0, "padded rows: odd number of 16-byte chunks");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdTraits<kHeadDim>::kThreads, 1)
    flash_bwd_kernel(const __grid_constant__ BwdParams p) {
  using Tr = BwdTraits<kHeadDim>;
  using TT = TypeTraits<T>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd, LDP = Tr::kLdP, D = kHeadDim;
  constexpr int kNS = Tr::kSN / 8, kNKV = Tr::kKVN / 8, kNDQ = Tr::kDQChunk / 8;
  constexpr float kInf = INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sdO = sQ + BM * LD;                   // [BM][LD]
  T* sK = sdO + BM * LD;                   // [BN][LD]
  T* sV = sK + BN * LD;                    // [BN][LD]
  T* sP = sV + BN * LD;                    // [BM][LDP]
  T* sdS = sP + BM * LDP;                  // [BM][LDP]
  float* sLse = reinterpret_cast<float*>(sdS + BM * LDP);  // [BM], log2 domain, +inf for empty rows
  float* sDelta = sLse + BM;                               // [BM]

  const int n_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int kh = h / p.group;
  const int sq = p.seqlen_q, sk = p.seqlen_k, d = p.headdim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const Band band{sk, sk - sq, p.window_left, p.window_right};
  const int n0 = n_block * BN;

  // Query rows that see at least one key of this tile (keys n0 .. n0 + BN - 1, conservatively).
  int m_lo = 0, m_hi = sq;
  if (band.right >= 0) m_lo = max(0, n0 - band.shift - band.right);
  if (band.left >= 0) m_hi = min(sq, n0 + BN - band.shift + band.left);
  const bool direct = p.dk_accum == nullptr;  // group == 1: store dk, dv in T, no atomics
  if (m_lo >= m_hi) {  // no query sees these keys: dK = dV = 0 (the fp32 accumulators are zero already)
    if (direct) {
      const int half_d = d / 2;
      for (int idx = threadIdx.x; idx < BN * half_d; idx += Tr::kThreads) {
        const int key = n0 + idx / half_d, col = (idx % half_d) * 2;
        if (key >= sk) continue;
        const int64_t off = ((int64_t(b) * sk + key) * p.nheads_k + kh) * d + col;
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + off) = 0u;
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) + off) = 0u;
      }
    }
    return;
  }
  const int mb_lo = m_lo / BM, mb_hi = ceil_div(m_hi, BM);

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kh * p.v_head_stride;
  copy_tile_async<Tr::kThreads, D>(sK, LD, BN, d, k, [&](int r) -> const T* {
    return n0 + r < sk ? k + (n0 + r) * p.k_row_stride : nullptr;
  });
  copy_tile_async<Tr::kThreads, D>(sV, LD, BN, d, v, [&](int r) -> const T* {
    return n0 + r < sk ? v + (n0 + r) * p.v_row_stride : nullptr;
  });
  cp_async_commit();

  // Warp roles in the three tile shapes.
  const int s_m = warp % 4, s_n = warp / 4;                                    // S, dP
  const int kv_m = warp % Tr::kKVWarpsM, kv_n = warp / Tr::kKVWarpsM;          // dK, dV
  const int dq_m = warp % 4, dq_n = warp / 4;                                  // dQ

  float acc_dk[kNKV][4], acc_dv[kNKV][4];
#pragma unroll
  for (int i = 0; i < kNKV; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  const bool softcap = p.softcap > 0.f;
  const float softcap_log2 = p.softcap * kLog2e;
  const int64_t lse_base = (int64_t(b) * p.nheads + h) * sq;

  for (int mb = mb_lo; mb < mb_hi; ++mb) {
    const int m0 = mb * BM;
    __syncthreads();  // the previous iteration is done with sQ, sdO, sP, sdS
    copy_tile_async<Tr::kThreads, D>(sQ, LD, BM, d, q, [&](int r) -> const T* {
      return m0 + r < sq ? q + (m0 + r) * p.q_row_stride : nullptr;
    });
    copy_tile_async<Tr::kThreads, D>(sdO, LD, BM, d, dout, [&](int r) -> const T* {
      return m0 + r < sq ? dout + (m0 + r) * p.do_row_stride : nullptr;
    });
    cp_async_commit();
    if (threadIdx.x < BM) {
      const int i = m0 + threadIdx.x;
      float lse2 = kInf, delta = 0.f;  // padding rows: P = exp2(s - inf) = 0
      if (i < sq) {
        const float lse = p.softmax_lse[lse_base + i];
        lse2 = lse == -kInf ? kInf : lse * kLog2e;  // a row that saw no key has P = 0, not exp(+inf)
        delta = p.delta[lse_base + i];
      }
      sLse[threadIdx.x] = lse2;
      sDelta[threadIdx.x] = delta;
    }
    cp_async_wait<0>();
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this warp's 16 x kSN piece.
    float s[kNS][4], dp[kNS][4];
#pragma unroll
    for (int i = 0; i < kNS; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 >= d) break;
      uint32_t aq[4], ado[4];
      load_a(aq, sQ, LD, s_m * 16, kk * 16, lane);
      load_a(ado, sdO, LD, s_m * 16, kk * 16, lane);
#pragma unroll
      for (int nn = 0; nn < Tr::kSN / 16; ++nn) {
        uint32_t bk[4], bv[4];
        load_b_nk(bk, sK, LD, kk * 16, s_n * Tr::kSN + nn * 16, lane);
        load_b_nk(bv, sV, LD, kk * 16, s_n * Tr::kSN + nn * 16, lane);
        mma_16816<T>(s[2 * nn], aq, bk[0], bk[1]);
        mma_16816<T>(s[2 * nn + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dp[2 * nn], ado, bv[0], bv[1]);
        mma_16816<T>(dp[2 * nn + 1], ado, bv[2], bv[3]);
      }
    }

    // P and dS (w.r.t. the raw q.k), written to shared memory for the transposed products.
    const bool need_mask = n0 + BN > sk || (band.right >= 0 && n0 + BN - 1 > m0 + band.shift + band.right) ||
                           (band.left >= 0 && n0 < m0 + BM - 1 + band.shift - band.left);
#pragma unroll
    for (int ns = 0; ns < kNS; ++ns) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = s_m * 16 + g + r * 8;
        const int col = s_n * Tr::kSN + ns * 8 + 2 * t;
        const float lse2 = sLse[row], delta = sDelta[row];
        float pv[2], dsv[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float x = s[ns][2 * r + c], dscore = p.softmax_scale;
          if (softcap) {
            const float th = tanhf(x * p.softcap_inner);
            x = softcap_log2 * th;
            dscore = p.softmax_scale * (1.f - th * th);
          } else {
            x *= p.scale_log2;
          }
          if (need_mask && !band.visible(m0 + row, n0 + col + c)) x = -kInf;
          pv[c] = exp2f(x - lse2);
          dsv[c] = pv[c] * (dp[ns][2 * r + c] - delta) * dscore;
        }
        *reinterpret_cast<uint32_t*>(sP + row * LDP + col) = TT::pack(pv[0], pv[1]);
        *reinterpret_cast<uint32_t*>(sdS + row * LDP + col) = TT::pack(dsv[0], dsv[1]);
      }
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q over this warp's 16 keys x kKVN columns.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      load_a_trans(ap, sP, LDP, kv_m * 16, kk * 16, lane);
      load_a_trans(ads, sdS, LDP, kv_m * 16, kk * 16, lane);
#pragma unroll
      for (int nn = 0; nn < Tr::kKVN / 16; ++nn) {
        const int col = kv_n * Tr::kKVN + nn * 16;
        if (col >= d) break;
        uint32_t bdo[4], bq[4];
        load_b_kn(bdo, sdO, LD, kk * 16, col, lane);
        load_b_kn(bq, sQ, LD, kk * 16, col, lane);
        mma_16816<T>(acc_dv[2 * nn], ap, bdo[0], bdo[1]);
        mma_16816<T>(acc_dv[2 * nn + 1], ap, bdo[2], bdo[3]);
        mma_16816<T>(acc_dk[2 * nn], ads, bq[0], bq[1]);
        mma_16816<T>(acc_dk[2 * nn + 1], ads, bq[2], bq[3]);
      }
    }

    // dQ += dS K, one column chunk at a time, added to the fp32 buffer with atomics.
#pragma unroll
    for (int chunk = 0; chunk < Tr::kDQN / Tr::kDQChunk; ++chunk) {
      const int col0 = dq_n * Tr::kDQN + chunk * Tr::kDQChunk;
      if (col0 >= d) break;
      float dq[kNDQ][4];
#pragma unroll
      for (int i = 0; i < kNDQ; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t ads[4];
        load_a(ads, sdS, LDP, dq_m * 16, kk * 16, lane);
#pragma unroll
        for (int nn = 0; nn < Tr::kDQChunk / 16; ++nn) {
          uint32_t bk[4];
          load_b_kn(bk, sK, LD, kk * 16, col0 + nn * 16, lane);
          mma_16816<T>(dq[2 * nn], ads, bk[0], bk[1]);
          mma_16816<T>(dq[2 * nn + 1], ads, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = m0 + dq_m * 16 + g + r * 8;
        if (i >= sq) continue;
        float* dst = p.dq_accum + ((int64_t(b) * sq + i) * p.nheads + h) * D + col0 + 2 * t;
#pragma unroll
        for (int nd = 0; nd < kNDQ; ++nd) {
          atomicAdd(dst + nd * 8, dq[nd][2 * r]);
          atomicAdd(dst + nd * 8 + 1, dq[nd][2 * r + 1]);
        }
      }
    }
  }

  // dK, dV of this tile: stored (group == 1) or added into the fp32 buffers (sums a GQA group).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kv_m * 16 + g + r * 8;
    if (key >= sk) continue;
    const int64_t row = (int64_t(b) * sk + key) * p.nheads_k + kh;
#pragma unroll
    for (int nd = 0; nd < kNKV; ++nd) {
      const int col = kv_n * Tr::kKVN + nd * 8 + 2 * t;
      if (col >= d) continue;
      if (direct) {
        T* dk = static_cast<T*>(p.dk) + row * d + col;
        T* dv = static_cast<T*>(p.dv) + row * d + col;
        *reinterpret_cast<uint32_t*>(dk) = TT::pack(acc_dk[nd][2 * r], acc_dk[nd][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dv) = TT::pack(acc_dv[nd][2 * r], acc_dv[nd][2 * r + 1]);
      } else {
        float* dk = p.dk_accum + row * D + col;
        float* dv = p.dv_accum + row * D + col;
        atomicAdd(dk, acc_dk[nd][2 * r]);
        atomicAdd(dk + 1, acc_dk[nd][2 * r + 1]);
        atomicAdd(dv, acc_dv[nd][2 * r]);
        atomicAdd(dv + 1, acc_dv[nd][2 * r + 1]);
      }
    }
  }
}

template <typename T, int kHeadDim>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream) {
  using Tr = BwdTraits<kHeadDim>;
  auto kernel = &flash_bwd_kernel<T, kHeadDim>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(ceil_div(params.seqlen_k, Tr::kBlockN), params.nheads, params.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llmk::flash
