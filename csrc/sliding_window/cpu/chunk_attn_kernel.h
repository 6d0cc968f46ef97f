// Blocked CPU kernel of rolling_window_attn for chunks of queries. Included once by each per-instruction-set
// file (chunk_attn_avx512.cpp, chunk_attn_avx2.cpp) after it has defined `struct Vec` (one SIMD register of
// Vec::W floats, its operations, and the register-tile shape Vec::MR x Vec::NV) and switched the compiler's
// target; everything here but the entry point has internal linkage, so the copies never mix.
//
// Math: the query at absolute position p = seqlens[b] + t attends to positions p - W + 1 .. p (clipped at 0):
//   out = sum_j softmax_j(s_j) v_j,  s_j = scale q . k_j (then softcap * tanh(s_j / softcap) if softcap > 0),
// position j read from the chunk (j >= seqlens[b], row j - seqlens[b]) or the ring (slot j % W).
//
// Tiling: one task per (batch, KV head, block of block_q query positions); its rows are the block's
// (position, query head) pairs of that KV head's GQA group, so each K/V tile, gathered once, serves
// block_q * group rows (the per-row kernel re-read and re-converted it for every row). The task walks the
// union of its rows' windows (W + block_q - 1 positions) in tiles of kKeyTile keys: a tile's rows are gathered
// from the ring / chunk in position order (the wrap-around is in the gather) into contiguous fp32 K and V
// tiles, then S^T (keys x rows) = K (scale Q)^T and O += P V go through one register-blocked micro-kernel,
// with an online softmax (FlashAttention-2) whose bookkeeping runs across rows, one register of Vec::W rows
// at a time. Only the first and last tiles of a block are cut by some row's window and pay for masking.
//
// Decode (a task of at most kMaxDotRows rows): the score tile would be mostly padding lanes, each key element a
// broadcast load, so the scores are instead one dot product per (key, row) (dot_scores), each key row loaded
// once; fp32 K and V rows of whole registers are read where they lie (V through the product by runs of evenly
// spaced rows, split where the ring wraps), other dtypes converted into the tiles. Rows are prefetched a few
// keys ahead: one KV head's rows are nheads_k * d apart, too far for the hardware prefetchers.
//
// Speed: chunks are fp32 FMA bound (2 * rows * keys * d FMAs per tile against d * (keys + rows) loads); the
// gather (one converted copy per key per block) and one vector exp per score add about 10-20%. Decode (1 core,
// W = 4096, d = 128, 8 KV heads): fp32 15-16 GB/s of K and V, bf16 ~14 (was 9 and 9 through the products).

#ifndef LLMK_CHUNK_ISA
#error "define LLMK_CHUNK_ISA (the entry-point suffix) and struct Vec before including chunk_attn_kernel.h"
#endif

