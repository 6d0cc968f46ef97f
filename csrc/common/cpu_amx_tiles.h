// Our own AMX tile micro-kernels (Sapphire Rapids and later), for files compiled with target("amx-tile,amx-bf16")
// (kernel_amx*.cpp): calling the tile instructions directly costs nothing per call, where ATen's brgemm costs
// microseconds, and lets each kernel size its blocks for L1. Include inside the file's anonymous namespace, after
// <immintrin.h>. The host checks that the CPU has the tiles and that Linux lets this process use them
// (common/cpu_amx.h use_amx_tiles) before any of this runs.
//
// One configuration for every kernel: 8 tiles of 16 rows x 64 bytes. tmm0-3 accumulate a 32 x 32 fp32 block of C
// (2 x 2 tiles of 16 x 16), tmm4-5 hold two 16-row strips of A (16 rows x 32 bf16), tmm6-7 two 16-column strips of
// B in its pair-interleaved layout (16 pairs of rows x 16 columns, one 32-bit word per pair).

struct AmxTiles {  // configures this thread's tiles for its lifetime
  AmxTiles() {
    alignas(64) uint8_t config[64] = {};
    config[0] = 1;  // palette 1
    for (int t = 0; t < 8; ++t) {
      config[16 + 2 * t] = 64;  // bytes per row (little-endian uint16)
      config[48 + t] = 16;      // rows
    }
    // (GCC 12 does not see _tile_loadconfig read the array and drops the stores above without this barrier)
    asm volatile("" : : "r"(config) : "memory");
    _tile_loadconfig(config);
  }
  ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// C (M x N fp32, row stride ldc) = or += A (M x K bf16, row stride lda) B (K x N bf16, packed as (K / 2, N) words
// of row pairs, row stride ldb words). M, N and K multiples of 32 (callers pad). Row blocks outer: a 32-row strip
// of A stays in L1 while B streams past it.
inline void amx_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const uint32_t* b_words = reinterpret_cast<const uint32_t*>(B);
  const int64_t a_stride = lda * 2, b_stride = ldb * 4, c_stride = ldc * 4;  // bytes
  for (int64_t m = 0; m < M; m += 32) {
    const uint16_t* a = A + m * lda;
    for (int64_t n = 0; n < N; n += 32) {
      float* c = C + m * ldc + n;
      if (accumulate) {
        _tile_loadd(0, c, c_stride);
        _tile_loadd(1, c + 16, c_stride);
        _tile_loadd(2, c + 16 * ldc, c_stride);
        _tile_loadd(3, c + 16 * ldc + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, a + k, a_stride);
        _tile_loadd(5, a + 16 * lda + k, a_stride);
        _tile_loadd(6, b_words + (k / 2) * ldb + n, b_stride);
        _tile_loadd(7, b_words + (k / 2) * ldb + n + 16, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, c_stride);
      _tile_stored(1, c + 16, c_stride);
      _tile_stored(2, c + 16 * ldc, c_stride);
      _tile_stored(3, c + 16 * ldc + 16, c_stride);
    }
  }
}
