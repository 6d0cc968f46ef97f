// Flash attention forward (FlashAttention-2) for fp16/bf16 on sm_80+ tensor cores, also the split-KV
// decode kernel of flash_attn_with_kvcache.
//
// Design note (the whole folder)
// -------------------------------
// * Math: for query i and visible keys j, s_ij = scale * q_i.k_j (soft-capped: c * tanh(s_ij / c)),
//   out_i = sum_j exp(s_ij - lse_i) v_j, lse_i = log sum_j exp(s_ij). Scores are kept in the log2
//   domain (s * log2 e) so every exponential is one exp2; lse is converted back to natural log on store.
// * Rows: a CTA owns 64 "packed" rows r of one KV head kh: r -> query i = r / group, query head
//   kh * group + r % group. With GQA the query heads sharing a KV head are processed together, so each
//   K/V tile read from global memory serves all of them (and a decode step with sq = 1 still fills
//   the 16-row MMA tiles when group >= 16). Without GQA (group = 1) this is the usual query tile.
// * Tiling: 4 warps x 16 rows; K/V tiles of kBlockN keys (64 for head dim <= 128, else 32), double
//   buffered in shared memory with cp.async; Q stays in shared memory and is re-read by ldmatrix.
//   S = Q K^T and O += P V run on mma.sync.m16n8k16 with fp32 accumulators; P is converted from the
//   S accumulators to A fragments in registers (no shared-memory round trip).
// * Online softmax per row (running max m, running sum l) in registers; rows are spread over the 4
//   lanes of a quad, reduced with two shuffles. A fully masked row keeps m = -inf: exponentials are
//   taken against 0 instead (exp2(-inf) = 0, never -inf - -inf), and it ends with out = 0, lse = -inf.
// * Band: key j is visible to query i iff j < sk, j >= i + sk - sq - left (left >= 0) and
//   j <= i + sk - sq + right (right >= 0). The CTA's key range is cut to the band of its rows, and the
//   per-element mask is applied only on tiles that straddle the band or the end of the keys.
// * Softcap is applied before the mask (masked scores are -inf whatever the cap).
// * Split-KV (flash-decoding): num_splits CTAs share one row block, each taking a contiguous slice
//   of its key tiles and writing (out / l, lse) in fp32; flash_aux.cu merges them.
// * Backward (flash_bwd_kernel.cuh): preprocess delta = rowsum(dO * O); one CTA per (KV tile, query
//   head, batch) recomputes P from lse and accumulates dK, dV in registers; dQ is added with fp32
//   atomics into a zeroed buffer, dK/dV are added with atomics at the end (which sums GQA groups);
//   a convert kernel writes the fp32 buffers out in the input dtype.
// * Hopper: a wgmma/TMA path would be a separate kernel family behind the same FwdParams/BwdParams and
//   run_flash_fwd/run_flash_bwd entry points (chosen in flash_api.cu by compute capability): TMA loads
//   of Q/K/V into swizzled shared memory, warpgroup-wide wgmma for S and O, producer/consumer warps.
//
// Speed: per K/V tile a warp does 2 * 16 * kBlockN * d MMA flops against (kBlockN * d) * 2 shared
// memory bytes for K and V plus 16 * d for Q, so the kernel is tensor-core / ldmatrix bound for
// long sequences and latency bound (few CTAs) for short ones; decode is bound by reading the KV cache,
// which the split-KV grid spreads over all SMs.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "attention/cuda/flash.h"
#include "attention/cuda/flash_utils.cuh"

namespace llmk::flash {

template <int kHeadDim_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kFwdBlockM;  // packed rows per CTA
  static constexpr int kBlockN = fwd_block_n(kHeadDim);
  static constexpr int kWarps = kBlockM / 16;  // each warp owns 16 rows
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kHeadDim + 8;  // padded shared-memory row (conflict-free ldmatrix)
  // Q, then two stages of K and two of V.
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kLd * 2;
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tiles are made of 16x16 MMA operands");
  static_assert((kHeadDim / 8) % 2 == 0, "padded rows must be an odd number of 16-byte chunks");
};

