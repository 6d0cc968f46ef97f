// CPU kernels of sliding-window attention over a rolling KV buffer.
//
// Math: the query at absolute position p = seqlens[b] + t attends to positions lo = max(0, p - W + 1) .. p:
//   out = sum_j softmax_j(s_j) v_j,  s_j = scale * q . k_j (then softcap * tanh(s_j / softcap) if softcap > 0),
// position j read from the chunk (j >= seqlens[b], row j - seqlens[b]) or from the ring (slot j % W): the
// wrap-around is index math inside the kernels; the ring is never unrolled or concatenated with the chunk.
//
// Four kernels:
// - bf16 chunks of 16+ tokens on CPUs with AMX tiles: cpu/chunk_attn_amx.cpp, the flash-attention AMX forward of
//   one head, its K / V packed per KV head (the tiles' layout) from the ring and the chunk;
// - other chunks of 32+ tokens: the flash-attention forward kernels (run_chunk_flash), which copy a KV head's
//   window into contiguous per-thread rows once and stream it per block of queries;
// - other calls on CPUs with AVX2: the blocked kernel in cpu/chunk_attn_kernel.h (query blocks x key tiles
//   gathered per block; per-key dot products with K / V read in place for decode; AVX-512 or AVX2);
// - other CPUs: the portable per-row kernel below, at::parallel_for over (batch, kv head, query row); a task loads
//   the G = nheads / nheads_k query heads of its KV head (GQA), then walks the window in blocks of kKeyBlock keys:
//   each K/V block is converted to fp32 once and used by all G heads, with an online (running max / sum) softmax
//   in fp32; inner loops over head_dim are `omp simd`.
//
// Bound: decode reads each K/V row of the window once per KV head: memory bandwidth, at a stride of
// nheads_k * head_dim between a head's rows. Chunks are FMA bound in the blocked kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/cpu/attention_cpu_host.h"
#include "common/cpu_amx.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "sliding_window/cpu/chunk_attn.h"
#include "sliding_window/sliding_window_common.h"

