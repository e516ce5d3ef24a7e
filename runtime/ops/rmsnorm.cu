// RMSNorm on the GPU (see rmsnorm.h), statistics in fp32:
//   forward, one block per row: rstd = 1 / sqrt(sum(x^2) / D + eps),
//     y = w * (x * rstd); for 16-bit x the normalized value is rounded to x's type before the
//     weight multiply, as HF LlamaRMSNorm does (hidden.to(input_dtype) * weight).
//   backward (r = rstd, g = w * dy): dx = r * g - x * r^3 * mean(g * x); dw += sum_n dy * x * r.
//     dw is reduced deterministically: a fixed number of blocks each own a fixed set of rows and
//     sum their contributions per column in row order (shared memory, or global scratch for very
//     wide rows); a second kernel adds the per-block partials in block order.
// x, y, dy, dx: f32/bf16/f16 (same type); w, dw: f32 or x's type; rstd: f32.
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
__global__ void rms_bwd(const T* dy, const T* x, const W* w, const float* rstd, T* dx,
                        float* partial, int64_t n, int64_t d) {
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
      dxr[j] = from_f<T>(r * (to_f(w[j]) * g) - xv * c);
    }
  }
  if (kSmem) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) partial[blockIdx.x * d + j] = acc[j];
  }
}

template <typename W>
__global__ void sum_partials_dw(const float* partial, int blocks, int64_t d, W* dw) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partial[b * d + j];
  dw[j] = from_f<W>(to_f(dw[j]) + s);
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
    rms_fwd<T, W><<<n, kThreads, 0, s>>>(x.data<T>(), w.data<W>(), static_cast<float>(eps),
                                         y.data<T>(), rstd.data<float>(), d);
    IEVO_CUDA_LAUNCH_CHECK("rms_fwd");
  });
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw) {
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
  const int64_t n = x.size(0), d = x.size(1);
  if (n == 0 || d == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(n, kMaxPartialBlocks));
  DeviceBuffer partial(static_cast<size_t>(blocks) * d * sizeof(float));
  cudaStream_t s = current_stream();
  const bool smem = d <= kSmemCols;
  dispatch_tw(x.dtype(), w.dtype(), op, [&](auto ttag, auto wtag) {
    using T = decltype(ttag);
    using W = decltype(wtag);
    if (smem) {
      rms_bwd<T, W, true><<<blocks, kThreads, d * sizeof(float), s>>>(
          dy.data<T>(), x.data<T>(), w.data<W>(), rstd.data<float>(), dx.data<T>(),
          partial.as<float>(), n, d);
    } else {
      rms_bwd<T, W, false><<<blocks, kThreads, 0, s>>>(dy.data<T>(), x.data<T>(), w.data<W>(),
                                                       rstd.data<float>(), dx.data<T>(),
                                                       partial.as<float>(), n, d);
    }
    IEVO_CUDA_LAUNCH_CHECK("rms_bwd");
  });
  dispatch_fp(dw.dtype(), op, [&](auto wtag) {
    using W = decltype(wtag);
    sum_partials_dw<W><<<grid_for(d, 256, 1 << 20), 256, 0, s>>>(partial.as<float>(), blocks, d,
                                                                  dw.data<W>());
    IEVO_CUDA_LAUNCH_CHECK("sum_partials_dw");
  });
}

}  // namespace ievo::ops::cuda
