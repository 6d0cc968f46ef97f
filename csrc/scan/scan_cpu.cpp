// Host side of the selective scan on the CPU: argument checks, the fp32 preprocessing, the parallel split of
// rows, and the reductions of per-row gradients. The forward converts each row (u, delta + delta_bias through
// softplus, z, its B/C slice transposed so each B_t is contiguous) inside its parallel loop, into per-thread
// buffers; the backward likewise reads u, delta, z, dout and writes du, ddelta, dz a block of rows at a time
// (load_tile / store_tile), after packing A, B, C and the initial state whole (prepare_operands).
// The per-row recurrences are in cpu/scan_rows.inc, compiled for AVX-512, AVX2 and scalar and chosen at run time.
// The decode step (selective_state_update) is one kernel call per chunk of channels (update_rows), with no
// whole-tensor passes: b=16, dim=1024, dstate 16, fp32 about 115 us of one core (FMA bound: the exp2 polynomial
// per state vector), the reference about 1.5 ms.
//
// Speed (one 2-core AVX-512 machine, fp32, batch 1, dim 64, seqlen 2048, dstate 16): forward about 0.4 ms
// (~0.35 ns of one core per state element and step, bound by the FMAs of the fp32 exp2), forward + backward
// about 3.5 ms.
//
// Parallelism (at::parallel_for): the forward over (batch, channel) rows, handed out from a shared counter.
// The backward over (batch, part) items, each a range of channels with its own dB/dC accumulator, so that
// per-token B/C gradients (summed over the channels that share them) need no atomics: parts = ceil(threads /
// batch), so the extra memory is about max(threads, batch) x (seqlen, dstate) floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "scan/cpu/host_dtypes.h"
#include "scan/cpu/kernel_table.h"
#include "scan/cpu/scan_kernels.h"
#include "scan/cpu/segments.h"
#include "scan/cpu/state_pool.h"

namespace llmkernels::scan_cpu {
namespace {

bool is_scan_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

#define SCAN_CHECK_FLOAT(op, t) \
  LLMK_CHECK_ARG(is_scan_dtype((t).scalar_type()), op, #t, "must be float32, float16 or bfloat16, got ", (t).scalar_type())

// B or C as the kernels read it: fp32, dstate padded to npad; (dim, npad) when constant, else
// (batch, groups, L, npad) so each B_t is a contiguous vector.
struct PackedBC {
  at::Tensor data;
  int64_t groups = 0;  // 0: constant
  int64_t stride = 0;  // floats between consecutive time steps
  int64_t offset(int64_t b, int64_t d, int64_t dim, int64_t L, int64_t npad) const {
    if (groups == 0) return d * npad;
    return (b * groups + d / (dim / groups)) * L * npad;
  }
};

PackedBC pack_bc(const at::Tensor& M, int64_t batch, int64_t L, int64_t dstate, int64_t npad) {
  if (M.dim() == 2) {
    auto p = at::zeros({M.size(0), npad}, M.options().dtype(at::kFloat));
    p.narrow(1, 0, dstate).copy_(M);
    return {p, 0, 0};
  }
  const at::Tensor G = M.dim() == 3 ? M.unsqueeze(1) : M;  // (batch, groups, dstate, L)
  auto p = at::zeros({batch, G.size(1), L, npad}, M.options().dtype(at::kFloat));
  p.narrow(3, 0, dstate).copy_(G.transpose(2, 3));
  return {p, G.size(1), npad};
}

// (..., dstate) -> fp32 (..., npad), zero padded. may_alias: the caller only reads the result (or means to update
// s in place), so s itself is returned when it already has that layout: decode steps are microseconds of
// arithmetic, and each avoided allocation and copy shows.
at::Tensor pad_state(const at::Tensor& s, int64_t npad, bool may_alias = false) {
  if (may_alias && s.size(-1) == npad && s.scalar_type() == at::kFloat && s.is_contiguous()) return s;
  auto sizes = s.sizes().vec();
  const int64_t dstate = sizes.back();
  sizes.back() = npad;
  auto p = at::zeros(sizes, s.options().dtype(at::kFloat));
  p.narrow(-1, 0, dstate).copy_(s);
  return p;
}

void check_bc(const char* op, const char* name, const at::Tensor& M, int64_t batch, int64_t dim, int64_t dstate,
              int64_t L) {
  SCAN_CHECK_FLOAT(op, M);
  if (M.dim() == 2) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({dim, dstate}), op, name, "must have shape (dim, dstate) = (", dim,
                   ", ", dstate, "), got ", M.sizes());
  } else if (M.dim() == 3) {
    LLMK_CHECK_ARG(M.sizes() == at::IntArrayRef({batch, dstate, L}), op, name, "must have shape (batch, dstate, seqlen) = (",
                   batch, ", ", dstate, ", ", L, "), got ", M.sizes());
  } else {
    LLMK_CHECK_ARG(M.dim() == 4 && M.size(0) == batch && M.size(1) >= 1 && dim % M.size(1) == 0 &&
                       M.size(2) == dstate && M.size(3) == L,
                   op, name, "must have shape (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen)",
                   " with dim % ngroups == 0, for dim ", dim, ", dstate ", dstate, ", seqlen ", L, "; got ", M.sizes());
  }
}

// Shapes shared by forward and backward; every message names the argument.
void check_scan(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& C, const std::optional<at::Tensor>& D_opt, const std::optional<at::Tensor>& z_opt,
                const std::optional<at::Tensor>& delta_bias_opt, const std::optional<at::Tensor>& initial_state_opt) {
  LLMK_CHECK_DIM(op, u, 3);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  SCAN_CHECK_FLOAT(op, u);
  SCAN_CHECK_FLOAT(op, delta);
  LLMK_CHECK_DEVICE(op, u, at::kCPU);  // any strides: rows are read in place, or a tile of them at a time
  // delta (batch, dim, L), or (batch, groups, L) with channel d reading row d / (dim / groups): Mamba-2's delta per
  // head (see delta_rows_per_group)
  LLMK_CHECK_DIM(op, delta, 3);
  const int64_t groups = delta.size(1);
  const bool groups_ok = groups == dim || (groups >= 1 && dim % groups == 0);
  LLMK_CHECK_ARG(delta.size(0) == batch && groups_ok && delta.size(2) == L, op, "delta",
                 "must have shape (batch, dim, seqlen) or (batch, groups, seqlen) with groups dividing dim = ", dim,
                 ", got ", delta.sizes());
  LLMK_CHECK_DIM(op, A, 2);
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  const int64_t dstate = A.size(1);
  LLMK_CHECK_ARG(A.size(0) == dim && dstate >= 1 && dstate <= kMaxState, op, "A",
                 "must have shape (dim, dstate) with dim = ", dim, " and 1 <= dstate <= ", kMaxState, ", got ", A.sizes());
  check_bc(op, "B", B, batch, dim, dstate, L);
  check_bc(op, "C", C, batch, dim, dstate, L);
  if (D_opt) {
    const at::Tensor& D = *D_opt;
    LLMK_CHECK_SHAPE(op, D, dim);
    LLMK_CHECK_DTYPE(op, D, at::kFloat);
  }
  if (delta_bias_opt) {
    const at::Tensor& delta_bias = *delta_bias_opt;
    LLMK_CHECK_SHAPE(op, delta_bias, dim);
    LLMK_CHECK_DTYPE(op, delta_bias, at::kFloat);
  }
  if (z_opt) {
    const at::Tensor& z = *z_opt;
    SCAN_CHECK_FLOAT(op, z);
    LLMK_CHECK_SHAPE(op, z, batch, dim, L);
  }
  if (initial_state_opt) {
    const at::Tensor& initial_state = *initial_state_opt;
    LLMK_CHECK_SHAPE(op, initial_state, batch, dim, dstate);
    LLMK_CHECK_DTYPE(op, initial_state, at::kFloat);
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}})
    LLMK_CHECK_ARG(t->device() == u.device(), op, name, "must be on the CPU like u, got ", t->device());
}

