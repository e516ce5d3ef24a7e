// Softmax over rows on the GPU, one block a row: the pieces that cross_entropy.cu (the whole
// vocabulary) and vocab_parallel.cu (a rank's slice of it) share, and their loss totals. fp32
// math; a row is read in packs of N elements (N > 1 when packed_rows holds, else 1).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cross_entropy.h"
#include "runtime/tensor.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;  // as in the .cu files that include this

// Threads a block (one row): at least 4 packs each, up to 1024. A long row (V = 32000 in bf16:
// 4000 packs) then has 2 blocks an SM, 264 rows in flight on an H100 (17 MB), so that the
// second read of a row (the gradient after the loss) comes from the L2, not DRAM: the fused
// kernel moves 2 passes' bytes instead of 3. With 256 threads (8 blocks an SM, 67 MB in flight)
// the L2 held too little of them (bench_gpu_kernels, LM-head chunk: 0.305 -> 0.229 ms).
inline unsigned row_threads(int64_t packs) {
  const int64_t t = (packs + 4 * 32 - 1) / (4 * 32) * 32;
  return static_cast<unsigned>(std::min<int64_t>(1024, t));
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the SFU (ex2.approx, relative error < 2^-22), one instruction: the kernels below are
// bound by their instruction issue before DRAM if each element takes expf's ~8.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// e^(x - m) = 2^(x log2(e) - m log2(e)) for x <= m, given ml = m log2(e): one FFMA (its product
// exact before the subtraction) and one SFU instruction. ml's rounding scales every term of a
// row alike, by at most 2^-24 |ml| relative.
__device__ __forceinline__ float exp_below(float x, float ml) { return exp2_approx(fmaf(x, kLog2e, -ml)); }

// N floats to a pack of T, two at a time where T is 16-bit (one packed conversion each pair).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> to_pack(const float* f) {
  Pack<T, N> p;
  if constexpr (std::is_same_v<T, bf16> && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[k], f[k + 1]);
      p.v[k] = h.x;
      p.v[k + 1] = h.y;
    }
  } else if constexpr (std::is_same_v<T, f16> && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      const __half2 h = __floats2half2_rn(f[k], f[k + 1]);
      p.v[k] = h.x;
      p.v[k + 1] = h.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = from_f<T>(f[k]);
  }
  return p;
}

// log sum exp of one row over the block (all threads get it); the row is read in packs of N
// elements (N > 1: v % N == 0 and the row 16-byte aligned). Each thread keeps a running max and
// sum of exp relative to it, updated once a pack: the pack's max first (a rescale only when it
// rises), then its N terms. The block then takes the row's max, each thread rescales its sum to
// it, and the block sums them: two plain reductions instead of merging (max, sum) pairs.
template <typename T, int N>
__device__ float row_lse(const T* x, int64_t v) {
  __shared__ float scratch[32];
  float m = -INFINITY, ml = -INFINITY, s = 0.f;  // ml = m log2(e)
  const int np = static_cast<int>(v / N);
#pragma unroll 4
  for (int c = threadIdx.x; c < np; c += blockDim.x) {
    const auto p = load_pack<T, N>(x + static_cast<int64_t>(c) * N);
    float f[N];
    float pm = -INFINITY;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      f[k] = to_f(p.v[k]);
      pm = fmaxf(pm, f[k]);
    }
    if (pm > m) {
      s = m == -INFINITY ? 0.f : s * exp2_approx((m - pm) * kLog2e);
      m = pm;
      ml = pm * kLog2e;
    }
    if (m == -INFINITY) continue;  // all -inf so far: nothing to add
#pragma unroll
    for (int k = 0; k < N; ++k) s += exp_below(f[k], ml);
  }
  const float rm = block_max(m, scratch);
  s = m == -INFINITY ? 0.f : s * exp2_approx((m - rm) * kLog2e);
  s = block_sum(s, scratch);
  return rm + logf(s);
}

// g = gs * (softmax(x) - onehot(t)) for one row, given its lse (t outside [0, v): no onehot, as
// for a vocabulary slice that does not hold the target). Same element-to-thread map as
// row_lse: element j is read and written by one thread only, so g may alias x.
template <typename T, int N>
__device__ void row_grad(const T* x, int64_t v, int64_t t, float lse, float gs, T* g) {
  const float lse2 = lse * kLog2e;
  const int np = static_cast<int>(v / N);
#pragma unroll 4
  for (int c = threadIdx.x; c < np; c += blockDim.x) {
    const auto p = load_pack<T, N>(x + static_cast<int64_t>(c) * N);
    float e[N];
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = exp_below(to_f(p.v[k]), lse2);
    const int64_t tk = t - static_cast<int64_t>(c) * N;
    if (tk >= 0 && tk < N)  // the target is in this pack
#pragma unroll
      for (int k = 0; k < N; ++k) e[k] -= k == tk ? 1.f : 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] *= gs;
    store_pack<T, N>(g + static_cast<int64_t>(c) * N, to_pack<T, N>(e));
  }
}

// Rows can be read as 16-byte packs: row length a multiple of the pack, both bases aligned.
template <typename T>
inline bool packed_rows(const Tensor& a, const Tensor& b) {
  return (a.size(1) * sizeof(T)) % 16 == 0 && aligned_to(a.raw(), 16) && aligned_to(b.raw(), 16);
}

// Calls f(std::integral_constant<int, N>{}) with N the elements of a 16-byte pack when the rows
// of a and b can be read so (packed_rows), else N = 1: the row kernels' template argument, and
// their block size row_threads(v / N).
template <typename T, typename F>
inline void with_row_pack(const Tensor& a, const Tensor& b, F&& f) {
  if (packed_rows<T>(a, b))
    f(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  else
    f(std::integral_constant<int, 1>{});
}

// A head's loss sum and its count of rows whose target is not kIgnoreIndex.
struct Totals {
  double sum;
  long long count;
};

// The Totals of rows [0, n) (row_loss: each row's loss, 0 where ignored), summed by one block:
// the same order in every run. Thread 0 holds the result.
template <typename R>
__device__ Totals block_totals(const R* row_loss, const int32_t* targets, int64_t n) {
  __shared__ double s1[32];
  __shared__ long long s2[32];
  double s = 0;
  long long c = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    s += row_loss[i];
    c += targets[i] != kIgnoreIndex;
  }
  return Totals{block_sum(s, s1), block_sum(c, s2)};
}

}  // namespace ievo::ops::cuda
