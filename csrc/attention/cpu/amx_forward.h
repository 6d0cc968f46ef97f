// The bf16 attention forward of one query head on AMX tiles, against its KV head's K^T and V already packed: shared
// by flash attention (kernel_amx.cpp) and the rolling KV cache's chunks (sliding_window/cpu/chunk_attn_amx.cpp).
// Include inside the anonymous namespace of those files, under their AMX target switch, after amx_common.h and
// common/cpu_amx_tiles.h; the caller configures the tiles (AmxTiles) and runs with flush-to-zero.
//
// Query blocks of kAmxRows rows, each copied to a contiguous buffer (rows of a (b, s, h, d) tensor lie a power of
// two apart: read in place, a block's rows fall into a few L1 sets), stream the packed key blocks of kAmxKeys:
// S = Q K^T (fp32), the scale / soft-cap / band mask and the running max and sum per row, P rounded to bf16 (as
// the GPU kernels and the vdpbf16ps kernel do), O += P V. Dropout (flash attention only): P times the keep factors
// after the row sums took it, before the rounding (dropout_avx512.h DropoutRows draws them a row of a block at once).

// Measured 128 / 256 / 512 rows by 128 / 256 keys, 2k tokens d 128, 1 thread pinned to each core in turn: 128 x
// 256 at or near the fastest in every round; 512-row blocks (a working set past L2) won one early round and lost
// every later one by ~30%. Re-measured once the buffers were 64-byte aligned (amx_common.h Buffer): 64 / 128 / 256
// rows by 128 / 256 / 512 keys all within ~5% of each other.
constexpr int64_t kAmxRows = 128;  // query rows per block (a multiple of 32, as are the tiles' products)
constexpr int64_t kAmxKeys = 256;  // keys per block

// K^T and V of keys [klo, khi) of a row source (amx_common.h), kAmxKeys a block, into the tiles' B layout one block
// after another (kAmxKeys * d elements each; rows from `end` on read as zero).
template <typename Src>
void amx_pack_keys(const Src& k, const Src& v, int64_t klo, int64_t khi, int64_t end, int64_t d,
                   Buffer<uint16_t>& k_out, Buffer<uint16_t>& v_out) {
  const int64_t nblocks = khi > klo ? (khi - klo + kAmxKeys - 1) / kAmxKeys : 0, block_elems = kAmxKeys * d;
  k_out.reserve(nblocks * block_elems);
  v_out.reserve(nblocks * block_elems);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    pack_transposed_b(k, klo + blk * kAmxKeys, end, kAmxKeys, d, k_out.data + blk * block_elems);
    pack_rows_b(v, klo + blk * kAmxKeys, end, kAmxKeys, d, v_out.data + blk * block_elems);
  }
}

// One query head: rows i of Q at q + i * q_ld (bf16), keys [klo, khi) packed from klo in blocks of kAmxKeys
// (klo a multiple of kAmxKeys from the caller's origin), of sk keys in all, query i seeing keys
// i + shift - left .. i + shift + right (-1: unbounded).
struct AmxHead {
  const uint16_t* q;
  int64_t q_ld, sq, d;
  const uint16_t* packed_k;
  const uint16_t* packed_v;
  int64_t klo, khi, sk, shift, left, right;
  float scale;  // softmax scale
  float softcap;
  float alibi_slope;  // ALiBi: s_ij -= slope * |i + shift - j| after the soft-cap; 0: none
  // Output row i: bf16 at out_bf16 + i * out_ld when out_bf16 is set, else fp32 at out_f32 + i * out_ld; lse_i at
  // lse + i * lse_ld (natural log) when lse is set.
  uint16_t* out_bf16;
  float* out_f32;
  int64_t out_ld;
  float* lse;
  int64_t lse_ld;
};

struct AmxForwardScratch {  // per thread, kept between calls (fresh pages cost every call its page faults)
  Buffer<uint16_t> q_rows, probs;
  Buffer<float> scores, out;
  void reserve(int64_t d) {
    q_rows.reserve(kAmxRows * d);
    probs.reserve(kAmxRows * kAmxKeys);
    scores.reserve(kAmxRows * kAmxKeys);
    out.reserve(kAmxRows * d);
    // Rows past a block's last are computed and ignored: start them from zeros, not whatever new[] left.
    std::memset(q_rows.data, 0, sizeof(uint16_t) * kAmxRows * d);
    std::memset(probs.data, 0, sizeof(uint16_t) * kAmxRows * kAmxKeys);
  }
};