// Channels per row of delta (see check_scan): 1 for a (batch, dim, L) delta, and for dim 0 (a per-head delta of
// heads of 0 channels: the backward divides by this).
int64_t delta_rows_per_group(int64_t dim, const at::Tensor& delta) {
  return delta.size(1) == dim || dim == 0 ? 1 : dim / delta.size(1);
}

// ScanRow r restricted to time steps [t0, t1).
ScanRow segment(ScanRow r, int64_t t0, int64_t t1) {
  r.L = t1 - t0;
  r.u += t0;
  r.delta += t0;
  if (r.z) r.z += t0;
  r.B += t0 * r.b_stride;
  r.C += t0 * r.c_stride;
  return r;
}

// A contiguous fp32 / fp16 / bf16 tensor's data read a row at a time, as fp32. Raw pointer and dtype taken once:
// with short rows (seqlen 1..16) per-row Tensor accessors showed in the forward's time.
struct RowReader {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;

  RowReader() = default;
  explicit RowReader(const at::Tensor& t) : data(t.const_data_ptr()), type(t.scalar_type()) {}

  // Elements [offset, offset + n): read in place when fp32, else converted into buf.
  const float* row(int64_t offset, int64_t n, float* buf) const {
    switch (type) {
      case at::kFloat:
        return static_cast<const float*>(data) + offset;
      case at::kBFloat16:
        kernels().bf16_to_f32(static_cast<const uint16_t*>(data) + offset, buf, n);
        return buf;
      default: {
        const c10::Half* src = static_cast<const c10::Half*>(data) + offset;
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
        return buf;
      }
    }
  }
};

// An fp32 row written into bf16 or fp16 data at [offset, offset + n), rounded as Tensor::to rounds.
void store_row(const float* src, int64_t n, at::ScalarType type, void* data, int64_t offset) {
  if (type == at::kBFloat16) {
    kernels().f32_to_bf16(src, static_cast<uint16_t*>(data) + offset, n);
  } else {
    c10::Half* dst = static_cast<c10::Half*>(data) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  }
}

// Calls f with a null pointer of element type s (float, c10::Half or c10::BFloat16).
template <typename F>
void with_scan_type(at::ScalarType s, F&& f) {
  if (s == at::kFloat) return f(static_cast<float*>(nullptr));
  if (s == at::kBFloat16) return f(static_cast<c10::BFloat16*>(nullptr));
  f(static_cast<c10::Half*>(nullptr));
}

// A (batch, dim, L) tensor with any strides, read and written as fp32 rows: a (batch, channel) row at a time, or a
// tile of consecutive channels at once. Rows with a unit time stride go through RowReader / store_row. For the
// others (Mamba-2's (batch, L, heads, headdim) layout seen as channels: time stride = dim) one row would touch a
// cache line and a page per step, thousands of pages per row (measured: 8x slower than transposing the whole
// tensor first); a tile walks time outermost, reading the tile's channels side by side (one line, one page per
// step) into per-row buffers, and writes its outputs back the same way.
struct StridedRows {
  RowReader flat;
  int64_t sb = 0, sd = 0, st = 1;

  StridedRows() = default;
  explicit StridedRows(const at::Tensor& t) : flat(t), sb(t.stride(0)), sd(t.stride(1)), st(t.stride(2)) {}

  const float* row(int64_t b, int64_t d, int64_t L, float* buf) const {
    const int64_t off = b * sb + d * sd;
    if (st == 1) return flat.row(off, L, buf);
    with_scan_type(flat.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* p = static_cast<const T*>(flat.data) + off;
      for (int64_t t = 0; t < L; ++t) buf[t] = static_cast<float>(p[t * st]);
    });
    return buf;
  }

  // Rows (b, d0 .. d0 + n) into tile, row j at tile + j * ld (ld = L plus a pad: a row stride that is a multiple
  // of 4 KB would put the tile's n writes of one step in one L1 set).
  void gather_tile(int64_t b, int64_t d0, int64_t n, int64_t L, int64_t ld, float* tile) const {
    with_scan_type(flat.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* p = static_cast<const T*>(flat.data) + b * sb + d0 * sd;
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < n; ++j) tile[j * ld + t] = static_cast<float>(p[t * st + j * sd]);
    });
  }

  // The inverse, into `data` (this tensor's strides and dtype).
  void scatter_tile(const float* tile, int64_t b, int64_t d0, int64_t n, int64_t L, int64_t ld, void* data) const {
    with_scan_type(flat.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      T* p = static_cast<T*>(data) + b * sb + d0 * sd;
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < n; ++j) p[t * st + j * sd] = static_cast<T>(tile[j * ld + t]);
    });
  }

  // src (L,) fp32 into row (b, d) of `data` (this tensor's strides and dtype).
  void store(const float* src, int64_t b, int64_t d, int64_t L, void* data) const {
    const int64_t off = b * sb + d * sd;
    if (st == 1) {
      if (flat.type == at::kFloat) {
        float* dst = static_cast<float*>(data) + off;
        if (dst != src) std::copy_n(src, L, dst);
      } else {
        store_row(src, L, flat.type, data, off);
      }
      return;
    }
    with_scan_type(flat.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      T* p = static_cast<T*>(data) + off;
      for (int64_t t = 0; t < L; ++t) p[t * st] = static_cast<T>(src[t]);
    });
  }
};

