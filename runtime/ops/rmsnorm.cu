// RMSNorm on the GPU (see rmsnorm.h), statistics in fp32:
//   forward, one block per row: rstd = 1 / sqrt(sum(x^2) / D + eps),
//     y = w * (x * rstd); for 16-bit x the normalized value is rounded to x's type before the
//     weight multiply, as HF LlamaRMSNorm does (hidden.to(input_dtype) * weight).
//   backward (r = rstd, g = w * dy): dx = r * g - x * r^3 * mean(g * x); dw += sum_n dy * x * r.
//     dw is reduced deterministically: a fixed number of blocks each own a fixed set of rows and
//     sum their contributions per column in row order (shared memory, or global scratch for very
//     wide rows); a second kernel adds the per-block partials in block order.
// x, y, dy, dx: f32/bf16/f16 (same type); w, dw: f32 or x's type; rstd: f32.
// Fast path (rows of 16-byte-aligned packs, D <= 4 packs per thread): each thread keeps its
// packs of x / dy / w and its dw columns in registers; rows of at most 4 packs a lane (D <= 1024
// in bf16) take a warp each instead of a block in the forward (rms_fwd_warp); otherwise element
// loops (dw partial in shared memory, or global scratch for very wide rows).
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

constexpr int kThreads = 256;
constexpr int kMaxPartialBlocks = 256;
constexpr int64_t kSmemCols = 11 * 1024;  // dw partial in shared memory (< 48 KiB) up to this width

template <typename T, typename W>
__global__ void rms_fwd(const T* x, const W* w, float eps, T* y, float* rstd, int64_t d) {
  pdl_begin();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float nrm = to_f(from_f<T>(to_f(xr[j]) * r));  // rounded to T (identity for f32)
    yr[j] = from_f<T>(to_f(w[j]) * nrm);
  }
}

// Block b handles rows b, b + gridDim.x, ...; writes dx and its dw partial row.
template <typename T, typename W, bool kSmem>
__global__ void rms_bwd(const T* dy, const T* x, const W* w, const float* rstd, const T* res, T* dx,
                        float* partial, int64_t n, int64_t d) {
  pdl_begin();
  extern __shared__ float dw_s[];
  __shared__ float scratch[32];
  float* acc = kSmem ? dw_s : partial + blockIdx.x * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) acc[j] = 0.f;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* gr = dy + row * d;
    const T* xr = x + row * d;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      dot += to_f(w[j]) * to_f(gr[j]) * to_f(xr[j]);
    dot = block_sum(dot, scratch);  // also orders the acc writes above
    const float c = r * r * r * dot / static_cast<float>(d);
    T* dxr = dx + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const float g = to_f(gr[j]), xv = to_f(xr[j]);
      acc[j] += g * xv * r;  // each column belongs to one thread: no race
      dxr[j] = from_f<T>(r * (to_f(w[j]) * g) - xv * c + (res ? to_f(res[row * d + j]) : 0.f));
    }
  }
  if (kSmem) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) partial[blockIdx.x * d + j] = acc[j];
  }
}

constexpr int kFastBlocks = 1024;  // backward: rows are split among this many blocks (at most)

// One row of the packed forward: this thread's packs first, first + stride, ... (at most P, held
// in registers), the row's sum of squares by `sum` (over a block or a warp); the thread with
// first == 0 writes the row's rstd.
template <typename T, typename W, int N, int P, typename Sum>
__device__ __forceinline__ void rms_fwd_row(const T* xr, const W* w, float eps, T* yr, float* rstd_row,
                                            int64_t d, int64_t first, int64_t stride, Sum&& sum) {
  const int64_t np = d / N;
  Pack<T, N> px[P];
  float ss = 0.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t c = first + p * stride;
    if (c < np) {
      px[p] = load_pack<T, N>(xr + c * N);
#pragma unroll
      for (int k = 0; k < N; ++k) ss += to_f(px[p].v[k]) * to_f(px[p].v[k]);
    }
  }
  ss = sum(ss);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  if (first == 0) *rstd_row = r;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t c = first + p * stride;
    if (c < np) {
      const auto pw = load_pack<W, N>(w + c * N);
      Pack<T, N> py;
#pragma unroll
      for (int k = 0; k < N; ++k)
        py.v[k] = from_f<T>(to_f(pw.v[k]) * to_f(from_f<T>(to_f(px[p].v[k]) * r)));
      store_pack<T, N>(yr + c * N, py);
    }
  }
}