// Two CTAs per SM fit in H100 shared memory up to head dim 256; saying so also keeps ptxas from capping the
// registers at 128 (it spilled at head dim 96 without the hint).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdTraits<kHeadDim>::kThreads, 2)
    flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using Tr = FwdTraits<kHeadDim>;
  using TT = TypeTraits<T>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd, D = kHeadDim;
  constexpr int kNS = BN / 8;  // 16x8 score fragments per warp per tile
  constexpr int kNO = D / 8;   // 16x8 output fragments per warp
  constexpr float kInf = INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                    // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int m_block = blockIdx.x, kh = blockIdx.y;
  const int b = blockIdx.z % p.batch, split = blockIdx.z / p.batch;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int group = p.group, sq = p.seqlen_q, d = p.headdim;
  const int m0 = m_block * BM;

  int sk = p.seqlen_k;
  if (p.cache_seqlens != nullptr) sk = max(0, min(p.cache_seqlens[b] + p.seqlen_new, p.seqlen_k));
  const Band band{sk, sk - sq, p.window_left, p.window_right};

  // Key tiles [nb_lo, nb_hi) that any row of this block can see, then this split's share of them.
  const int i_lo = m0 / group, i_hi = min(sq - 1, (m0 + BM - 1) / group);
  int n_lo = 0, n_hi = sk;
  if (band.left >= 0) n_lo = max(0, i_lo + band.shift - band.left);
  if (band.right >= 0) n_hi = min(sk, i_hi + band.shift + band.right + 1);
  int nb_lo = n_lo / BN, nb_hi = n_hi > n_lo ? ceil_div(n_hi, BN) : nb_lo;
  if (p.num_splits > 1) {
    const int per_split = ceil_div(nb_hi - nb_lo, p.num_splits);
    nb_lo += split * per_split;
    nb_hi = min(nb_hi, nb_lo + per_split);
  }

  // This thread's two rows (g and g + 8 of its warp): query index and query head.
  int row_i[2], row_h[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pr = m0 + warp * 16 + g + r * 8;
    row_i[r] = pr / group;
    row_h[r] = kh * group + pr % group;
  }

  float acc[kNO][4];