namespace llmkernels::sliding_window {
namespace {

constexpr int64_t kKeyBlock = 32;
constexpr int64_t kMinAmxChunk = 16;    // tokens per chunk from which bf16 goes to the AMX kernel
constexpr int64_t kMinFlashChunk = 32;  // ... and other chunks to the flash-attention kernels (at 16 tokens,
                                        // one query block per KV head, the copy is not reused: level)

#define LLMK_INLINE inline __attribute__((always_inline))

// (batch, seqlen, heads, head_dim) tensor with a contiguous last dimension, addressed by row.
template <typename T>
struct Rows {
  T* base;
  int64_t sb, ss, sh;
  LLMK_INLINE T* row(int64_t b, int64_t s, int64_t h) const { return base + b * sb + s * ss + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename scalar_t>
struct AttnParams {
  Rows<const scalar_t> q, k, v, k_ring, v_ring;
  Rows<scalar_t> out;
  const int32_t* seqlens;
  int64_t chunk, nheads_k, group, head_dim, window;
  float scale, softcap;
};

LLMK_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// e^x for x <= 0 (a score minus the running max), written so `omp simd` loops vectorise it (std::exp is a
// scalar libm call, and it dominated the per-key cost): e^x = 2^n * e^r, n = round(x log2 e), |r| <= ln2 / 2,
// e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative, below fp32 rounding).
LLMK_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 ~ 1.6e-38: still a normal float, and far below any softmax weight that counts
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // x - n ln2 in two parts (exact-ish)
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  return p * std::bit_cast<float>(bits);
}

template <typename scalar_t>
LLMK_INLINE void load_float(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Per-thread scratch: the G query rows, their accumulators, one converted K/V block and the scores.
struct Scratch {
  std::vector<float> q, acc, kbuf, vbuf, m, l;
  Scratch(int64_t group, int64_t d)
      : q(group * d), acc(group * d), kbuf(kKeyBlock * d), vbuf(kKeyBlock * d), m(group), l(group) {}
};

// One task: query row t of batch row b against KV head hk, all G query heads of that KV head.
template <typename scalar_t>
LLMK_INLINE void attend_row_group(const AttnParams<scalar_t>& p, int64_t b, int64_t t, int64_t hk, Scratch& s) {
  const int64_t d = p.head_dim, G = p.group, W = p.window;
  const int64_t n = p.seqlens[b];
  const int64_t pos = n + t;
  const int64_t lo = std::max<int64_t>(0, pos - W + 1);
  for (int64_t g = 0; g < G; ++g) {
    const scalar_t* qrow = p.q.row(b, t, hk * G + g);
    float* qf = s.q.data() + g * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) qf[i] = static_cast<float>(qrow[i]) * p.scale;
    std::fill_n(s.acc.data() + g * d, d, 0.f);
    s.m[g] = -std::numeric_limits<float>::infinity();
    s.l[g] = 0.f;
  }
  const float* kp[kKeyBlock];
  const float* vp[kKeyBlock];
  float score[kKeyBlock];
  for (int64_t j0 = lo; j0 <= pos; j0 += kKeyBlock) {
    const int64_t nb = std::min<int64_t>(kKeyBlock, pos + 1 - j0);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t j = j0 + jj;  // absolute position: newer than the ring -> the chunk, else slot j % W
      const scalar_t* krow = j >= n ? p.k.row(b, j - n, hk) : p.k_ring.row(b, j % W, hk);
      const scalar_t* vrow = j >= n ? p.v.row(b, j - n, hk) : p.v_ring.row(b, j % W, hk);
      if constexpr (std::is_same_v<scalar_t, float>) {
        kp[jj] = krow;
        vp[jj] = vrow;
      } else {  // convert once per block, shared by the G heads
        load_float(krow, s.kbuf.data() + jj * d, d);
        load_float(vrow, s.vbuf.data() + jj * d, d);
        kp[jj] = s.kbuf.data() + jj * d;
        vp[jj] = s.vbuf.data() + jj * d;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qf = s.q.data() + g * d;
      float* acc = s.acc.data() + g * d;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t jj = 0; jj < nb; ++jj) {
        float x = dot(qf, kp[jj], d);
        if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
        score[jj] = x;
        block_max = std::max(block_max, x);
      }
      const float m_new = std::max(s.m[g], block_max);
      const float alpha = std::exp(s.m[g] - m_new);  // 0 on the first block (m = -inf)
      float l = s.l[g] * alpha;
      if (alpha != 1.f) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
      }
#pragma omp simd reduction(+ : l)
      for (int64_t jj = 0; jj < nb; ++jj) {
        score[jj] = exp_nonpositive(score[jj] - m_new);  // now the unnormalised probability
        l += score[jj];
      }
      for (int64_t jj = 0; jj < nb; ++jj) {
        const float pr = score[jj];
        const float* vrow = vp[jj];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += pr * vrow[i];
      }
      s.m[g] = m_new;
      s.l[g] = l;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / s.l[g];  // l >= 1: every query sees at least itself
    const float* acc = s.acc.data() + g * d;
    scalar_t* orow = p.out.row(b, t, hk * G + g);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) orow[i] = static_cast<scalar_t>(acc[i] * inv);
  }
}

// Tasks [begin, end) of the flattened (batch, query row, kv head) grid: the portable kernel.
template <typename scalar_t>
void attend_tasks(const AttnParams<scalar_t>& p, int64_t begin, int64_t end) {
  Scratch s(p.group, p.head_dim);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t hk = task % p.nheads_k;
    const int64_t t = (task / p.nheads_k) % p.chunk;
    const int64_t b = task / (p.nheads_k * p.chunk);
    attend_row_group(p, b, t, hk, s);
  }
}