constexpr float kLazyMax = 8.f;  // log2 units: how far a score may pass the running max before the max moves

struct NoDropout {  // amx_forward_head's mask without dropout (the rolling cache's chunks; p = 0)
  static constexpr bool kOn = false;
};

// One row of kAmxKeys scores s (log2 units once times mul) against the max m: pr = 2^(s mul - m) in bf16, 0 in
// the lanes outside [vis.lo, vis.hi) unless `full`; returns the fp32 values' sum (per lane), and in *over the
// largest s mul - m of the visible lanes. kDrop: pr is then times keep_scale where the keep bits are set, else 0
// (the sum is of the values before).
template <bool kDrop>
inline Vec::reg exp_row(const float* s, uint16_t* pr, float mul, float m, bool full, Visible vis, float* over,
                        const __mmask16* keep, float keep_scale) {
  Vec::reg sum = Vec::zero(), top = Vec::set1(-__builtin_inff());
  const Vec::reg vmul = Vec::set1(mul), vneg = Vec::set1(-m), vkeep = Vec::set1(keep_scale);
  for (int64_t c = 0; c < kAmxKeys; c += Vec::W) {
    const __mmask16 seen = full ? __mmask16(0xffff) : visible_lanes(c, vis);
    const Vec::reg x = Vec::fmadd(Vec::load(s + c), vmul, vneg);
    top = _mm512_mask_max_ps(top, seen, top, x);
    const Vec::reg e = _mm512_maskz_mov_ps(seen, exp2_coarse(x));
    sum = Vec::add(sum, e);
    store_bf16(pr + c, kDrop ? _mm512_maskz_mul_ps(keep[c / Vec::W], e, vkeep) : e);
  }
  *over = Vec::hmax(top);
  return sum;
}