// Forward, one block per row, packs of N elements, at most P packs per thread held in registers.
template <typename T, typename W, int N, int P>
__global__ void rms_fwd_vec(const T* x, const W* w, float eps, T* y, float* rstd, int64_t d) {
  pdl_begin();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  rms_fwd_row<T, W, N, P>(x + row * d, w, eps, y + row * d, rstd + row, d, threadIdx.x, blockDim.x,
                          [&](float v) { return block_sum(v, scratch); });
}

// Backward: block b handles rows b, b + gridDim.x, ...; its threads own fixed column packs, so
// w and the dw sums stay in registers; the block's dw partial row is written at the end.
template <typename T, typename W, int N, int P>
__global__ void rms_bwd_vec(const T* dy, const T* x, const W* w, const float* rstd, const T* res,
                            T* dx, float* partial, int64_t n, int64_t d) {
  pdl_begin();
  __shared__ float scratch[32];
  const int64_t np = d / N;
  float wr[P][N], acc[P][N];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(p) * blockDim.x;
#pragma unroll
    for (int k = 0; k < N; ++k) acc[p][k] = wr[p][k] = 0.f;
    if (c < np) {
      const auto pw = load_pack<W, N>(w + c * N);
#pragma unroll
      for (int k = 0; k < N; ++k) wr[p][k] = to_f(pw.v[k]);
    }
  }
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float r = rstd[row];
    Pack<T, N> pg[P], px[P], pr[P];
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(p) * blockDim.x;
      pr[p] = Pack<T, N>{};
      if (c < np) {
        pg[p] = load_pack<T, N>(dy + row * d + c * N);
        px[p] = load_pack<T, N>(x + row * d + c * N);
        // The residual is loaded with dy and x, before the row's reduction: after it, its
        // latency was exposed once a row (each thread reads only the elements it writes, so
        // this holds when dx aliases x or the residual).
        if (res) pr[p] = load_pack<T, N>(res + row * d + c * N);
#pragma unroll
        for (int k = 0; k < N; ++k) dot += wr[p][k] * to_f(pg[p].v[k]) * to_f(px[p].v[k]);
      }
    }
    dot = block_sum(dot, scratch);
    const float cc = r * r * r * dot / static_cast<float>(d);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(p) * blockDim.x;
      if (c < np) {
        Pack<T, N> pd;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float g = to_f(pg[p].v[k]), xv = to_f(px[p].v[k]);
          acc[p][k] += g * xv * r;
          pd.v[k] = from_f<T>(r * (wr[p][k] * g) - xv * cc + (res ? to_f(pr[p].v[k]) : 0.f));
        }
        store_pack<T, N>(dx + row * d + c * N, pd);
      }
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(p) * blockDim.x;
    if (c < np) {
#pragma unroll
      for (int k = 0; k < N; ++k) partial[blockIdx.x * d + c * N + k] = acc[p][k];
    }
  }
}

// Forward of narrow rows (at most kWarpPacks packs, D <= 1024 in bf16): one warp per row,
// kWarpRows rows a block, lane l holding packs l, l + 32, ...; the row's sum by shuffles alone.
// With one block of 96 threads per row (D = 768), block_sum's barriers and a block's launch for
// 1.5 KB of data held the forward at ~2.45 TB/s, against the ~2.78 of a copy; a warp per row runs
// at ~2.73 (docs/performance.md, thirteenth round). The backward stays with blocks: the same
// layout there (its dw columns summed over the block's warps at the end) ran 2% slower.
constexpr int kWarpRows = 8;
constexpr int kWarpPacks = 4;

