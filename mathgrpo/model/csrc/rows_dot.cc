// rows_dot: out[v, b] = sum_k rows[v, k] * x[b, k] in fp32 on x86-64 CPUs with AVX-512F, as an XLA FFI
// custom call. It is the sampler's LM head on CPU (mathgrpo/model/cpu_kernels.py says when it is used
// and why; the numbers are in BENCHMARKS.md, session 20).
//
// The head is a product of a tall matrix (the vocabulary's rows, V x D, 311 MB at the bench's shapes)
// with a few columns (the decode step's rows, B <= a few hundred). XLA:CPU's GEMM reached ~0.7 of this
// machine's measured matmul peak on it, because the rows stream from memory once per step. Here each
// thread walks its share of the rows in tiles of MR rows, keeps the tile's MR x 16*NV outputs in
// registers across the whole depth, broadcasts one weight per row per k, and prefetches the rows of
// the tile after next while it computes.
//
// Every output element is one fused multiply-add chain over k = 0, 1, ..., D-1 from 0, whatever the tile
// shape, the thread split or the number of columns: a column's values do not depend on the other columns
// of its call (the sampler's rows must not depend on which rows share their step). The scalar tail rows
// use the same chain (std::fma); the file is compiled with -ffp-contract=off so nothing else is fused.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;      // fp32 per 512-bit register
constexpr int64_t kColumns = 64;    // columns per block: 4 registers
constexpr int64_t kPrefetchTiles = 2;

// The columns packed k-major, one block of kColumns at a time: packed[block][k][c] = x[block*64 + c, k],
// zero beyond B. 64-byte aligned.
struct Packed {
  float* data = nullptr;
  int64_t blocks = 0;
  ~Packed() { std::free(data); }
};

void pack(const float* x, int64_t B, int64_t D, Packed& packed) {
  packed.blocks = (B + kColumns - 1) / kColumns;
  size_t bytes = static_cast<size_t>(packed.blocks * D * kColumns) * sizeof(float);
  packed.data = static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
  for (int64_t block = 0; block < packed.blocks; ++block) {
    float* out = packed.data + block * D * kColumns;
    for (int64_t k = 0; k < D; ++k) {
      for (int64_t c = 0; c < kColumns; ++c) {
        int64_t b = block * kColumns + c;
        out[k * kColumns + c] = b < B ? x[b * D + k] : 0.0f;
      }
    }
  }
}

// MR rows starting at v times NV registers of columns of one packed block; `valid` columns are stored.
template <int MR, int NV>
inline void tile(const float* rows, const float* block, float* out, int64_t v, int64_t D, int64_t B,
                 int64_t column0, int64_t valid, const float* prefetch) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* r = rows + v * D;
  for (int64_t k = 0; k < D; ++k) {
    const float* p = block + k * kColumns;
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_load_ps(p + j * kLanes);
    if (prefetch != nullptr && (k & (kLanes - 1)) == 0) {
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(prefetch + i * D + k), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      __m512 a = _mm512_set1_ps(r[i * D + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* o = out + (v + i) * B + column0;
    for (int j = 0; j < NV; ++j) {
      int64_t left = valid - j * kLanes;
      if (left >= kLanes) {
        _mm512_storeu_ps(o + j * kLanes, acc[i][j]);
      } else if (left > 0) {
        _mm512_mask_storeu_ps(o + j * kLanes, static_cast<__mmask16>((1u << left) - 1u), acc[i][j]);
      }
    }
  }
}

// The tile's row count for NV registers of columns: MR * NV accumulators within the 32 registers.
template <int NV>
constexpr int rows_per_tile() { return NV == 4 ? 6 : NV == 3 ? 8 : NV == 2 ? 12 : 16; }

template <int NV>
void rows_range(const float* rows, const Packed& packed, float* out, int64_t v0, int64_t v1, int64_t V,
                int64_t D, int64_t B) {
  constexpr int MR = rows_per_tile<NV>();
  int64_t v = v0;
  for (; v + MR <= v1; v += MR) {
    int64_t ahead = v + kPrefetchTiles * MR;
    const float* prefetch = ahead + MR <= V ? rows + ahead * D : nullptr;
    for (int64_t block = 0; block < packed.blocks; ++block) {
      int64_t column0 = block * kColumns;
      int64_t valid = std::min<int64_t>(kColumns, B - column0);
      tile<MR, NV>(rows, packed.data + block * D * kColumns, out, v, D, B, column0, valid, prefetch);
      prefetch = nullptr;  // one prefetch pass per tile of rows: the other blocks read it from L1
    }
  }
  for (; v < v1; ++v) {  // the last rows of the range, one at a time: the same chain per element
    for (int64_t b = 0; b < B; ++b) {
      const float* p = packed.data + (b / kColumns) * D * kColumns + b % kColumns;
      float acc = 0.0f;
      for (int64_t k = 0; k < D; ++k) acc = std::fma(rows[v * D + k], p[k * kColumns], acc);
      out[v * B + b] = acc;
    }
  }
}

void rows_range_any(const float* rows, const Packed& packed, float* out, int64_t v0, int64_t v1, int64_t V,
                    int64_t D, int64_t B) {
  // One block of B <= 64 columns: as many registers as it needs. More blocks: 4 registers each, the
  // last block's missing columns packed as zeros and not stored.
  switch (packed.blocks > 1 ? 4 : (B + kLanes - 1) / kLanes) {
    case 1: return rows_range<1>(rows, packed, out, v0, v1, V, D, B);
    case 2: return rows_range<2>(rows, packed, out, v0, v1, V, D, B);
    case 3: return rows_range<3>(rows, packed, out, v0, v1, V, D, B);
    default: return rows_range<4>(rows, packed, out, v0, v1, V, D, B);
  }
}

// Work shared by the calling thread and the tasks it schedules on XLA's intra-op pool: chunks of rows
// taken from an atomic counter, so the call finishes even if no task ever runs (the caller takes every
// chunk); a task that starts after the work is gone returns at once (it holds the state by shared_ptr).
struct Work {
  const float* rows;
  float* out;
  int64_t V, D, B, chunk, chunks;
  Packed packed;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void drain() {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      int64_t v0 = c * chunk, v1 = std::min(V, v0 + chunk);
      rows_range_any(rows, packed, out, v0, v1, V, D, B);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowsDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> out) {
  auto rd = rows.dimensions(), xd = x.dimensions();
  if (rd.size() != 2 || xd.size() != 2 || rd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("rows_dot: rows [V, D] and x [B, D] with the same D expected");
  }
  auto work = std::make_shared<Work>();
  work->rows = rows.typed_data();
  work->out = out->typed_data();
  work->V = rd[0];
  work->D = rd[1];
  work->B = xd[0];
  if (work->V == 0 || work->B == 0) return ffi::Error::Success();
  pack(x.typed_data(), work->B, work->D, work->packed);
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~16 chunks per thread, each a multiple of every tile height (48 = lcm(6, 8, 12, 16)).
  int64_t chunk = std::max<int64_t>(48, (work->V / (16 * threads) + 47) / 48 * 48);
  work->chunk = chunk;
  work->chunks = (work->V + chunk - 1) / chunk;
  for (int64_t t = 1; t < std::min(threads, work->chunks); ++t) {
    pool.Schedule([work] { work->drain(); });
  }
  work->drain();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsDot, RowsDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
