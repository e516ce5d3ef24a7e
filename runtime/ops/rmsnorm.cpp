// RMSNorm on the CPU, following HF LlamaRMSNorm for f32:
//   variance = mean(x^2) (accumulated in double, rounded to fp32), rstd = 1 / sqrt(variance + eps)
//   in fp32, y = w * (x * rstd). For f64 everything is double.
// Backward (r = rstd, g = w * dy):
//   dx = r * g - x * r^3 * mean(g * x),   dw = dw_beta * dw + sum_n dy * x * r.
// dw is reduced over rows by splitting its columns among threads: each column is summed over
// the rows in order, so the result does not depend on the thread count.
#include "runtime/ops/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

void check_args(const Tensor& x, const Tensor& w, const Tensor& rstd, const char* op) {
  cpu::expect_float(x, "x", op);
  cpu::expect_float(w, "w", op);
  cpu::expect_float(rstd, "rstd", op);
  IEVO_CHECK(x.dim() == 2, op, ": tensor 'x' must be [N, D], has shape ", shape_str(x.shape()));
  check_dtype(w, x.dtype(), "w");
  check_dtype(rstd, x.dtype(), "rstd");
  check_shape(w, {x.size(1)}, "w");
  check_shape(rstd, {x.size(0)}, "rstd");
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::rmsnorm_forward(x, w, eps, y, rstd);
#endif
  const char* op = "rmsnorm_forward";
  check_args(x, w, rstd, op);
  cpu::expect_float(y, "y", op);
  check_dtype(y, x.dtype(), "y");
  check_shape(y, x.shape(), "y");
  cpu::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = x.size(0), d = x.size(1);
    const T* xp = x.data<T>();
    const T* wp = w.data<T>();
    T* yp = y.data<T>();
    T* rp = rstd.data<T>();
    const T e = static_cast<T>(eps);
#pragma omp parallel for schedule(static) if (n * d > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = xp + i * d;
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const T var = static_cast<T>(d > 0 ? ss / static_cast<double>(d) : 0.0);
      const T r = T(1) / std::sqrt(var + e);
      rp[i] = r;
      T* yr = yp + i * d;
      for (int64_t j = 0; j < d; ++j) yr[j] = wp[j] * (xr[j] * r);
    }
  });
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw, const Tensor& residual, float dw_beta) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::rmsnorm_backward(dy, x, w, rstd, dx, dw, residual, dw_beta);
#endif
  const char* op = "rmsnorm_backward";
  check_args(x, w, rstd, op);
  IEVO_CHECK(dw_beta == 0.0f || dw_beta == 1.0f, op, ": dw_beta must be 0 or 1, got ", dw_beta);
  cpu::expect_float(dy, "dy", op);
  cpu::expect_float(dx, "dx", op);
  cpu::expect_float(dw, "dw", op);
  check_shape(dy, x.shape(), "dy");
  check_shape(dx, x.shape(), "dx");
  check_shape(dw, w.shape(), "dw");
  check_dtype(dy, x.dtype(), "dy");
  check_dtype(dx, x.dtype(), "dx");
  check_dtype(dw, x.dtype(), "dw");
  if (residual.defined()) {
    cpu::expect_float(residual, "residual", op);
    check_shape(residual, x.shape(), "residual");
    check_dtype(residual, x.dtype(), "residual");
  }
  cpu::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = x.size(0), d = x.size(1);
    const T* resp = residual.defined() ? residual.data<T>() : nullptr;
    const T* xp = x.data<T>();
    const T* wp = w.data<T>();
    const T* gp = dy.data<T>();
    const T* rp = rstd.data<T>();
    T* dxp = dx.data<T>();
    T* dwp = dw.data<T>();
    // dw first: dx may alias dy.
    constexpr int64_t kCols = 64;
    const int64_t blocks = (d + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * d > cpu::kParallelMin)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kCols, c1 = std::min(d, c0 + kCols);
      double acc[kCols] = {};
      for (int64_t i = 0; i < n; ++i) {
        const double r = rp[i];
        for (int64_t j = c0; j < c1; ++j)
          acc[j - c0] += static_cast<double>(gp[i * d + j]) * xp[i * d + j] * r;
      }
      for (int64_t j = c0; j < c1; ++j)
        dwp[j] = (dw_beta == 0.0f ? T(0) : dwp[j]) + static_cast<T>(acc[j - c0]);
    }
#pragma omp parallel for schedule(static) if (n * d > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = xp + i * d;
      const T* gr = gp + i * d;
      const double r = rp[i];
      double dot = 0;  // sum_j w_j dy_j x_j
      for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(wp[j]) * gr[j] * xr[j];
      const double c = d > 0 ? r * r * r * dot / static_cast<double>(d) : 0.0;
      T* dxr = dxp + i * d;
      const T* res = resp ? resp + i * d : nullptr;
      for (int64_t j = 0; j < d; ++j)
        dxr[j] = static_cast<T>(r * (static_cast<double>(wp[j]) * gr[j]) - xr[j] * c +
                                (res ? static_cast<double>(res[j]) : 0.0));
    }
  });
}

}  // namespace ievo::ops