template <typename T, typename W, int N, int P>
__global__ void rms_fwd_warp(const T* x, const W* w, float eps, T* y, float* rstd, int64_t n, int64_t d) {
  pdl_begin();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  rms_fwd_row<T, W, N, P>(x + row * d, w, eps, y + row * d, rstd + row, d, threadIdx.x & 31, 32,
                          [](float v) { return warp_sum(v); });
}

// Packs per lane of the warp-per-row forward (0: the row is too wide for it).
template <typename T>
int warp_packs(int64_t d) {
  constexpr int N = 16 / sizeof(T);
  const int64_t per = (d / N + 31) / 32;
  return d % N == 0 && per <= kWarpPacks ? static_cast<int>(per) : 0;
}

// Packs per thread for the fast path (0: use the element kernels).
template <typename T, typename W>
int fast_packs(int64_t d, std::initializer_list<const void*> ptrs) {
  constexpr int N = 16 / sizeof(T);
  if (d % N != 0) return 0;
  for (const void* p : ptrs)
    if (!aligned_to(p, 16)) return 0;
  const int64_t per = (d / N + kThreads - 1) / kThreads;
  return per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 0;
}

// The kernel's packs a thread (a lane) for p needed: the first of Ps (ascending) that holds p,
// else the last. The block kernels are built for 1, 2, 4 (fast_packs rounds up), the warp kernel
// for 1-4 (warp_packs).
template <int... Ps>
constexpr int packs_for(int p) {
  int pick = 0, last = 0;
  ((pick = pick == 0 && p <= Ps ? Ps : pick, last = Ps), ...);
  return pick != 0 ? pick : last;
}
static_assert(packs_for<1, 2, 4>(1) == 1 && packs_for<1, 2, 4>(2) == 2 && packs_for<1, 2, 4>(3) == 4 &&
              packs_for<1, 2, 4>(4) == 4 && packs_for<1, 2, 3, 4>(3) == 3 && packs_for<1, 2, 3, 4>(4) == 4);

// Calls f(std::integral_constant<int, packs_for<Ps...>(p)>{}).
template <int... Ps, typename F>
void dispatch_packs(int p, F&& f) {
  const int pick = packs_for<Ps...>(p);
  ((pick == Ps ? f(std::integral_constant<int, Ps>{}) : void()), ...);
}

// Column sums of the blocks' partial rows [rows, d], deterministic (a fixed order for given rows
// and d). Block (x, y) takes 32 columns and the slice of rows [y * per, (y + 1) * per): 8 groups
// of rows each summed by one thread (4 independent sums in flight, coalesced reads), then the 8
// sums in a fixed order. kFinal: dw[j] += the sum (beta 1) or = the sum (beta 0); else out[y * d + j] = the slice's
// sum, for a second pass over the slices. One pass over 1024-2730 partial rows ran 24-64 blocks
// (16-29 us an RMSNorm backward, latency-bound); two fill the GPU.
template <typename W, bool kFinal>
__global__ void sum_partials_dw(const float* partial, int rows, int per, int64_t d, float* out, W* dw,
                                float beta) {
  pdl_begin();
  __shared__ float sm[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int r0 = static_cast<int>(blockIdx.y) * per, r1 = min(rows, r0 + per);
  float s = 0.f;
  if (j < d) {
    const float* p = partial + j;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int b = r0 + static_cast<int>(threadIdx.y);
    for (; b + 24 < r1; b += 32) {
      s0 += p[b * d];
      s1 += p[(b + 8) * d];
      s2 += p[(b + 16) * d];
      s3 += p[(b + 24) * d];
    }
    for (; b < r1; b += 8) s0 += p[b * d];
    s = (s0 + s1) + (s2 + s3);
  }
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) t += sm[y][threadIdx.x];
    if constexpr (kFinal)
      dw[j] = from_f<W>(beta == 0.f ? t : to_f(dw[j]) + t);
    else
      out[blockIdx.y * d + j] = t;
  }
}

