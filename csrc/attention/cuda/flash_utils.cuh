// Small device helpers shared by the flash attention kernels: tensor-core fragments (mma.sync m16n8k16,
// ldmatrix), cp.async copies, fp16/bf16 packing and quad reductions. Every kernel here runs on sm_80+.
//
// Fragment layouts of mma.sync.m16n8k16 (g = lane / 4, t = lane % 4), all "row.col":
//   A 16x16 (4 x b32, 2 elements each): a0 (g, 2t..2t+1), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8)
//   B 16x8  (2 x b32):                  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8  (4 x f32):                  c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// The lower 16 bits of a b32 hold the element with the lower column (A) / lower k (B).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace llmk::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
};

template <>
struct TypeTraits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
};

// ---------------------------------------------------------------------------------------------------
// Tensor cores
// ---------------------------------------------------------------------------------------------------
// c += a * b for one 16x8x16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Shared-memory tiles are row-major with `ld` elements per row (a multiple of 8 plus 8 of padding, so
// that the 8 row addresses of one ldmatrix hit distinct 16-byte bank groups). The four loaders below
// each fill one 16x16 operand (A) or two 16x8 operands (B, for columns n0 and n0 + 8).

// A (16 x 16) at rows r0.., k0.. of a tile stored [row][k].
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int ld, int r0, int k0, int lane) {
  ldmatrix_x4(a, s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8);
}

// A (16 x 16) = transpose of a tile stored [k][row]: rows r0.. of A are columns r0.. of the tile.
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* s, int ld, int r0, int k0, int lane) {
  ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + r0 + ((lane >> 3) & 1) * 8);
}

// B (16 x 16: k0.., n0..) from a tile stored [n][k] (B = tile^T, e.g. K in S = Q K^T).
// b[0], b[1]: columns n0..n0+7; b[2], b[3]: columns n0+8..n0+15.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* s, int ld, int k0, int n0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B (16 x 16: k0.., n0..) from a tile stored [k][n] (e.g. V in O = P V). Same register order as load_b_nk.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* s, int ld, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// ---------------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (16 bytes; src_bytes = 0 writes zeros and reads nothing)
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies rows [0, rows) x columns [0, kHeadDim) of a (row, col) tile into shared memory (row stride ld).
// Row r comes from gmem_row(r) (nullptr when the row is out of range); columns >= d are zero-filled.
// Zero-filled chunks read nothing, but still name `any_valid`, a valid global address, as their source.
template <int kThreads, int kHeadDim, typename T, typename RowPtr>
__device__ __forceinline__ void copy_tile_async(T* s, int ld, int rows, int d, const T* any_valid, RowPtr gmem_row) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const T* src = gmem_row(r);
    const bool valid = src != nullptr && c < d;
    cp_async_16(s + r * ld + c, valid ? src + c : any_valid, valid);
  }
}

// Which keys a query sees (bottom-right aligned band), see the design note in flash_fwd_kernel.cuh:
// key j is visible to query i iff j < seqlen_k and i + shift - left <= j <= i + shift + right, with
// shift = seqlen_k - seqlen_q and a negative bound meaning unbounded.
struct Band {
  int seqlen_k, shift, left, right;
  __device__ __forceinline__ bool visible(int i, int j) const {
    return j < seqlen_k && (left < 0 || j >= i + shift - left) && (right < 0 || j <= i + shift + right);
  }
};

// ---------------------------------------------------------------------------------------------------
// Reductions over the 4 lanes of a quad (the lanes holding one row of a C fragment)
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace llmk::flash
