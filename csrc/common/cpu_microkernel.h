// The fp32 register-blocked micro-kernel shared by the C++ CPU attention kernels (flash attention, the
// sliding-window chunk kernel), the per-key dot products of their decode paths, and their scratch buffer.
//
// Include it INSIDE the per-instruction-set anonymous namespace of a kernel file, after that file has
// defined `struct Vec` (one SIMD register of Vec::W floats: zero, set1, load, store, fmadd) and switched the
// compiler's target: each copy then has internal linkage and is compiled for its own ISA, so an AVX-512
// instantiation can never be picked by the linker for the AVX2 path. For that reason it includes nothing
// (the including file provides <cstdint>) and uses no std containers.

// Zero-initialised scratch floats, freed at scope exit (no std containers: see the file comment). 64-byte aligned
// so that the kernels' full-register loads and stores of it never straddle two cache lines (the includer provides
// <new> and <cstring>).
struct Scratch {
  float* data;
  explicit Scratch(int64_t n) : data(static_cast<float*>(::operator new[](sizeof(float) * n, std::align_val_t(64)))) {
    std::memset(data, 0, sizeof(float) * n);
  }
  ~Scratch() { ::operator delete[](data, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------------------------------------------
// The micro-kernel: C[M x N] (+)= A[M x K] B[K x N]
// ---------------------------------------------------------------------------------------------------
// A(m, k) = A[m * a_m + k * a_k] (so a transposed A costs nothing); B, C row-major with leading dims ldb, ldc.
// An R x NV tile of C (NV registers wide) lives in registers while K streams by: per k, NV loads of B and R
// broadcasts of A feed R * NV FMAs. B is fp32, or bf16 (BT = uint16_t) widened as it is loaded.
template <int R, int NV, typename BT>
inline void gemm_tile(int64_t K, const float* A, int64_t a_m, int64_t a_k, const BT* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  using reg = typename Vec::reg;
  constexpr int W = Vec::W;
  reg c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vec::load(C + r * ldc + v * W) : Vec::zero();
  }
  for (int64_t k = 0; k < K; ++k) {
    reg b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const reg a = Vec::set1(A[r * a_m + k * a_k]);
      for (int v = 0; v < NV; ++v) c[r][v] = Vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) Vec::store(C + r * ldc + v * W, c[r][v]);
  }
}

// All M rows of one NV-register-wide column strip: blocks of MR rows, then the remainder in one smaller tile.
template <int MR, int NV, typename BT>
inline void gemm_strip(int64_t M, int64_t K, const float* A, int64_t a_m, int64_t a_k, const BT* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_tile<MR, NV>(K, A + m * a_m, a_m, a_k, B, ldb, C + m * ldc, ldc, accumulate);
  const float* a = A + m * a_m;
  float* c = C + m * ldc;
  switch (M - m) {  // MR <= 8
    case 7: if constexpr (MR > 7) gemm_tile<7, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 6: if constexpr (MR > 6) gemm_tile<6, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 5: if constexpr (MR > 5) gemm_tile<5, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 4: if constexpr (MR > 4) gemm_tile<4, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 3: if constexpr (MR > 3) gemm_tile<3, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 2: if constexpr (MR > 2) gemm_tile<2, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_tile<1, NV>(K, a, a_m, a_k, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Scores of a few query rows (decode): one dot product per (key, row)
// ---------------------------------------------------------------------------------------------------
// st[c * ld + r] = qr[r] . key_row(c) over dp elements (zero padded, or dp == d in place; key_row returns fp32
// rows, or bf16 rows as uint16_t, widened as they are loaded), for keys c < cols and
// rows r < rows (kMaxDotRows at a time); rows [rows, nrows) score 0. Each key row is loaded once and shared by
// the rows, where the product above would spend a broadcast and a mostly-padding register per key element.
constexpr int64_t kMaxDotRows = 4;

template <int R, typename KeyRow>
inline void dot_scores_tile(int64_t cols, int64_t dp, const float* qr, KeyRow key_row, float* st, int64_t ld) {
  using reg = typename Vec::reg;
  for (int64_t c = 0; c < cols; ++c) {
    const auto* k_row = key_row(c);
    reg acc[R];  // R a constant: the accumulators stay in registers (a run-time count spilled them every step)
    for (int r = 0; r < R; ++r) acc[r] = Vec::zero();
    for (int64_t e = 0; e < dp; e += Vec::W) {
      const reg k = Vec::load(k_row + e);
      for (int r = 0; r < R; ++r) acc[r] = Vec::fmadd(Vec::load(qr + r * dp + e), k, acc[r]);
    }
    for (int r = 0; r < R; ++r) st[c * ld + r] = Vec::hsum(acc[r]);
  }
}

template <typename KeyRow>
inline void dot_scores(int64_t rows, int64_t nrows, int64_t cols, int64_t dp, const float* qr, KeyRow key_row,
                       float* st, int64_t ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxDotRows) {  // (callers pass at most kMaxDotRows; more still works)
    const float* q = qr + r0 * dp;
    float* s = st + r0;
    switch (rows - r0) {
      case 1: dot_scores_tile<1>(cols, dp, q, key_row, s, ld); break;
      case 2: dot_scores_tile<2>(cols, dp, q, key_row, s, ld); break;
      case 3: dot_scores_tile<3>(cols, dp, q, key_row, s, ld); break;
      default: dot_scores_tile<kMaxDotRows>(cols, dp, q, key_row, s, ld); break;
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < nrows; ++r) st[c * ld + r] = 0.f;
  }
}

// Rows of one KV head lie nheads_k * head_dim elements apart in K and V, a stride too long for the hardware
// prefetchers to follow across pages: the decode paths fetch the rows a few keys ahead by hand.
constexpr int64_t kPrefetchKeys = 16;  // ~8-16 KB of K and V in flight
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(row) + off);
}