cpu::RowView view_of(const at::Tensor& t) {
  return {const_cast<void*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Chunks of kMinFlashChunk tokens or more that the AMX kernel does not take go through the flash-attention forward
// kernels (attention/cpu/flash_attn_kernel.h), which read the window through their per-thread copy of a KV head's
// keys (AttnParams::ring_seen: key s of batch b is position max(0, seen - W + 1) + s, from the ring before the
// chunk). They keep the queries across SIMD lanes and the running max lazily, where the blocked kernel gathered
// every key tile again for each block of queries. False (nothing done) when the window's copy would not fit
// kMaxKVPackBytes (64 MB per thread: fp32 W 65k at head_dim 128; copies past 4 MB are made again each call, their
// page faults well under 1% of such a call's products).
bool run_chunk_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_ring,
                     const at::Tensor& v_ring, const at::Tensor& seqlens, at::Tensor& out, const Dims& dims,
                     float scale, float softcap) {
  namespace fa = ::llmkernels::attention_cpu;
  fa::AttnParams p = fa::make_params("rolling_window_attn", q, k, v, scale, -1, 0, softcap);
  const int32_t* seen = seqlens.data_ptr<int32_t>();
  std::vector<int32_t> keys(dims.batch);  // the window's keys before the chunk, then the chunk
  for (int64_t b = 0; b < dims.batch; ++b) {
    keys[b] = static_cast<int32_t>(std::min<int64_t>(seen[b], dims.window - 1) + dims.chunk);
    p.seqlen_k = std::max<int64_t>(p.seqlen_k, keys[b]);
  }
  if (2 * p.seqlen_k * dims.head_dim * 4 > fa::kMaxKVPackBytes) return false;
  p.seqlens_k = keys.data();
  p.ring_seen = seen;
  p.k_ring = fa::view4(k_ring);
  p.v_ring = fa::view4(v_ring);
  p.ring_window = dims.window;
  p.window_left = dims.window - 1;  // (seqlen_k counts the window: a reach of W - 1 is never past it)
  out = std::get<0>(fa::run_forward(p, q));
  return true;
}

void run_chunk_blocked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_ring,
                       const at::Tensor& v_ring, const at::Tensor& seqlens, at::Tensor& out, const Dims& dims,
                       float scale, float softcap) {
  const int64_t group = dims.nheads / dims.nheads_k;
  cpu::ChunkParams p{};
  p.q = view_of(q);
  p.k = view_of(k);
  p.v = view_of(v);
  p.k_ring = view_of(k_ring);
  p.v_ring = view_of(v_ring);
  p.out = view_of(out);
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.batch = dims.batch;
  p.chunk = dims.chunk;
  p.nheads_k = dims.nheads_k;
  p.group = group;
  p.head_dim = dims.head_dim;
  p.window = dims.window;
  // About 64 rows per task (a 64-row score tile), whole GQA groups, never more positions than the chunk has.
  p.block_q = std::min<int64_t>(dims.chunk, std::max<int64_t>(1, 64 / group));
  p.scale = scale;
  p.softcap = softcap;
  p.dtype = q.scalar_type() == at::kFloat ? cpu::Dtype::kFloat32
            : q.scalar_type() == at::kHalf ? cpu::Dtype::kFloat16
                                           : cpu::Dtype::kBFloat16;
  const bool avx512 = use_avx512();
  // bf16 chunks of 16 or more tokens on AMX tiles (cpu/chunk_attn_amx.cpp): one task per (batch, query head).
  const bool amx = p.dtype == cpu::Dtype::kBFloat16 && dims.chunk >= kMinAmxChunk && dims.head_dim % 32 == 0 &&
                   use_amx_tiles();
  if (!amx && dims.chunk >= kMinFlashChunk &&
      run_chunk_flash(q, k, v, k_ring, v_ring, seqlens, out, dims, scale, softcap)) {
    return;
  }
  const int64_t tasks = amx ? dims.batch * dims.nheads : cpu::chunk_attn_tasks(p);
  const double macs = 2.0 * static_cast<double>(dims.batch * dims.chunk * dims.nheads) *
                      static_cast<double>(dims.window) * dims.head_dim;  // (every query against a whole window)
  at::parallel_for(0, tasks, parallel_grain(tasks, macs, kMinAttnMacsPerThread), [&](int64_t begin, int64_t end) {
    const ::llmkernels::FlushDenormals ftz;  // masked scores: see common/cpu_parallel.h
    if (amx) {
      cpu::chunk_attn_amx(p, begin, end);
    } else if (avx512) {
      cpu::chunk_attn_avx512(p, begin, end);
    } else {
      cpu::chunk_attn_avx2(p, begin, end);
    }
  });
}