// Rows (b, d0 .. d0 + n) of in as fp32, row j at rows[j]: read in place where they are fp32 with a unit time stride,
// else converted into tile (row j at tile + j * ld), all at once where time is strided (gather_tile).
void load_tile(const StridedRows& in, int64_t b, int64_t d0, int64_t n, int64_t L, int64_t ld, float* tile,
               const float** rows) {
  if (in.st != 1) in.gather_tile(b, d0, n, L, ld, tile);
  for (int64_t j = 0; j < n; ++j) rows[j] = in.st != 1 ? tile + j * ld : in.row(b, d0 + j, L, tile + j * ld);
}

// The inverse: the tile's rows into out's rows (b, d0 .. d0 + n) of `data`.
void store_tile(const StridedRows& out, const float* tile, int64_t b, int64_t d0, int64_t n, int64_t L, int64_t ld,
                void* data) {
  if (out.st != 1) return out.scatter_tile(tile, b, d0, n, L, ld, data);
  for (int64_t j = 0; j < n; ++j) out.store(tile + j * ld, b, d0 + j, L, data);
}

// rows x dstate elements of in from offset into dst as fp32 rows of npad, zero padded.
void load_rows(const RowReader& in, int64_t offset, int64_t rows, int64_t dstate, int64_t npad, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * npad;
    const float* src = in.row(offset + r * dstate, dstate, d);  // converted into d unless fp32
    if (src != d) std::copy_n(src, dstate, d);
    std::fill(d + dstate, d + npad, 0.0f);
  }
}

// The inverse of load_rows: the first dstate of each fp32 row of npad into data (fp32, bf16 or fp16) at offset.
void store_rows(const float* src, int64_t rows, int64_t dstate, int64_t npad, at::ScalarType type, void* data,
                int64_t offset) {
  for (int64_t r = 0; r < rows; ++r) {
    if (type == at::kFloat) {
      std::copy_n(src + r * npad, dstate, static_cast<float*>(data) + offset + r * dstate);
    } else {
      store_row(src + r * npad, dstate, type, data, offset + r * dstate);
    }
  }
}

// What every row reads besides its own u, delta, z: A, D, B, C in fp32 with padded dstate, and the initial state.
struct Operands {
  int64_t batch, dim, L, dstate, npad;
  at::Tensor A, D, init;
  at::Tensor a_const;  // (dim,) bool: the row of A is one value (row_constant_A)
  PackedBC B, C;

  ScanRow row(int64_t r, const float* u, const float* delta, const float* z) const {
    const int64_t b = r / dim, d = r % dim;
    return ScanRow{L,
                   npad,
                   u,
                   delta,
                   z,
                   A.const_data_ptr<float>() + d * npad,
                   B.data.const_data_ptr<float>() + B.offset(b, d, dim, L, npad),
                   C.data.const_data_ptr<float>() + C.offset(b, d, dim, L, npad),
                   B.stride,
                   C.stride,
                   D.defined() ? D.const_data_ptr<float>()[d] : 0.0f,
                   a_const.const_data_ptr<bool>()[d]};
  }
};

// (dim,) bool: whether row d of A (dim, dstate) holds one value (Mamba-2's per-head A flattened to channels), so
// that the kernels take one exp per step instead of one per state entry (ScanRow::a_const).
at::Tensor row_constant_A(const at::Tensor& A) { return (A == A.narrow(1, 0, 1)).all(1).contiguous(); }

Operands prepare_operands(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                          const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& initial_state) {
  Operands o;
  o.batch = u.size(0), o.dim = u.size(1), o.L = u.size(2), o.dstate = A.size(1), o.npad = padded_state(o.dstate);
  o.A = pad_state(A, o.npad, /*may_alias=*/true);
  o.a_const = row_constant_A(A);
  if (D) o.D = f32(*D);
  // (the backward only reads it; undefined when absent: the rows then start from a zero vector)
  if (initial_state) o.init = pad_state(*initial_state, o.npad, /*may_alias=*/true);
  o.B = pack_bc(B, o.batch, o.L, o.dstate, o.npad);
  o.C = pack_bc(C, o.batch, o.L, o.dstate, o.npad);
  return o;
}

// A per-thread fp32 buffer of at least n floats, uninitialised, reused from call to call: a fresh one per call
// was a fresh allocation to page-fault in (about 1 MB per thread at seqlen 8192). Capped so that one long
// sequence does not pin its buffers for good: above the cap a thread's buffer is freed on its next smaller use.
float* thread_scratch(int64_t n) {
  constexpr int64_t kKeep = int64_t{1} << 20;  // floats (4 MiB) kept between calls
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t size = 0;
  if (n > size || (size > kKeep && n <= kKeep)) {
    buf.reset(new float[std::max<int64_t>(n, 1)]);
    size = n;
  }
  return buf.get();
}

// One (batch, group) slice of a per-token B or C, (dstate, L) in its own dtype, into dst as fp32 (L, npad) with
// zero padding: what the forward's rows read as B_t, C_t. Blocks of time steps keep the transpose's reads and
// writes both in L1.
// src's element (n, t) is at n * sn + t * st: (dstate, L) contiguous, or Mamba-2's (L, groups, dstate) seen as
// (groups, dstate, L) (sn = 1: each B_t already contiguous).
template <typename T>
void pack_slice(const T* src, int64_t sn, int64_t st, int64_t dstate, int64_t L, int64_t npad, float* dst) {
  constexpr int64_t kBlock = 64;
  for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
    const int64_t t1 = std::min(L, t0 + kBlock);
    for (int64_t t = t0; t < t1; ++t) std::fill(dst + t * npad + dstate, dst + (t + 1) * npad, 0.0f);
    if (sn == 1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t n = 0; n < dstate; ++n) dst[t * npad + n] = static_cast<float>(src[t * st + n]);
    } else {
      for (int64_t n = 0; n < dstate; ++n)
        for (int64_t t = t0; t < t1; ++t) dst[t * npad + n] = static_cast<float>(src[n * sn + t * st]);
    }
  }
}