// Threads per block of the packed kernels: kThreads for wide rows; for rows of one pack per
// thread, the row's packs rounded up to a warp (D = 768 in bf16: 96 threads, not 256 of which
// 160 would idle and hold back occupancy).
int pack_threads(int64_t d, int n, int packs) {
  if (packs > 1) return kThreads;
  return static_cast<int>(std::min<int64_t>(kThreads, (d / n + 31) / 32 * 32));
}

// Calls f(T{}, W{}) with W = f32 or T.
template <typename F>
void dispatch_tw(DType xt, DType wt, const char* op, F&& f) {
  dispatch_fp(xt, op, [&](auto ttag) {
    using T = decltype(ttag);
    if (wt == DType::F32) f(ttag, float{});
    else if (wt == xt) f(ttag, T{});
    else IEVO_FAIL(op, ": weight dtype ", dtype_name(wt), " must be f32 or the input's ", dtype_name(xt));
  });
}

void check_common(const Tensor& x, const Tensor& w, const Tensor& rstd, const char* op) {
  expect_cuda(x, "x", op);
  expect_cuda(w, "w", op);
  expect_cuda(rstd, "rstd", op);
  IEVO_CHECK(x.dim() == 2, op, ": tensor 'x' must be [N, D], has shape ", shape_str(x.shape()));
  check_shape(w, {x.size(1)}, "w");
  check_shape(rstd, {x.size(0)}, "rstd");
  check_dtype(rstd, DType::F32, "rstd");
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  const char* op = "rmsnorm_forward";
  check_common(x, w, rstd, op);
  expect_cuda(y, "y", op);
  check_shape(y, x.shape(), "y");
  check_dtype(y, x.dtype(), "y");
  const int64_t n = x.size(0), d = x.size(1);
  if (n == 0) return;
  IEVO_CHECK(d > 0, op, ": rows of width 0");
  cudaStream_t s = current_stream();
  dispatch_tw(x.dtype(), w.dtype(), op, [&](auto ttag, auto wtag) {
    using T = decltype(ttag);
    using W = decltype(wtag);
    const bool w_packs = aligned_to(w.raw(), sizeof(W) * (16 / sizeof(T)));
    const int packs = w_packs ? fast_packs<T, W>(d, {x.raw(), y.raw()}) : 0;
    const int lane_packs = packs ? warp_packs<T>(d) : 0;
    if (lane_packs) {
      dispatch_packs<1, 2, 3, 4>(lane_packs, [&](auto pc) {
        constexpr int P = decltype(pc)::value, N = 16 / sizeof(T);
        const auto blocks = static_cast<unsigned>((n + kWarpRows - 1) / kWarpRows);
        launch_kernel("rms_fwd_warp", rms_fwd_warp<T, W, N, P>, blocks, 32 * kWarpRows, 0, s, x.data<T>(),
                      w.data<W>(), static_cast<float>(eps), y.data<T>(), rstd.data<float>(), n, d);
      });
      return;
    }
    if (packs) {
      dispatch_packs<1, 2, 4>(packs, [&](auto pc) {
        constexpr int P = decltype(pc)::value, N = 16 / sizeof(T);
        launch_kernel("rms_fwd_vec", rms_fwd_vec<T, W, N, P>, n, pack_threads(d, N, P), 0, s, x.data<T>(),
                      w.data<W>(), static_cast<float>(eps), y.data<T>(), rstd.data<float>(), d);
      });
      return;
    }
    launch_kernel("rms_fwd", rms_fwd<T, W>, n, kThreads, 0, s, x.data<T>(), w.data<W>(),
                  static_cast<float>(eps), y.data<T>(), rstd.data<float>(), d);
  });
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw, const Tensor& residual, float dw_beta) {
  const char* op = "rmsnorm_backward";
  check_common(x, w, rstd, op);
  expect_cuda(dy, "dy", op);
  expect_cuda(dx, "dx", op);
  expect_cuda(dw, "dw", op);
  check_shape(dy, x.shape(), "dy");
  check_shape(dx, x.shape(), "dx");
  check_shape(dw, w.shape(), "dw");
  check_dtype(dy, x.dtype(), "dy");
  check_dtype(dx, x.dtype(), "dx");
  if (residual.defined()) {
    expect_cuda(residual, "residual", op);
    check_shape(residual, x.shape(), "residual");
    check_dtype(residual, x.dtype(), "residual");
    IEVO_CHECK(residual.is_contiguous(), op, ": tensor 'residual' must be contiguous");
  }
  IEVO_CHECK(dw_beta == 0.0f || dw_beta == 1.0f, op, ": dw_beta must be 0 or 1, got ", dw_beta);
  const int64_t n = x.size(0), d = x.size(1);
  if (n == 0 || d == 0) {
    if (dw_beta == 0.0f) dw.zero_();
    return;
  }
  cudaStream_t s = current_stream();
  int blocks = 0;
  DeviceBuffer partial;
  dispatch_tw(x.dtype(), w.dtype(), op, [&](auto ttag, auto wtag) {
    using T = decltype(ttag);
    using W = decltype(wtag);
    constexpr int N = 16 / sizeof(T);
    const T* res = residual.defined() ? residual.data<T>() : nullptr;
    const int packs = fast_packs<T, W>(d, {dy.raw(), x.raw(), dx.raw(), res ? residual.raw() : dx.raw()});
    const bool fast = packs && aligned_to(w.raw(), sizeof(W) * N);
    const int threads = fast ? pack_threads(d, N, packs) : kThreads;
    // Narrow blocks: proportionally more of them (the same threads in flight).
    blocks = static_cast<int>(std::min<int64_t>(n, fast ? kFastBlocks * (kThreads / threads) : kMaxPartialBlocks));
    partial = DeviceBuffer(static_cast<size_t>(blocks) * d * sizeof(float));
    if (fast) {
      dispatch_packs<1, 2, 4>(packs, [&](auto pc) {
        constexpr int P = decltype(pc)::value;
        launch_kernel("rms_bwd_vec", rms_bwd_vec<T, W, N, P>, blocks, threads, 0, s, dy.data<T>(),
                      x.data<T>(), w.data<W>(), rstd.data<float>(), res, dx.data<T>(), partial.as<float>(), n,
                      d);
      });
    } else if (d <= kSmemCols) {
      launch_kernel("rms_bwd", rms_bwd<T, W, true>, blocks, kThreads, d * sizeof(float), s, dy.data<T>(),
                    x.data<T>(), w.data<W>(), rstd.data<float>(), res, dx.data<T>(), partial.as<float>(), n,
                    d);
    } else {
      launch_kernel("rms_bwd", rms_bwd<T, W, false>, blocks, kThreads, 0, s, dy.data<T>(), x.data<T>(),
                    w.data<W>(), rstd.data<float>(), res, dx.data<T>(), partial.as<float>(), n, d);
    }
  });
  // dw: the partial rows summed in slices of kSliceRows (enough blocks for the whole GPU), then the
  // slices' sums (one slice: directly).
  constexpr int kSliceRows = 128;
  const int slices = (blocks + kSliceRows - 1) / kSliceRows;
  const unsigned col_blocks = static_cast<unsigned>((d + 31) / 32);
  DeviceBuffer sliced;
  if (slices > 1) {
    sliced = DeviceBuffer(static_cast<size_t>(slices) * d * sizeof(float));
    launch_kernel("sum_partials_dw", sum_partials_dw<float, false>, dim3(col_blocks, slices), dim3(32, 8), 0,
                  s, partial.as<float>(), blocks, kSliceRows, d, sliced.as<float>(), nullptr, 1.0f);
  }
  dispatch_fp(dw.dtype(), op, [&](auto wtag) {
    using W = decltype(wtag);
    const float* rows = slices > 1 ? sliced.as<float>() : partial.as<float>();
    const int n_rows = slices > 1 ? slices : blocks;
    launch_kernel("sum_partials_dw", sum_partials_dw<W, true>, dim3(col_blocks, 1), dim3(32, 8), 0, s, rows,
                  n_rows, n_rows, d, nullptr, dw.data<W>(), dw_beta);
  });
}

}  // namespace ievo::ops::cuda