#pragma unroll
  for (int no = 0; no < kNO; ++no) acc[no][0] = acc[no][1] = acc[no][2] = acc[no][3] = 0.f;
  float m_run[2] = {-kInf, -kInf}, l_run[2] = {0.f, 0.f};

  if (nb_lo < nb_hi) {
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kh * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kh * p.v_head_stride;
    copy_tile_async<Tr::kThreads, D>(sQ, LD, BM, d, q, [&](int r) -> const T* {
      const int pr = m0 + r, i = pr / group;
      if (i >= sq) return nullptr;
      return q + b * p.q_batch_stride + i * p.q_row_stride + (kh * group + pr % group) * p.q_head_stride;
    });
    auto load_kv = [&](int nb, int stage) {
      const int n0 = nb * BN;
      copy_tile_async<Tr::kThreads, D>(sK + stage * BN * LD, LD, BN, d, k, [&](int r) -> const T* {
        return n0 + r < sk ? k + (n0 + r) * p.k_row_stride : nullptr;
      });
      copy_tile_async<Tr::kThreads, D>(sV + stage * BN * LD, LD, BN, d, v, [&](int r) -> const T* {
        return n0 + r < sk ? v + (n0 + r) * p.v_row_stride : nullptr;
      });
    };
    load_kv(nb_lo, 0);
    cp_async_commit();

    const bool softcap = p.softcap > 0.f;
    const float softcap_log2 = p.softcap * kLog2e;
    const bool warp_active = (m0 + warp * 16) / group < sq;

    for (int nb = nb_lo; nb < nb_hi; ++nb) {
      const int stage = (nb - nb_lo) & 1;
      // Prefetch the next tile into the other stage (read by the previous iteration, which ended with a
      // barrier), then wait for this one. The group is committed even when empty so wait<1> is exact.
      if (nb + 1 < nb_hi) load_kv(nb + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();

      const T* sKs = sK + stage * BN * LD;
      const T* sVs = sV + stage * BN * LD;
      // A warp whose 16 rows are all padding (decode: sq * group < 64) only helps with the copies.
      if (warp_active) {
        // S = Q K^T for this warp's 16 rows x BN keys.
        float s[kNS][4];
#pragma unroll
        for (int ns = 0; ns < kNS; ++ns) s[ns][0] = s[ns][1] = s[ns][2] = s[ns][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          if (kk * 16 >= d) break;  // padded head-dim columns are zero
          uint32_t a[4];
          load_a(a, sQ, LD, warp * 16, kk * 16, lane);
#pragma unroll
          for (int nn = 0; nn < BN / 16; ++nn) {
            uint32_t bk[4];
            load_b_nk(bk, sKs, LD, kk * 16, nn * 16, lane);
            mma_16816<T>(s[2 * nn], a, bk[0], bk[1]);
            mma_16816<T>(s[2 * nn + 1], a, bk[2], bk[3]);
          }
        }

        // Scale (+ softcap) into the log2 domain; mask only tiles that straddle the band or the end.
        const int n0 = nb * BN;
        const bool need_mask = n0 + BN > sk ||
                               (band.right >= 0 && n0 + BN - 1 > i_lo + band.shift + band.right) ||
                               (band.left >= 0 && n0 < i_hi + band.shift - band.left);
#pragma unroll
        for (int ns = 0; ns < kNS; ++ns) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[ns][e];
            x = softcap ? softcap_log2 * tanhf(x * p.softcap_inner) : x * p.scale_log2;
            if (need_mask && !band.visible(row_i[e >> 1], n0 + ns * 8 + 2 * t + (e & 1))) x = -kInf;
            s[ns][e] = x;
          }
        }

        // Online softmax: new running max, rescale the accumulator and the running sum.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = m_run[r];
#pragma unroll
          for (int ns = 0; ns < kNS; ++ns) mx = fmaxf(mx, fmaxf(s[ns][2 * r], s[ns][2 * r + 1]));
          mx = quad_max(mx);
          const float m_ref = mx == -kInf ? 0.f : mx;  // all hidden so far: exp2(-inf - 0) = 0, no NaN
          const float alpha = exp2f(m_run[r] - m_ref);
          m_run[r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int ns = 0; ns < kNS; ++ns) {
            s[ns][2 * r] = exp2f(s[ns][2 * r] - m_ref);
            s[ns][2 * r + 1] = exp2f(s[ns][2 * r + 1] - m_ref);
            sum += s[ns][2 * r] + s[ns][2 * r + 1];
          }
          l_run[r] = l_run[r] * alpha + sum;  // per-lane partial sum; the quad is summed at the end
#pragma unroll
          for (int no = 0; no < kNO; ++no) {
            acc[no][2 * r] *= alpha;
            acc[no][2 * r + 1] *= alpha;
          }
        }

        // O += P V: the S accumulators of two adjacent 8-key fragments form one 16x16 A operand.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          a[0] = TT::pack(s[2 * kk][0], s[2 * kk][1]);
          a[1] = TT::pack(s[2 * kk][2], s[2 * kk][3]);
          a[2] = TT::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          a[3] = TT::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int nn = 0; nn < D / 16; ++nn) {
            if (nn * 16 >= d) break;
            uint32_t bv[4];
            load_b_kn(bv, sVs, LD, kk * 16, nn * 16, lane);
            mma_16816<T>(acc[2 * nn], a, bv[0], bv[1]);
            mma_16816<T>(acc[2 * nn + 1], a, bv[2], bv[3]);
          }
        }
      }  // warp_active
      __syncthreads();  // this stage is overwritten by the prefetch of the next iteration
    }
  }

  // Epilogue: normalise, store out (or the split's fp32 partial) and lse. Padding rows are not stored.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : -kInf;
    const int i = row_i[r], h = row_h[r];
    if (i >= sq) continue;
    if (p.num_splits > 1) {
      const int64_t row = ((int64_t(split) * p.batch + b) * p.nheads + h) * sq + i;
      float* o = p.out_accum + row * D;
#pragma unroll
      for (int no = 0; no < kNO; ++no) {
        const int col = no * 8 + 2 * t;
        if (col < d) *reinterpret_cast<float2*>(o + col) = make_float2(acc[no][2 * r] * inv, acc[no][2 * r + 1] * inv);
      }
      if (t == 0) p.lse_accum[row] = lse;
    } else {
      T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
      for (int no = 0; no < kNO; ++no) {
        const int col = no * 8 + 2 * t;
        if (col < d) *reinterpret_cast<uint32_t*>(o + col) = TT::pack(acc[no][2 * r] * inv, acc[no][2 * r + 1] * inv);
      }
      if (t == 0 && p.softmax_lse != nullptr) p.softmax_lse[(int64_t(b) * p.nheads + h) * sq + i] = lse;
    }
  }
}

template <typename T, int kHeadDim>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Tr = FwdTraits<kHeadDim>;
  auto kernel = &flash_fwd_kernel<T, kHeadDim>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(ceil_div(params.seqlen_q * params.group, Tr::kBlockM), params.nheads_k,
                  params.batch * params.num_splits);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llmk::flash