// The forward's rows of a block walk the sequence together kFwdChunk steps at a time (B_t, C_t for 32 steps: 32 KB at
// dstate 128, read from L2 once for the block). Untiled blocks hold fewer rows where their row buffers would pass
// kFwdScratchFloats (a thread's buffers also hold its packed B / C slices, 2 x L x npad floats, and tiled blocks
// always 16 rows).
constexpr int64_t kFwdChunk = 32;
constexpr int64_t kFwdScratchFloats = int64_t{4} << 20;

// The forward's setup was whole-tensor passes around the parallel loop: B/C packed by ATen, a zeroed fp32 state,
// an fp32 output converted after the loop (measured at batch 4, dim 256, seqlen 2048, bf16: about 0.4 ms
// packing, 0.4-1.9 ms converting and page-faulting the output, of 8-9 ms), and a static split of rows that
// waited for whichever thread other processes slowed. Now everything per row happens inside the loop in
// per-thread buffers that stay in cache: u, delta, z rows converted (delta biased and softplus'd in one pass),
// the B/C slice of the row's (batch, group) packed when a thread first needs it, the output row converted
// into the output's dtype, the state read from and written to the callers' (batch, dim, dstate) layout.
std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                          const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                          const std::optional<at::Tensor>& D,
                                                          const std::optional<at::Tensor>& z,
                                                          const std::optional<at::Tensor>& delta_bias,
                                                          bool delta_softplus,
                                                          const std::optional<at::Tensor>& initial_state,
                                                          const std::optional<at::Tensor>& seq_idx) {
  const char* op = "selective_scan_fwd";
  check_scan(op, u, delta, A, B, C, D, z, delta_bias, initial_state);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), dstate = A.size(1), npad = padded_state(dstate);
  // Channels per delta row: 1, or a head's channels (Mamba-2's delta is one row per head, spread here rather than
  // by the caller: an x-sized copy, ~11% of its forward at 80 heads x 2048 tokens).
  const int64_t delta_div = delta_rows_per_group(dim, delta);
  const Segments segs = find_segments(op, seq_idx, batch, L);
  const at::Tensor Ap = pad_state(A, npad, /*may_alias=*/true), a_const = row_constant_A(A);
  const bool* a_const_p = a_const.const_data_ptr<bool>();
  const at::Tensor Df = D ? f32(*D) : at::Tensor(), bias = delta_bias ? f32(*delta_bias) : at::Tensor();
  const at::Tensor init = initial_state ? initial_state->contiguous() : at::Tensor();
  // Constant B / C (dim, dstate) are small: packed once here. Per-token ones per (batch, group) in the loop.
  const PackedBC Bc = B.dim() == 2 ? pack_bc(B, batch, L, dstate, npad) : PackedBC{};
  const PackedBC Cc = C.dim() == 2 ? pack_bc(C, batch, L, dstate, npad) : PackedBC{};
  const int64_t gB = B.dim() == 2 ? 0 : B.dim() == 3 ? 1 : B.size(1);
  const int64_t gC = C.dim() == 2 ? 0 : C.dim() == 3 ? 1 : C.size(1);
  // The output takes u's layout (empty_like keeps a dense permuted layout's strides): a caller that viewed its
  // (batch, L, channels) tensor as (batch, channels, L) gets its output in that layout too, with no transposes.
  at::Tensor out = at::empty_like(u);
  at::Tensor last = at::empty({batch, dim, dstate}, u.options().dtype(at::kFloat));
  const bool out_direct = u.scalar_type() == at::kFloat && out.stride(2) == 1;  // fwd_row writes it in place
  const Kernels& k = kernels();
  // Raw pointers and strides hoisted out of the loop (see RowReader).
  const StridedRows u_in(u), delta_in(delta), z_in = z ? StridedRows(*z) : StridedRows(), out_rows(out);
  // Strided rows go in tiles of kTile channels of one batch element (StridedRows), one tile per work item.
  constexpr int64_t kTile = 16;
  const bool strided = u.stride(2) != 1 || delta.stride(2) != 1 || (z && z->stride(2) != 1) || out.stride(2) != 1;
  const bool tiled = strided && dim % kTile == 0;
  const float *A_p = Ap.const_data_ptr<float>(), *D_p = Df.defined() ? Df.const_data_ptr<float>() : nullptr;
  const float* bias_p = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* init_p = init.defined() ? init.const_data_ptr<float>() : nullptr;
  const float* Bc_p = gB ? nullptr : Bc.data.const_data_ptr<float>();
  const float* Cc_p = gC ? nullptr : Cc.data.const_data_ptr<float>();
  void* out_p = out.data_ptr();
  float* last_p = last.data_ptr<float>();

  // Rows are handed out a block at a time from a shared counter rather than split evenly up front: on a
  // shared machine one thread is often slowed by other processes, and a static split then waits for it.
  // Within a block, the rows that share a B / C slice walk the sequence together, kFwdChunk steps at a time, so
  // the chunk's B_t and C_t are read from L2 once for all of them (a row at a time streamed its whole slice per row:
  // 1.2x at dstate 128, Mamba-2's A). Buffers for up to kTile rows where some can (else one), fewer for very long
  // rows (kFwdScratchFloats).
  const int64_t rows = batch * dim, threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t ld = !tiled ? L : L + ((L + 16) % 1024 == 0 ? 32 : 16);  // (see gather_tile)
  const bool any_together = (gB || gC) && std::any_of(a_const_p, a_const_p + dim, [](bool c) { return c; });
  const int64_t rows_per_buf = tiled ? kTile
                               : any_together ? std::clamp<int64_t>(kFwdScratchFloats / (4 * ld + npad), 1, kTile)
                                              : 1;
  const int64_t block = tiled ? kTile
                              : std::max(std::min(rows_per_buf, (rows + threads - 1) / threads),
                                         32768 / std::max<int64_t>(1, L * npad));  // >= ~10 us
  const int64_t workers = std::min<int64_t>(threads, (rows + block - 1) / block);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    // u, delta, z rows; the output rows when out is not fp32; the states; the packed B and C slices.
    float* const buf = thread_scratch(rows_per_buf * (4 * ld + npad) + (gB ? L * npad : 0) + (gC ? L * npad : 0));
    float *ut = buf, *dt = ut + rows_per_buf * ld, *zt = dt + rows_per_buf * ld, *ot = zt + rows_per_buf * ld;
    float *sb = ot + rows_per_buf * ld, *Bb = sb + rows_per_buf * npad;
    float* Cb = Bb + (gB ? L * npad : 0);
    int64_t packed_B = -1, packed_C = -1;  // the (batch, group) slice now in Bb / Cb
    auto slice = [&](const at::Tensor& M, int64_t groups, int64_t b, int64_t d, int64_t& packed, float* dst) {
      const int64_t bg = b * groups + d / (dim / groups);
      if (bg != packed) {
        const int64_t g = bg % groups, sb_ = M.stride(0), sg = M.dim() == 4 ? M.stride(1) : 0;
        const int64_t sn = M.stride(M.dim() - 2), st = M.stride(M.dim() - 1);
        with_scan_type(M.scalar_type(), [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          pack_slice(M.const_data_ptr<T>() + b * sb_ + g * sg, sn, st, dstate, L, npad, dst);
        });
        packed = bg;
      }
      return static_cast<const float*>(dst);
    };
    // Rows r0 .. r1 of one batch element and one B slice and one C slice, in buffer rows j0 .. j0 + (r1 - r0).
    ScanRow row[kTile];
    float* orow[kTile];
    auto scan_rows = [&](int64_t r0, int64_t r1, int64_t j0, int64_t chunk) {
      const int64_t b = r0 / dim, n = r1 - r0;
      const bool delta_gathered = tiled && delta_div == 1;  // (the tile's delta rows are in dt)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i, d = r % dim, j = j0 + i;
        float *ub = ut + j * ld, *db = dt + j * ld, *zb = zt + j * ld, *state = sb + j * npad;
        // delta + bias through softplus, in one pass from the input row (fp32) or its converted copy in db
        k.delta_row(delta_gathered ? db : delta_in.row(b, d / delta_div, L, db), bias_p ? bias_p[d] : 0.0f,
                    delta_softplus, db, L);
        row[i] = ScanRow{L,
                         npad,
                         tiled ? ub : u_in.row(b, d, L, ub),
                         db,
                         z ? (tiled ? zb : z_in.row(b, d, L, zb)) : nullptr,
                         A_p + d * npad,
                         gB ? slice(B, gB, b, d, packed_B, Bb) : Bc_p + d * npad,
                         gC ? slice(C, gC, b, d, packed_C, Cb) : Cc_p + d * npad,
                         gB ? npad : 0,
                         gC ? npad : 0,
                         D_p ? D_p[d] : 0.0f,
                         a_const_p[d]};
        if (init_p) std::copy_n(init_p + r * dstate, dstate, state);
        std::fill(state + (init_p ? dstate : 0), state + npad, 0.0f);
        orow[i] = out_direct ? static_cast<float*>(out_p) + b * out_rows.sb + d * out_rows.sd : ot + j * ld;
      }
      const int64_t* starts = segs.begin(b);
      for (int64_t s = 0; s < segs.count(b); ++s) {
        if (s > 0) std::fill(sb + j0 * npad, sb + (j0 + n) * npad, 0.0f);  // a new sequence starts from zero
        for (int64_t c0 = starts[s]; c0 < starts[s + 1]; c0 += chunk) {
          const int64_t c1 = std::min(starts[s + 1], c0 + chunk);
          for (int64_t i = 0; i < n; ++i) k.fwd_row(segment(row[i], c0, c1), sb + (j0 + i) * npad, orow[i] + c0);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i, j = j0 + i;
        std::copy_n(sb + j * npad, dstate, last_p + r * dstate);
        if (!out_direct && !tiled) out_rows.store(ot + j * ld, b, r % dim, L, out_p);
      }
    };
    // Where the next B or C slice (or batch element) starts after row r.
    auto slice_end = [&](int64_t r) {
      const int64_t b = r / dim, d = r % dim;
      int64_t end = (b + 1) * dim;
      for (int64_t groups : {gB, gC})
        if (groups > 0) end = std::min(end, b * dim + (d / (dim / groups) + 1) * (dim / groups));
      return end;
    };
    for (int64_t r0; (r0 = next.fetch_add(block)) < rows;) {
      const int64_t r1 = std::min(rows, r0 + block);
      if (tiled) {  // the tile's rows, all of batch element r0 / dim (dim is a multiple of kTile)
        u_in.gather_tile(r0 / dim, r0 % dim, r1 - r0, L, ld, ut);
        if (delta_div == 1) delta_in.gather_tile(r0 / dim, r0 % dim, r1 - r0, L, ld, dt);
        if (z) z_in.gather_tile(r0 / dim, r0 % dim, r1 - r0, L, ld, zt);
      }
      for (int64_t a = r0, e; a < r1; a = e) {
        // Rows walk together only where loading B_t and C_t limits the step: per-token B / C with a row-constant A
        // (Mamba-2's: 3 FMAs per state vector). With an exp per state entry it measured ~7% slower (dstate 64: the
        // rows' inputs then wait in L2), with constant B and C no faster; those rows go one at a time (untiled).
        const bool together = (gB || gC) && a_const_p[a % dim];
        e = std::min({r1, slice_end(a), tiled ? r1 : a + (together ? rows_per_buf : 1)});
        scan_rows(a, e, tiled ? a - r0 : 0, together ? kFwdChunk : L);
      }
      if (tiled && !out_direct) out_rows.scatter_tile(ot, r0 / dim, r0 % dim, r1 - r0, L, ld, out_p);
    }
  });
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx) {
  const char* op = "selective_scan_bwd";
  check_scan(op, u, delta, A, B, C, D, z, delta_bias, initial_state);
  const Segments segs = find_segments(op, seq_idx, u.size(0), u.size(2));
  LLMK_CHECK_SHAPE(op, dout, u.size(0), u.size(1), u.size(2));
  SCAN_CHECK_FLOAT(op, dout);
  if (dlast_state) {
    const at::Tensor& dlast = *dlast_state;
    LLMK_CHECK_SHAPE(op, dlast, u.size(0), u.size(1), A.size(1));
    LLMK_CHECK_DTYPE(op, dlast, at::kFloat);
  }
  const Operands p = prepare_operands(u, A, B, C, D, initial_state);
  const int64_t batch = p.batch, dim = p.dim, L = p.L, npad = p.npad;
  const auto fopt = u.options().dtype(at::kFloat);

  const at::Tensor dlast = dlast_state ? pad_state(*dlast_state, npad, /*may_alias=*/true) : at::Tensor();
  // u, delta, z, dout are read and du, ddelta, dz written in the callers' layouts and dtypes (empty_like keeps a
  // dense permuted layout), a block of rows at a time through per-thread fp32 tiles: Mamba-2's (batch, L, heads,
  // headdim) seen as channels needs no transposed copies either way (they were ~20% of its forward + backward).
  const StridedRows u_in(u), delta_in(delta), z_in = z ? StridedRows(*z) : StridedRows(), dout_in(dout);
  // delta per group of channels (Mamba-2's per head: see the forward): its gradient sums the group's rows, in fp32
  // (ddelta_groups), each group within one thread's part.
  const int64_t delta_div = delta_rows_per_group(u.size(1), delta);
  // (a per-head delta with heads of 0 channels has no rows to write its gradient: zeros)
  at::Tensor du = at::empty_like(u), dz = z ? at::empty_like(*z) : at::Tensor();
  at::Tensor ddelta = delta.size(1) == u.size(1) ? at::empty_like(delta) : at::zeros_like(delta);
  const StridedRows du_out(du), ddelta_out(ddelta), dz_out = z ? StridedRows(dz) : StridedRows();
  at::Tensor ddelta_groups = delta_div == 1 ? at::Tensor() : at::zeros(delta.sizes(), fopt);
  at::Tensor dA_rows = at::zeros({batch, dim, npad}, fopt), dD_rows = at::zeros({batch, dim}, fopt);
  at::Tensor dbias_rows = delta_bias ? at::empty({batch, dim}, fopt) : at::Tensor();
  at::Tensor dinit = at::empty({batch, dim, npad}, fopt);
  const at::Tensor bias = delta_bias ? f32(*delta_bias) : at::Tensor();
  const float* bias_p = bias.defined() ? bias.const_data_ptr<float>() : nullptr;

  // Work items: (batch, part), a part being a range of channels; per-token dB/dC accumulate per item.
  // Parts hold whole delta groups, so that a group's gradient row is summed by one thread.
  const int64_t want_parts = std::clamp<int64_t>((at::get_num_threads() + batch - 1) / std::max<int64_t>(batch, 1),
                                                 1, std::max<int64_t>(dim, 1));  // (batch 0: no items, no division by 0)
  const int64_t per_part = ((dim + want_parts - 1) / want_parts + delta_div - 1) / delta_div * delta_div;
  const int64_t parts = std::max<int64_t>(1, (dim + per_part - 1) / std::max<int64_t>(per_part, 1));
  auto grad_acc = [&](const PackedBC& M) {  // constant: per row (batch, dim, npad); else (batch, parts, groups, L, npad)
    return M.groups == 0 ? at::zeros({batch, dim, npad}, fopt) : at::zeros({batch, parts, M.groups, L, npad}, fopt);
  };
  at::Tensor dB_acc = grad_acc(p.B), dC_acc = grad_acc(p.C);
  auto acc_offset = [&](const PackedBC& M, int64_t b, int64_t part, int64_t d) -> int64_t {
    if (M.groups == 0) return (b * dim + d) * npad;
    return ((b * parts + part) * M.groups + d / (dim / M.groups)) * L * npad;
  };

  // Per row of a block: u, delta before and after softplus, z, dout, du, ddelta, dz (kNumTiles rows of ld floats).
  enum Tile : int64_t { kU, kDeltaPre, kDelta, kZ, kDout, kDu, kDdelta, kDz, kNumTiles };
  const int64_t ld = L + ((L + 16) % 1024 == 0 ? 32 : 16);  // (see gather_tile)
  const int64_t block_rows = std::clamp<int64_t>(
      kBwdScratchFloats / std::max<int64_t>(1, kNumTiles * ld + bwd_scratch_floats(1, L, npad)), 1, kBwdRows);
  const auto& k = kernels();
  at::parallel_for(0, batch * parts, 1, [&](int64_t begin, int64_t end) {
    // (uninitialised, reused between calls: every element is written before it is read)
    float* const scratch = thread_scratch(bwd_scratch_floats(block_rows, L, npad) + kNumTiles * block_rows * ld);
    float* const tiles = scratch + bwd_scratch_floats(block_rows, L, npad);
    auto tile = [&](Tile which, int64_t j) { return tiles + (which * block_rows + j) * ld; };
    // Sequences after a row's first start from zero, and the gradient of their zero start goes nowhere.
    std::vector<float> zero_init(npad, 0.0f), unused_dinit(kBwdRows * npad);
    ScanRow rows[kBwdRows], seg_rows[kBwdRows];
    ScanRowGrad grads[kBwdRows], seg_grads[kBwdRows];
    const float* inits[kBwdRows];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / parts, part = item % parts;
      const int64_t d_end = std::min(dim, (part + 1) * per_part);
      for (int64_t d0 = part * per_part; d0 < d_end; d0 += block_rows) {  // a block of channels, chunk by chunk
        const int64_t nrows = std::min(block_rows, d_end - d0);
        const float *u_rows[kBwdRows], *delta_rows[kBwdRows], *z_rows[kBwdRows] = {}, *dout_rows[kBwdRows];
        load_tile(u_in, b, d0, nrows, L, ld, tile(kU, 0), u_rows);
        if (delta_div == 1) {
          load_tile(delta_in, b, d0, nrows, L, ld, tile(kDeltaPre, 0), delta_rows);
        } else {  // each row its group's row
          for (int64_t j = 0; j < nrows; ++j)
            load_tile(delta_in, b, (d0 + j) / delta_div, 1, L, ld, tile(kDeltaPre, j), delta_rows + j);
        }
        if (z) load_tile(z_in, b, d0, nrows, L, ld, tile(kZ, 0), z_rows);
        load_tile(dout_in, b, d0, nrows, L, ld, tile(kDout, 0), dout_rows);
        for (int64_t j = 0; j < nrows; ++j) {
          const int64_t d = d0 + j, r = b * dim + d;
          // delta + bias (kept for the softplus backward), then through the softplus
          k.delta_row(delta_rows[j], bias_p ? bias_p[d] : 0.0f, false, tile(kDeltaPre, j), L);
          if (delta_softplus) k.delta_row(tile(kDeltaPre, j), 0.0f, true, tile(kDelta, j), L);
          rows[j] = p.row(r, u_rows[j], tile(delta_softplus ? kDelta : kDeltaPre, j), z_rows[j]);
          grads[j] = {dout_rows[j],
                      dlast.defined() ? dlast.const_data_ptr<float>() + r * npad : nullptr,
                      tile(kDu, j),
                      tile(kDdelta, j),
                      z ? tile(kDz, j) : nullptr,
                      dA_rows.data_ptr<float>() + r * npad,
                      dB_acc.data_ptr<float>() + acc_offset(p.B, b, part, d),
                      dC_acc.data_ptr<float>() + acc_offset(p.C, b, part, d),
                      dD_rows.data_ptr<float>() + r,
                      dinit.data_ptr<float>() + r * npad};
        }
        const int64_t* starts = segs.begin(b);
        const int64_t count = segs.count(b);
        for (int64_t s = 0; s < count; ++s) {
          const int64_t t0 = starts[s], t1 = starts[s + 1];
          for (int64_t j = 0; j < nrows; ++j) {
            seg_rows[j] = segment(rows[j], t0, t1);
            ScanRowGrad& gs = seg_grads[j];  // this sequence's slice; only the last one's final state is returned
            gs = grads[j];
            gs.dout += t0, gs.du += t0, gs.ddelta += t0;
            if (gs.dz) gs.dz += t0;
            gs.dB += t0 * rows[j].b_stride, gs.dC += t0 * rows[j].c_stride;
            if (s + 1 < count) gs.dlast = nullptr;
            if (s > 0) gs.dinit = unused_dinit.data() + j * npad;
            const bool given = s == 0 && p.init.defined();
            inits[j] = given ? p.init.const_data_ptr<float>() + (b * dim + d0 + j) * npad : zero_init.data();
          }
          k.bwd_rows(nrows, seg_rows, inits, seg_grads, scratch);
        }
        for (int64_t j = 0; j < nrows; ++j) {  // through the softplus; delta_bias's gradient sums the row
          float* g = tile(kDdelta, j);
          if (delta_softplus) k.softplus_backward(g, tile(kDeltaPre, j), L);
          if (delta_div > 1) {
            float* group_row = ddelta_groups.data_ptr<float>() + (b * delta.size(1) + (d0 + j) / delta_div) * L;
            for (int64_t t = 0; t < L; ++t) group_row[t] += g[t];
          }
          if (!bias_p) continue;
          double sum = 0.0;
          for (int64_t t = 0; t < L; ++t) sum += g[t];
          dbias_rows.data_ptr<float>()[b * dim + d0 + j] = static_cast<float>(sum);
        }
        store_tile(du_out, tile(kDu, 0), b, d0, nrows, L, ld, du.data_ptr());
        if (delta_div == 1) store_tile(ddelta_out, tile(kDdelta, 0), b, d0, nrows, L, ld, ddelta.data_ptr());
        if (z) store_tile(dz_out, tile(kDz, 0), b, d0, nrows, L, ld, dz.data_ptr());
      }
    }
  });

  const int64_t n = p.dstate;
  auto finish_bc = [&](const at::Tensor& acc, const PackedBC& M, const at::Tensor& like) {
    if (M.groups == 0) return acc.sum(0).narrow(1, 0, n).to(like.scalar_type()).contiguous();
    at::Tensor g = acc.sum(1).narrow(3, 0, n).transpose(2, 3);  // (batch, groups, dstate, L)
    if (like.dim() == 3) g = g.squeeze(1);
    return g.to(like.scalar_type()).contiguous();
  };
  auto none = [&] { return at::empty({0}, fopt); };  // a fresh one per output: outputs must not alias
  if (delta_div > 1) ddelta.copy_(ddelta_groups);  // (in delta's layout, as the fake kernel says)
  return {du,
          ddelta,
          dA_rows.sum(0).narrow(1, 0, n).contiguous(),
          finish_bc(dB_acc, p.B, B),
          finish_bc(dC_acc, p.C, C),
          D ? dD_rows.sum(0) : none(),
          z ? dz : none(),
          delta_bias ? dbias_rows.sum(0) : none(),
          initial_state ? dinit.narrow(2, 0, n).contiguous() : none()};
}