template <typename scalar_t>
void run_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_ring,
              const at::Tensor& v_ring, const at::Tensor& seqlens, at::Tensor& out, const Dims& dims, float scale,
              float softcap) {
  AttnParams<scalar_t> p{rows_of<const scalar_t>(q),
                         rows_of<const scalar_t>(k),
                         rows_of<const scalar_t>(v),
                         rows_of<const scalar_t>(k_ring),
                         rows_of<const scalar_t>(v_ring),
                         rows_of<scalar_t>(out),
                         seqlens.data_ptr<int32_t>(),
                         dims.chunk,
                         dims.nheads_k,
                         dims.nheads / dims.nheads_k,
                         dims.head_dim,
                         dims.window,
                         scale,
                         softcap};
  // (the blocked kernel's decode path beat this one even for 1 row per KV head: 1 thread, W = 4096, d = 128,
  // 8 KV heads: fp32 2.1 vs 2.7 ms, bf16 1.2 vs 1.7 ms)
  if (use_avx512() || use_avx2()) {
    run_chunk_blocked(q, k, v, k_ring, v_ring, seqlens, out, dims, scale, softcap);
    return;
  }
  const int64_t tasks = dims.batch * dims.chunk * dims.nheads_k;
  // A task is one window of keys for G heads; a few per chunk amortise the scratch allocation.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dims.window * p.group));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const ::llmkernels::FlushDenormals ftz;  // masked scores: see common/cpu_parallel.h
    attend_tasks(p, begin, end);
  });
}

at::Tensor rolling_window_attn_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_ring, const at::Tensor& v_ring, const at::Tensor& seqlens,
                                   double softmax_scale, double softcap) {
  constexpr const char* op = "rolling_window_attn";
  const Dims dims = check_attn_args(op, q, k, v, k_ring, v_ring, seqlens, softmax_scale, softcap, c10::DeviceType::CPU);
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < dims.batch; ++b) {
    LLMK_CHECK_ARG(lens[b] >= 0, op, "seqlens", "must be >= 0, got ", lens[b], " in row ", b);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());  // every element is written below
  if (out.numel() == 0) return out;  // (no query heads: the kernels' GQA group would be 0, a divisor)
  const auto scale = static_cast<float>(softmax_scale), cap = static_cast<float>(softcap);
  switch (q.scalar_type()) {
    case at::kFloat: run_attn<float>(q, k, v, k_ring, v_ring, seqlens, out, dims, scale, cap); break;
    case at::kHalf: run_attn<c10::Half>(q, k, v, k_ring, v_ring, seqlens, out, dims, scale, cap); break;
    default: run_attn<c10::BFloat16>(q, k, v, k_ring, v_ring, seqlens, out, dims, scale, cap); break;
  }
  return out;
}

// Copies the chunk's last min(S, W) tokens of every row into ring slot (seqlens[b] + t) % W.
void rolling_cache_append_cpu(at::Tensor& k_ring, at::Tensor& v_ring, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& seqlens) {
  constexpr const char* op = "rolling_cache_append";
  const Dims dims = check_chunk_and_ring(op, k, v, k_ring, v_ring, seqlens, c10::DeviceType::CPU);
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < dims.batch; ++b) {
    LLMK_CHECK_ARG(lens[b] >= 0, op, "seqlens", "must be >= 0, got ", lens[b], " in row ", b);
  }
  const int64_t first = std::max<int64_t>(0, dims.chunk - dims.window);
  const int64_t row_bytes = dims.head_dim * k.element_size();
  const auto* kb = static_cast<const char*>(k.data_ptr());
  const auto* vb = static_cast<const char*>(v.data_ptr());
  auto* krb = static_cast<char*>(k_ring.data_ptr());
  auto* vrb = static_cast<char*>(v_ring.data_ptr());
  const int64_t esz = k.element_size();
  const int64_t count = dims.chunk - first;
  at::parallel_for(0, dims.batch * count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / count, t = first + i % count;
      const int64_t slot = (lens[b] + t) % dims.window;
      for (int64_t h = 0; h < dims.nheads_k; ++h) {
        const int64_t dst = ((b * dims.window + slot) * dims.nheads_k + h) * dims.head_dim * esz;
        std::memcpy(krb + dst, kb + (b * k.stride(0) + t * k.stride(1) + h * k.stride(2)) * esz, row_bytes);
        std::memcpy(vrb + dst, vb + (b * v.stride(0) + t * v.stride(1) + h * v.stride(2)) * esz, row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("rolling_window_attn", &rolling_window_attn_cpu);
  m.impl("rolling_cache_append", &rolling_cache_append_cpu);
}

}  // namespace llmkernels::sliding_window
