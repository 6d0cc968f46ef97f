// The fp32 register-blocked micro-kernel shared by the C++ CPU attention kernels (flash attention, the
// sliding-window chunk kernel), and their scratch buffer.
//
// Include it INSIDE the per-instruction-set anonymous namespace of a kernel file, after that file has
// defined `struct Vec` (one SIMD register of Vec::W floats: zero, set1, load, store, fmadd) and switched the
// compiler's target: each copy then has internal linkage and is compiled for its own ISA, so an AVX-512
// instantiation can never be picked by the linker for the AVX2 path. For that reason it includes nothing
// (the including file provides <cstdint>) and uses no std containers.

// Zero-initialised scratch floats, freed at scope exit (no std containers: see the file comment).
struct Scratch {
  float* data;
  explicit Scratch(int64_t n) : data(new float[n]()) {}
  ~Scratch() { delete[] data; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------------------------------------------
// The micro-kernel: C[M x N] (+)= A[M x K] B[K x N]
// ---------------------------------------------------------------------------------------------------
// A(m, k) = A[m * a_m + k * a_k] (so a transposed A costs nothing); B, C row-major with leading dims ldb, ldc.
// An R x NV tile of C (NV registers wide) lives in registers while K streams by: per k, NV loads of B and R
// broadcasts of A feed R * NV FMAs.
template <int R, int NV>
inline void gemm_tile(int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb, float* C,
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
template <int MR, int NV>
inline void gemm_strip(int64_t M, int64_t K, const float* A, int64_t a_m, int64_t a_k, const float* B, int64_t ldb,
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