// drop: the head's mask (DropoutRows), or NoDropout.
template <typename Dropout = NoDropout>
void amx_forward_head(const AmxHead& h, AmxForwardScratch& w, const Dropout& drop = {}) {
  using reg = Vec::reg;
  constexpr float kNegInf = -__builtin_inff(), kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  const int64_t d = h.d, block_elems = kAmxKeys * d;
  const float q_scale = h.scale * (h.softcap > 0.f ? 1.f : kLog2e);  // scores in log2 units unless soft-capped
  float m_run[kAmxRows], l_run[kAmxRows];
  __mmask16 keep[kAmxKeys / Vec::W];  // dropout: one row's keep bits in the current key block
  float keep_scale = 0.f;
  if constexpr (Dropout::kOn) keep_scale = drop.scale;
  for (int64_t i0 = 0; i0 < h.sq; i0 += kAmxRows) {
    const int64_t rows = imin(kAmxRows, h.sq - i0), rows32 = (rows + 31) / 32 * 32;
    for (int64_t r = 0; r < rows; ++r) std::memcpy(w.q_rows.data + r * d, h.q + (i0 + r) * h.q_ld, 2 * d);
    if (rows < rows32) std::memset(w.q_rows.data + rows * d, 0, sizeof(uint16_t) * (rows32 - rows) * d);
    for (int64_t r = 0; r < kAmxRows; ++r) {
      m_run[r] = kNegInf;
      l_run[r] = 0.f;
    }
    std::memset(w.out.data, 0, sizeof(float) * kAmxRows * d);
    // Keys this block's rows can see, from the block holding the first.
    int64_t jlo = h.left >= 0 ? imax(h.klo, i0 + h.shift - h.left) : h.klo;
    const int64_t jhi = h.right >= 0 ? imin(h.khi, i0 + rows - 1 + h.shift + h.right + 1) : h.khi;
    jlo = h.klo + (jlo - h.klo) / kAmxKeys * kAmxKeys;
    for (int64_t j0 = jlo; j0 < jhi; j0 += kAmxKeys) {
      const uint16_t* kt = h.packed_k + (j0 - h.klo) / kAmxKeys * block_elems;
      const uint16_t* vb = h.packed_v + (j0 - h.klo) / kAmxKeys * block_elems;
      constexpr int64_t width = kAmxKeys;  // (a partial last block is zero-padded and masked)
      amx_gemm_bf16(rows32, kAmxKeys, d, w.q_rows.data, d, kt, kAmxKeys, w.scores.data, kAmxKeys, false);  // S = QK^T
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const Visible vis = visible(h.left, h.right, h.shift, h.sk, i, j0, width);
        float* s = w.scores.data + r * kAmxKeys;
        uint16_t* pr = w.probs.data + r * kAmxKeys;
        if (vis.hi <= vis.lo) {  // nothing visible here: P row 0
          std::memset(pr, 0, sizeof(uint16_t) * width);
          continue;
        }
        // The scores in log2 units are s * mul: the block's max is max(s) * mul as long as mul > 0, and the
        // scale folds into the exponent's fma. Soft-capping (or a scale <= 0) rewrites them in place first.
        float mul = q_scale;
        if (h.softcap > 0.f || q_scale <= 0.f || h.alibi_slope != 0.f) {
          const reg neg_slope = Vec::set1(-h.alibi_slope * kLog2e);  // ALiBi, in log2 units as the scores here
          for (int64_t c = 0; c < width; c += Vec::W) {
            reg x = Vec::mul(Vec::load(s + c), Vec::set1(q_scale));
            if (h.softcap > 0.f) {
              alignas(64) float t[16];
              Vec::store(t, x);
              for (float& e : t) e = h.softcap * kLog2e * std::tanh(e / h.softcap);
              x = Vec::load(t);
            }
            if (h.alibi_slope != 0.f) {
              x = Vec::fmadd(neg_slope, lane_distances(i + h.shift - j0 - c), x);
            }
            Vec::store(s + c, x);
          }
          mul = 1.f;
        }
        // P = 2^(s * mul - m) against the row's running max m, which moves only when a block's scores pass it by
        // more than kLazyMax (then to that block's max): probabilities stay <= 2^kLazyMax, one pass over the
        // scores takes both P and the check, and O is rescaled only on the rare move. Lanes outside the band (or
        // past the keys) give 0.
        const bool full = vis.lo == 0 && vis.hi == width;
        float m = m_run[r];
        if (m == kNegInf) {  // the first keys this row sees: start from their max
          reg mx = Vec::set1(kNegInf);
          for (int64_t c = 0; c < width; c += Vec::W) {
            const __mmask16 seen = full ? __mmask16(0xffff) : visible_lanes(c, vis);
            mx = _mm512_mask_max_ps(mx, seen, mx, Vec::load(s + c));
          }
          m = Vec::hmax(mx) * mul;
        }
        if constexpr (Dropout::kOn) drop.keep_bits(i, j0, vis.lo, vis.hi, keep);
        float over;  // how far the block's largest score passes m
        reg sum = exp_row<Dropout::kOn>(s, pr, mul, m, full, vis, &over, keep, keep_scale);
        if (over > kLazyMax) {  // the max moved: P again from the new one
          const float m_new = m + over, alpha = std::exp2(m - m_new);
          m = m_new;
          sum = exp_row<Dropout::kOn>(s, pr, mul, m, full, vis, &over, keep, keep_scale);
          l_run[r] *= alpha;
          float* o = w.out.data + r * d;
          for (int64_t e = 0; e < d; e += Vec::W) Vec::store(o + e, Vec::mul(Vec::load(o + e), Vec::set1(alpha)));
        }
        l_run[r] += Vec::hsum(sum);
        m_run[r] = m;
      }
      amx_gemm_bf16(rows32, d, kAmxKeys, w.probs.data, kAmxKeys, vb, d, w.out.data, d, true);  // O += P V
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      // (a row that sees no key: l = 0, output 0; d is a multiple of 32)
      const reg inv = Vec::set1(l_run[r] == 0.f ? 0.f : 1.f / l_run[r]);
      for (int64_t e = 0; e < d; e += Vec::W) {
        const reg y = Vec::mul(Vec::load(w.out.data + r * d + e), inv);
        if (h.out_bf16 != nullptr) {
          store_bf16(h.out_bf16 + i * h.out_ld + e, y);
        } else {
          Vec::store(h.out_f32 + i * h.out_ld + e, y);
        }
      }
      if (h.lse != nullptr) h.lse[i * h.lse_ld] = l_run[r] == 0.f ? kNegInf : (m_run[r] + std::log2(l_run[r])) * kLn2;
    }
  }
}
