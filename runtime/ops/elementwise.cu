// CUDA elementwise ops and reductions (see elementwise.h). Element loops move 16 bytes per thread
// when every pointer is 16-byte aligned (scalar otherwise); arithmetic is fp32 for f32/bf16/f16.
// sum_squares is a two-pass reduction in double with a fixed launch shape and tree order, so it
// returns the same bits on every run.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

constexpr int kThreads = 256;

// Runs op.vec(i) for the n / N full packs and op.one(j) for the tail.
template <int N, typename Op>
__global__ void ew_kernel(int64_t n, Op op) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t i = t; i < nvec; i += stride) op.vec(i);
  for (int64_t j = nvec * N + t; j < n; j += stride) op.one(j);
}

template <int N, typename Op>
void launch_ew(const char* name, int64_t n, const Op& op) {
  if (n == 0) return;
  launch_kernel(name, ew_kernel<N, Op>, grid_for((n + N - 1) / N, kThreads), kThreads, 0, current_stream(), n,
                op);
}

// Chooses the packed variant (16 bytes of T per thread) when all pointers allow it.
template <typename T, template <typename, int> class Op, typename... Ptrs>
void run_ew(const char* name, int64_t n, Op<T, 1> op1, Op<T, 16 / sizeof(T)> opv,
            const Ptrs*... ptrs) {
  const bool vec = (aligned_to(ptrs, 16) && ...);
  if (vec) launch_ew<16 / sizeof(T)>(name, n, opv);
  else launch_ew<1>(name, n, op1);
}

template <typename T, int N>
struct FillOp {
  T* x;
  T v;
  __device__ void vec(int64_t i) {
    Pack<T, N> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = v;
    store_pack<T, N>(x + i * N, p);
  }
  __device__ void one(int64_t j) { x[j] = v; }
};

template <typename T, int N>
struct AxpyOp {  // y += a * x
  const T* x;
  T* y;
  float a;
  __device__ void vec(int64_t i) {
    auto px = load_pack<T, N>(x + i * N);
    auto py = load_pack<T, N>(y + i * N);
#pragma unroll
    for (int k = 0; k < N; ++k) py.v[k] = from_f<T>(to_f(py.v[k]) + a * to_f(px.v[k]));
    store_pack<T, N>(y + i * N, py);
  }
  __device__ void one(int64_t j) { y[j] = from_f<T>(to_f(y[j]) + a * to_f(x[j])); }
};

template <typename T, int N>
struct ScaleOp {
  T* x;
  float a;
  __device__ void vec(int64_t i) {
    auto p = load_pack<T, N>(x + i * N);
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = from_f<T>(to_f(p.v[k]) * a);
    store_pack<T, N>(x + i * N, p);
  }
  __device__ void one(int64_t j) { x[j] = from_f<T>(to_f(x[j]) * a); }
};

template <typename T, int N>
struct AddOp {
  const T* a;
  const T* b;
  T* o;
  __device__ void vec(int64_t i) {
    auto pa = load_pack<T, N>(a + i * N);
    auto pb = load_pack<T, N>(b + i * N);
#pragma unroll
    for (int k = 0; k < N; ++k) pa.v[k] = from_f<T>(to_f(pa.v[k]) + to_f(pb.v[k]));
    store_pack<T, N>(o + i * N, pa);
  }
  __device__ void one(int64_t j) { o[j] = from_f<T>(to_f(a[j]) + to_f(b[j])); }
};

template <typename S, typename D, int N>
struct CastOp {
  const S* s;
  D* d;
  __device__ void vec(int64_t i) {
    auto ps = load_pack<S, N>(s + i * N);
    Pack<D, N> pd;
#pragma unroll
    for (int k = 0; k < N; ++k) pd.v[k] = from_f<D>(to_f(ps.v[k]));
    store_pack<D, N>(d + i * N, pd);
  }
  __device__ void one(int64_t j) { d[j] = from_f<D>(to_f(s[j])); }
};

void check_same(const Tensor& x, const Tensor& ref, const char* name, const char* ref_name,
                const char* op) {
  expect_cuda(x, name, op);
  IEVO_CHECK(x.dtype() == ref.dtype(), op, ": tensor '", name, "' has dtype ",
             dtype_name(x.dtype()), ", tensor '", ref_name, "' has ", dtype_name(ref.dtype()));
  IEVO_CHECK(x.shape() == ref.shape(), op, ": tensor '", name, "' has shape ",
             shape_str(x.shape()), ", tensor '", ref_name, "' has ", shape_str(ref.shape()));
}

// ---- sum of squares: pass 1 per-block partials, pass 2 one block ----
constexpr int kSumBlocks = 1024;

// Packs of N elements (16-byte loads when x is 16-byte aligned; N = 1 otherwise), squares summed
// in fp64 (as exact as the element loop; the loads were its bottleneck); the n % N tail element
// by element.
template <typename T, int N>
__global__ void sumsq_partial(const T* x, int64_t n, double* partial) {
  pdl_begin();
  __shared__ double scratch[32];
  double s = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t np = n / N;
  for (int64_t i = first; i < np; i += stride) {
    const auto p = load_pack<T, N>(x + i * N);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const double v = to_f(p.v[k]);
      s += v * v;
    }
  }
  for (int64_t i = np * N + first; i < n; i += stride) {
    const double v = to_f(x[i]);
    s += v * v;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials(const double* partial, int n, double* out) {
  pdl_begin();
  __shared__ double scratch[32];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

template <typename T>
__global__ void finite_kernel(const T* x, int64_t n, int* bad) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if (!isfinite(to_f(x[i]))) *bad = 1;
}

}  // namespace