namespace {

using llmkernels::sliding_window::cpu::ChunkParams;
using llmkernels::sliding_window::cpu::Dtype;
using llmkernels::sliding_window::cpu::RowView;

constexpr int64_t kKeyTile = 64;
constexpr float kNegInf = -__builtin_inff();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up_to_vec(int64_t n) { return (n + Vec::W - 1) / Vec::W * Vec::W; }

template <typename T>
inline T* row_of(const RowView& t, int64_t b, int64_t s, int64_t h) {
  return static_cast<T*>(t.data) + b * t.sb + s * t.ss + h * t.sh;
}

// Row of key position j for KV head hk: from the chunk (j >= n) or the ring (slot j % window).
template <typename T>
inline const T* key_row(const ChunkParams& p, int64_t b, int64_t hk, int64_t n, int64_t j, const RowView& chunk,
                        const RowView& ring) {
  return j >= n ? row_of<const T>(chunk, b, j - n, hk) : row_of<const T>(ring, b, j % p.window, hk);
}

// Calls f(c0, c1, j0 + c0) for the runs [c0, c1) of a tile's keys whose rows lie evenly spaced: a tile of key
// positions j0 .. j0 + cols - 1 splits where the ring wraps (slot W - 1 to slot 0) and where the chunk begins.
template <typename F>
inline void for_each_run(const ChunkParams& p, int64_t n, int64_t j0, int64_t cols, F&& f) {
  for (int64_t c = 0; c < cols;) {
    const int64_t j = j0 + c;
    const int64_t len = j >= n ? cols - c : imin(cols - c, imin(n - j, p.window - j % p.window));
    f(c, c + len, j);
    c += len;
  }
}


// dst[0:n] = mul * src[0:n] in fp32.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n, float mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

#include "common/cpu_microkernel.h"  // Scratch, gemm_tile, gemm_strip: see its comment on where to include it

// Strips Vec::NV registers wide, then one register wide for what is left of N.
template <typename BT>  // B fp32, or bf16 rows (uint16_t) widened as they are loaded
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_m, int64_t a_k, const BT* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec::W, NV = Vec::NV;
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W) gemm_strip<Vec::MR, NV>(M, K, A, a_m, a_k, B + n, ldb, C + n, ldc, accumulate);
  for (; n < N; n += W) gemm_strip<Vec::MR, 1>(M, K, A, a_m, a_k, B + n, ldb, C + n, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------------------
// One task: (batch b, KV head hk, query positions t0 .. t0 + nq - 1) x the group's query heads
// ---------------------------------------------------------------------------------------------------
template <typename T>
void run_tasks(const ChunkParams& p, int64_t begin, int64_t end) {
  constexpr int W = Vec::W;
  const int64_t d = p.head_dim, dp = round_up_to_vec(d), G = p.group, window = p.window;
  const int64_t nqb = (p.chunk + p.block_q - 1) / p.block_q;
  const int64_t rp_max = round_up_to_vec(p.block_q * G);
  Scratch scratch(d * rp_max + 2 * kKeyTile * dp + kKeyTile * rp_max + rp_max * dp + d + 6 * rp_max +
                  kMaxDotRows * dp);
  float* qt = scratch.data;               // (d, rp) scaled queries, transposed; padding columns zero
  float* kb = qt + d * rp_max;            // (kKeyTile, d) the key tile in fp32 ((kKeyTile, dp) for few rows)
  float* vb = kb + kKeyTile * dp;         // (kKeyTile, dp) the value tile in fp32; columns [d, dp) stay zero
  float* st = vb + kKeyTile * dp;         // (kKeyTile, rp) scores, then probabilities, transposed
  float* ob = st + kKeyTile * rp_max;     // (rp, dp) unnormalised output rows
  float* qrow = ob + rp_max * dp;         // (d,) one query row in fp32
  float* m_run = qrow + d;                // per row: running max and sum, this tile's max and sum,
  float* l_run = m_run + rp_max;          // the max used as exp's shift (0 while nothing is visible),
  float* m_blk = l_run + rp_max;          // and the rescale factor of the running output
  float* l_blk = m_blk + rp_max;
  float* shift = l_blk + rp_max;
  float* alpha = shift + rp_max;
  float* qr = alpha + rp_max;             // (kMaxDotRows, dp) few rows' scaled queries, row-major, zero padded
  // fp32 K and V rows of whole registers are read where they lie (decode: no copy of the window); bf16 ones too,
  // widened in registers as they are loaded (the copy had been most of a bf16 decode step)
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  using InPlace = std::conditional_t<kBf16, uint16_t, float>;  // how an in-place row is read
  const bool in_place = (std::is_same_v<T, float> || kBf16) && d == dp;
  const float* krows[kKeyTile];           // few rows: each key's fp32 row in kb
  const InPlace* krows_in[kKeyTile];      // or, in place, where it lies

  for (int64_t task = begin; task < end; ++task) {
    const int64_t qblock = task % nqb, hk = (task / nqb) % p.nheads_k, b = task / (nqb * p.nheads_k);
    const int64_t n = p.seqlens[b], t0 = qblock * p.block_q, nq = imin(p.block_q, p.chunk - t0);
    const int64_t rows = nq * G, rp = round_up_to_vec(rows);  // row r = (position t0 + r / G, head hk G + r % G)
    // A few rows (decode) take one dot product per (key, row) for the scores (dot_scores), K and V read in
    // place when fp32; more take the register-blocked products over gathered tiles.
    const bool few = rows <= kMaxDotRows;

    for (int64_t r = 0; r < rp; ++r) {
      if (r < rows) {
        to_float(row_of<const T>(p.q, b, t0 + r / G, hk * G + r % G), qrow, d, p.scale);
        if (few) {
          for (int64_t e = 0; e < dp; ++e) qr[r * dp + e] = e < d ? qrow[e] : 0.f;
        } else {
          for (int64_t e = 0; e < d; ++e) qt[e * rp + r] = qrow[e];
        }
        for (int64_t e = 0; e < dp; ++e) ob[r * dp + e] = 0.f;
      } else {  // padding rows score 0 against every key: finite, and never written out
        for (int64_t e = 0; e < d; ++e) qt[e * rp + r] = 0.f;
      }
      m_run[r] = kNegInf;
      l_run[r] = 0.f;
    }

    const int64_t pos_first = n + t0, pos_last = n + t0 + nq - 1;
    for (int64_t j0 = imax(0, pos_first - window + 1); j0 <= pos_last; j0 += kKeyTile) {
      const int64_t cols = imin(kKeyTile, pos_last + 1 - j0);
      for (int64_t c = 0; c < cols; ++c) {  // gather in position order: newer than the ring -> the chunk
        const int64_t j = j0 + c;
        const T* krow = key_row<T>(p, b, hk, n, j, p.k, p.k_ring);
        const T* vrow = key_row<T>(p, b, hk, n, j, p.v, p.v_ring);
        if (j + kPrefetchKeys <= pos_last) {  // (see prefetch_row)
          prefetch_row(key_row<T>(p, b, hk, n, j + kPrefetchKeys, p.k, p.k_ring), d * sizeof(T));
          prefetch_row(key_row<T>(p, b, hk, n, j + kPrefetchKeys, p.v, p.v_ring), d * sizeof(T));
        }
        if (!few) {
          to_float(krow, kb + c * d, d, 1.f);
        } else if (in_place) {
          krows_in[c] = reinterpret_cast<const InPlace*>(krow);
        } else {
          to_float(krow, kb + c * dp, d, 1.f);
          for (int64_t e = d; e < dp; ++e) kb[c * dp + e] = 0.f;
          krows[c] = kb + c * dp;
        }
        if (!(few && in_place)) to_float(vrow, vb + c * dp, d, 1.f);
      }
      if (few && in_place) {
        dot_scores(rows, rp, cols, dp, qr, [&](int64_t c) { return krows_in[c]; }, st, rp);
      } else if (few) {
        dot_scores(rows, rp, cols, dp, qr, [&](int64_t c) { return krows[c]; }, st, rp);
      } else {
        gemm(cols, rp, d, kb, d, 1, qt, rp, st, rp, false);  // S^T = K (scale Q)^T
      }

      if (p.softcap > 0.f) {
        const float cap = p.softcap, inv_cap = 1.f / p.softcap;
        for (int64_t i = 0; i < cols * rp; ++i) st[i] = cap * std::tanh(st[i] * inv_cap);
      }
      // Row r (position pos) sees keys pos - W + 1 .. pos: tile columns [pos - W + 1 - j0, pos - j0].
      // Only a tile that starts before the last row's window or ends after the first row's position is cut.
      if (j0 < pos_last - window + 1 || j0 + cols - 1 > pos_first) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = pos_first + r / G;
          const int64_t lo = imin(cols, imax(0, pos - window + 1 - j0)), hi = imax(lo, imin(cols, pos + 1 - j0));
          for (int64_t c = 0; c < lo; ++c) st[c * rp + r] = kNegInf;
          for (int64_t c = hi; c < cols; ++c) st[c * rp + r] = kNegInf;
        }
      }

      for (int64_t r = 0; r < rp; r += W) {  // per-row maxima of this tile
        typename Vec::reg mx = Vec::set1(kNegInf);
        for (int64_t c = 0; c < cols; ++c) mx = Vec::max(mx, Vec::load(st + c * rp + r));
        Vec::store(m_blk + r, mx);
      }
      for (int64_t r = 0; r < rp; ++r) {
        const float m_new = std::fmax(m_run[r], m_blk[r]);
        shift[r] = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: exp(-inf - 0) = 0, no NaN
        alpha[r] = std::exp(m_run[r] - shift[r]);    // 0 before the first visible key
        m_run[r] = m_new;
      }
      for (int64_t r = 0; r < rp; r += W) {  // P^T = exp(S^T - shift) and its per-row sums
        const typename Vec::reg sh = Vec::load(shift + r);
        typename Vec::reg sum = Vec::zero();
        for (int64_t c = 0; c < cols; ++c) {
          const typename Vec::reg e = Vec::exp(Vec::sub(Vec::load(st + c * rp + r), sh));
          Vec::store(st + c * rp + r, e);
          sum = Vec::add(sum, e);
        }
        Vec::store(l_blk + r, sum);
      }
      for (int64_t r = 0; r < rows; ++r) {
        l_run[r] = l_run[r] * alpha[r] + l_blk[r];
        if (alpha[r] != 1.f) {
          const typename Vec::reg a = Vec::set1(alpha[r]);
          for (int64_t e = 0; e < dp; e += W) Vec::store(ob + r * dp + e, Vec::mul(Vec::load(ob + r * dp + e), a));
        }
      }
      if (few && in_place) {  // O += P V over the tile's runs of evenly spaced V rows
        for_each_run(p, n, j0, cols, [&](int64_t c0, int64_t c1, int64_t j) {
          const bool in_chunk = j >= n;
          const InPlace* v0 = reinterpret_cast<const InPlace*>(key_row<T>(p, b, hk, n, j, p.v, p.v_ring));
          gemm(rows, dp, c1 - c0, st + c0 * rp, 1, rp, v0, in_chunk ? p.v.ss : p.v_ring.ss, ob, dp, true);
        });
      } else {
        gemm(rows, dp, cols, st, 1, rp, vb, dp, ob, dp, true);  // O += P V (P read transposed from st)
      }
    }

    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.f / l_run[r];  // l >= 1: every row sees at least its own position
      T* orow = row_of<T>(p.out, b, t0 + r / G, hk * G + r % G);
      for (int64_t e = 0; e < d; ++e) orow[e] = static_cast<T>(ob[r * dp + e] * inv);
    }
  }
}

}  // namespace

#define LLMK_CHUNK_PASTE_(a, b) a##_##b
#define LLMK_CHUNK_PASTE(a, b) LLMK_CHUNK_PASTE_(a, b)

namespace llmkernels::sliding_window::cpu {

void LLMK_CHUNK_PASTE(chunk_attn, LLMK_CHUNK_ISA)(const ChunkParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case Dtype::kFloat32: run_tasks<float>(p, begin, end); break;
    case Dtype::kFloat16: run_tasks<c10::Half>(p, begin, end); break;
    case Dtype::kBFloat16: run_tasks<c10::BFloat16>(p, begin, end); break;
  }
}

}  // namespace llmkernels::sliding_window::cpu