at::Tensor selective_state_update_cpu(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D_opt, const std::optional<at::Tensor>& z_opt,
                                      const std::optional<at::Tensor>& dt_bias_opt, bool dt_softplus,
                                      const std::optional<at::Tensor>& state_batch_indices) {
  const char* op = "selective_state_update";
  LLMK_CHECK_DIM(op, x, 2);
  const int64_t batch = x.size(0), dim = x.size(1);
  SCAN_CHECK_FLOAT(op, x);
  SCAN_CHECK_FLOAT(op, dt);
  SCAN_CHECK_FLOAT(op, state);
  LLMK_CHECK_DEVICE(op, x, at::kCPU);
  LLMK_CHECK_SHAPE(op, dt, batch, dim);
  // A (dim,): one value per channel for all its state entries (Mamba-2's per-head A, flattened); dstate is then
  // the state's.
  LLMK_CHECK_ARG(A.dim() == 2 || A.dim() == 1, op, "A", "must be (dim, dstate) or (dim,), got ", A.sizes());
  LLMK_CHECK_DTYPE(op, A, at::kFloat);
  LLMK_CHECK_DIM(op, state, 3);
  const bool a_per_channel = A.dim() == 1;
  const int64_t dstate = a_per_channel ? state.size(2) : A.size(1), npad = padded_state(dstate);
  LLMK_CHECK_ARG(A.size(0) == dim && dstate >= 1 && dstate <= kMaxState, op, "A",
                 "must have shape (dim, dstate) or (dim,) with dim = ", dim, " and 1 <= dstate <= ", kMaxState,
                 ", got ", A.sizes(), " (state ", state.sizes(), ")");
  // state_batch_indices: a pool of states (state_pool.h); without, state has x's batch.
  const bool pooled = state_batch_indices.has_value() && state_batch_indices->defined();
  LLMK_CHECK_SHAPE(op, state, pooled ? state.size(0) : batch, dim, dstate);
  const PoolRows pool = checked_pool_rows(op, "state_batch_indices", state_batch_indices, x, state.size(0));
  const int32_t* state_rows = pool.rows();
  const bool any_skipped = pool.any_skipped;
  LLMK_CHECK_CONTIGUOUS(op, state);
  for (const auto& [name, M] : {std::pair<const char*, const at::Tensor*>{"B", &B}, {"C", &C}}) {
    LLMK_CHECK_ARG(is_scan_dtype(M->scalar_type()), op, name, "must be float32, float16 or bfloat16, got ", M->scalar_type());
    LLMK_CHECK_ARG((M->dim() == 2 && M->size(0) == batch && M->size(1) == dstate) ||
                       (M->dim() == 3 && M->size(0) == batch && M->size(1) >= 1 && dim % M->size(1) == 0 &&
                        M->size(2) == dstate),
                   op, name, "must have shape (batch, dstate) or (batch, ngroups, dstate) with dim % ngroups == 0, for batch ",
                   batch, ", dim ", dim, ", dstate ", dstate, "; got ", M->sizes());
  }
  if (D_opt) {
    const at::Tensor& D = *D_opt;
    LLMK_CHECK_SHAPE(op, D, dim);
    LLMK_CHECK_DTYPE(op, D, at::kFloat);
  }
  if (dt_bias_opt) {
    const at::Tensor& dt_bias = *dt_bias_opt;
    LLMK_CHECK_SHAPE(op, dt_bias, dim);
    LLMK_CHECK_DTYPE(op, dt_bias, at::kFloat);
  }
  if (z_opt) {
    const at::Tensor& z = *z_opt;
    SCAN_CHECK_FLOAT(op, z);
    LLMK_CHECK_SHAPE(op, z, batch, dim);
  }
  // Everything per channel happens in one pass inside the kernel (update_rows): no whole-tensor ATen passes, and
  // the only allocation is the output (and a padded A when dstate is not a multiple of 16). It was 25-30 ns of
  // one core per channel as seqlen-1 scans (fwd_row) plus ATen passes for dt and the epilogue.
  const at::Tensor xc = x.contiguous(), dtc = dt.contiguous(), zc = z_opt ? z_opt->contiguous() : at::Tensor();
  const at::Tensor Bc = B.contiguous(), Cc = C.contiguous();
  const at::Tensor Af = a_per_channel ? A.contiguous() : pad_state(A, npad, /*may_alias=*/true);
  const at::Tensor Df = D_opt ? f32(*D_opt) : at::Tensor(), biasf = dt_bias_opt ? f32(*dt_bias_opt) : at::Tensor();
  const int64_t gB = B.dim() == 2 ? 1 : B.size(1), gC = C.dim() == 2 ? 1 : C.size(1);
  // fp32 states with dstate a multiple of 16 are the kernel's layout: updated in place. Others are converted a
  // chunk of channels at a time into scratch and written back.
  const bool in_place = state.scalar_type() == at::kFloat && dstate == npad;
  at::Tensor out = any_skipped ? at::zeros({batch, dim}, x.options()) : at::empty({batch, dim}, x.options());
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const Kernels& k = kernels();
  const RowReader x_in(xc), dt_in(dtc), z_in = z_opt ? RowReader(zc) : RowReader(), st_in(state);
  const RowReader B_in(Bc), C_in(Cc);
  const float *A_p = Af.const_data_ptr<float>(), *D_p = Df.defined() ? Df.const_data_ptr<float>() : nullptr;
  const float* bias_p = biasf.defined() ? biasf.const_data_ptr<float>() : nullptr;
  void* st_p = state.data_ptr();
  void* out_p = out.data_ptr();

  constexpr int64_t kChannels = 256;  // per work item: 16 KB of fp32 state at dstate 16
  const int64_t chunks = (dim + kChannels - 1) / kChannels, items = batch * chunks;
  auto run_item = [&](int64_t item, float* buf) {
    const int64_t b = item / chunks, d_end = std::min(dim, (item % chunks + 1) * kChannels);
    if (state_rows != nullptr && state_rows[b] < 0) return;  // a pad slot: its output stays 0
    // x, dt, z, out of the chunk when not fp32; B and C rows; the state when not updated in place
    float *xb = buf, *db = xb + kChannels, *zb = db + kChannels, *ob = zb + kChannels, *Bb = ob + kChannels;
    float *Cb = Bb + npad, *sb = Cb + npad;
    for (int64_t d0 = item % chunks * kChannels; d0 < d_end;) {
      // A segment of channels within one B group and one C group.
      const int64_t gsB = dim / gB, gsC = dim / gC;
      const int64_t d1 = std::min({d_end, (d0 / gsB + 1) * gsB, (d0 / gsC + 1) * gsC}), n = d1 - d0;
      auto bc_row = [&](const RowReader& in, int64_t groups, int64_t gs, float* dst) {
        const int64_t offset = (b * groups + d0 / gs) * dstate;
        if (in.type == at::kFloat && dstate == npad) return static_cast<const float*>(in.data) + offset;
        load_rows(in, offset, 1, dstate, npad, dst);
        return static_cast<const float*>(dst);
      };
      const int64_t r0 = b * dim + d0;  // first row
      const int64_t s0 = (state_rows != nullptr ? state_rows[b] : b) * dim + d0;  // its state's first row
      float* st = in_place ? static_cast<float*>(st_p) + s0 * npad : sb;
      if (!in_place) load_rows(st_in, s0 * dstate, n, dstate, npad, sb);
      float* o = out_f32 ? static_cast<float*>(out_p) + r0 : ob;
      k.update_rows(UpdateRows{n,
                               npad,
                               x_in.row(r0, n, xb),
                               dt_in.row(r0, n, db),
                               bias_p ? bias_p + d0 : nullptr,
                               dt_softplus,
                               z_opt ? z_in.row(r0, n, zb) : nullptr,
                               D_p ? D_p + d0 : nullptr,
                               A_p + d0 * (a_per_channel ? 1 : npad),
                               a_per_channel,
                               bc_row(B_in, gB, gsB, Bb),
                               bc_row(C_in, gC, gsC, Cb),
                               st,
                               o});
      if (!in_place) store_rows(sb, n, dstate, npad, state.scalar_type(), st_p, s0 * dstate);
      if (!out_f32) store_row(ob, n, out.scalar_type(), out_p, r0);
      d0 = d1;
    }
  };
  const int64_t scratch = 4 * kChannels + 2 * npad + (in_place ? 0 : kChannels * npad);
  // A small step runs on the calling thread: waking a second one costs more than it saves. Larger ones hand
  // out items from a shared counter (see the forward: a static split waits for the slowest thread).
  constexpr int64_t kSerialFloats = int64_t{1} << 15;  // of state: about 10 us of one core
  const int64_t workers = batch * dim * npad <= kSerialFloats ? 1 : std::min<int64_t>(at::get_num_threads(), items);
  if (workers <= 1) {
    float* buf = thread_scratch(scratch);
    for (int64_t item = 0; item < items; ++item) run_item(item, buf);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      float* buf = thread_scratch(scratch);
      for (int64_t item; (item = next.fetch_add(1)) < items;) run_item(item, buf);
    });
  }
  return out;
}

}  // namespace
}  // namespace llmkernels::scan_cpu

TORCH_LIBRARY_IMPL(llmkernels, CPU, m) {
  m.impl("selective_scan_fwd", &llmkernels::scan_cpu::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &llmkernels::scan_cpu::selective_scan_bwd_cpu);
  m.impl("selective_state_update", &llmkernels::scan_cpu::selective_state_update_cpu);
}