void fill(Tensor& x, double value) {
  const char* op = "fill";
  expect_cuda(x, "x", op);
  const int64_t n = x.numel();
  if (x.dtype() == DType::I32) {
    const int32_t v = static_cast<int32_t>(value);
    launch_ew<1>(op, n, FillOp<int32_t, 1>{x.data<int32_t>(), v});
    return;
  }
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    T* p = x.data<T>();
    T v;
    if constexpr (std::is_same_v<T, float>) v = static_cast<float>(value);
    else if constexpr (std::is_same_v<T, bf16>) v = __float2bfloat16_rn(static_cast<float>(value));
    else v = __float2half_rn(static_cast<float>(value));
    run_ew<T, FillOp>(op, n, FillOp<T, 1>{p, v}, FillOp<T, 16 / sizeof(T)>{p, v}, p);
  });
}

void axpy(double alpha, const Tensor& x, Tensor& y) {
  const char* op = "axpy";
  expect_cuda(y, "y", op);
  check_same(x, y, "x", "y", op);
  dispatch_fp(y.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    const float a = static_cast<float>(alpha);
    run_ew<T, AxpyOp>(op, y.numel(), AxpyOp<T, 1>{xp, yp, a}, AxpyOp<T, 16 / sizeof(T)>{xp, yp, a},
                      xp, yp);
  });
}

void scale(Tensor& x, double alpha) {
  const char* op = "scale";
  expect_cuda(x, "x", op);
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    T* p = x.data<T>();
    const float a = static_cast<float>(alpha);
    run_ew<T, ScaleOp>(op, x.numel(), ScaleOp<T, 1>{p, a}, ScaleOp<T, 16 / sizeof(T)>{p, a}, p);
  });
}

void add(const Tensor& a, const Tensor& b, Tensor& out) {
  const char* op = "add";
  expect_cuda(out, "out", op);
  check_same(a, out, "a", "out", op);
  check_same(b, out, "b", "out", op);
  dispatch_fp(out.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *ap = a.data<T>(), *bp = b.data<T>();
    T* op_ = out.data<T>();
    run_ew<T, AddOp>(op, out.numel(), AddOp<T, 1>{ap, bp, op_},
                     AddOp<T, 16 / sizeof(T)>{ap, bp, op_}, ap, bp, op_);
  });
}

void cast(const Tensor& src, Tensor& dst) {
  const char* op = "cast";
  expect_cuda(src, "src", op);
  expect_cuda(dst, "dst", op);
  check_shape(dst, src.shape(), "dst");
  const int64_t n = src.numel();
  if (src.dtype() == dst.dtype()) {
    dispatch_fp(src.dtype(), op, [](auto) {});  // dtype check
    if (n > 0 && src.raw() != dst.raw())
      IEVO_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice,
                                      current_stream()));
    return;
  }
  dispatch_fp(src.dtype(), op, [&](auto stag) {
    using S = decltype(stag);
    dispatch_fp(dst.dtype(), op, [&](auto dtag) {
      using D = decltype(dtag);
      const S* s = src.data<S>();
      D* d = dst.data<D>();
      constexpr int N = 4;  // 16 bytes of f32, 8 of bf16/f16
      if (aligned_to(s, N * sizeof(S)) && aligned_to(d, N * sizeof(D)))
        launch_ew<N>(op, n, CastOp<S, D, N>{s, d});
      else
        launch_ew<1>(op, n, CastOp<S, D, 1>{s, d});
    });
  });
}

double sum_squares(const Tensor& x) {
  const char* op = "sum_squares";
  expect_cuda(x, "x", op);
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  DeviceBuffer buf((kSumBlocks + 1) * sizeof(double));
  double* partial = buf.as<double>();
  const unsigned blocks = grid_for(n, kThreads, kSumBlocks);
  cudaStream_t s = current_stream();
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    if (aligned_to(x.raw(), 16))
      launch_kernel("sumsq_partial", sumsq_partial<T, 16 / sizeof(T)>, blocks, kThreads, 0, s, x.data<T>(), n,
                    partial);
    else
      launch_kernel("sumsq_partial", sumsq_partial<T, 1>, blocks, kThreads, 0, s, x.data<T>(), n, partial);
  });
  launch_kernel("sum_partials", sum_partials, 1, 1024, 0, s, partial, static_cast<int>(blocks),
                partial + kSumBlocks);
  double out = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&out, partial + kSumBlocks, sizeof(double),
                                  cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  return out;
}

bool all_finite(const Tensor& x) {
  const char* op = "all_finite";
  expect_cuda(x, "x", op);
  const int64_t n = x.numel();
  if (n == 0) return true;
  DeviceBuffer buf(sizeof(int));
  cudaStream_t s = current_stream();
  IEVO_CUDA_CHECK(cudaMemsetAsync(buf.data(), 0, sizeof(int), s));
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel("finite_kernel", finite_kernel<T>, grid_for(n, kThreads, 4096), kThreads, 0, s, x.data<T>(),
                  n, buf.as<int>());
  });
  int bad = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&bad, buf.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  return bad == 0;
}

}  // namespace ievo::ops::cuda
