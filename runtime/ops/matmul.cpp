// C = alpha * op(A) @ op(B) + beta * C on the CPU through OpenBLAS (row-major cblas_?gemm).
// Any 2-D row-major tensor with unit column stride works, so column slices of a wider matrix
// (row stride > columns) are passed with lda = stride(0) without a copy.
#include "runtime/ops/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <climits>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

// Leading dimension of a row-major 2-D tensor on `device` (checked).
int64_t leading_dim(const Tensor& t, const char* name, Device device) {
  IEVO_CHECK(t.defined(), "matmul: tensor '", name, "' is undefined");
  IEVO_CHECK(t.device() == device, "matmul: tensor '", name, "' is on ", device_name(t.device()),
             " while the other arguments are on ", device_name(device));
  IEVO_CHECK(t.dim() == 2, "matmul: tensor '", name, "' must be 2-D, has shape ",
             shape_str(t.shape()));
  const int64_t rows = t.size(0), cols = t.size(1);
  IEVO_CHECK(cols <= 1 || t.strides()[1] == 1, "matmul: tensor '", name,
             "' must have unit column stride, has strides ", shape_str(t.strides()));
  const int64_t ld = rows <= 1 ? std::max<int64_t>(cols, 1) : t.strides()[0];
  IEVO_CHECK(ld >= std::max<int64_t>(cols, 1) && ld <= INT_MAX, "matmul: tensor '", name,
             "' has row stride ", ld, " for ", cols, " columns");
  IEVO_CHECK(rows <= INT_MAX && cols <= INT_MAX, "matmul: tensor '", name, "' too large for BLAS");
  return ld;
}

template <typename T>
void scale_rows(Tensor& c, int64_t ldc, T beta) {
  T* p = c.data<T>();
  for (int64_t i = 0; i < c.size(0); ++i)
    for (int64_t j = 0; j < c.size(1); ++j) p[i * ldc + j] = beta == T(0) ? T(0) : p[i * ldc + j] * beta;
}

}  // namespace

MatmulDims matmul_dims(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c) {
  IEVO_CHECK(c.defined(), "matmul: tensor 'c' is undefined");
  const Device dev = c.device();
  const int64_t lda = leading_dim(a, "a", dev), ldb = leading_dim(b, "b", dev), ldc = leading_dim(c, "c", dev);
  IEVO_CHECK(a.dtype() == c.dtype() && b.dtype() == c.dtype(), "matmul: dtypes differ (a ",
             dtype_name(a.dtype()), ", b ", dtype_name(b.dtype()), ", c ", dtype_name(c.dtype()), ")");
  const int64_t m = trans_a ? a.size(1) : a.size(0);
  const int64_t k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  IEVO_CHECK(k == kb, "matmul: inner dimensions differ: op(a) is [", m, ", ", k, "] (a ",
             shape_str(a.shape()), trans_a ? "^T" : "", "), op(b) is [", kb, ", ", n, "] (b ",
             shape_str(b.shape()), trans_b ? "^T" : "", ")");
  check_shape(c, {m, n}, "c");
  return {m, n, k, lda, ldb, ldc};
}

void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
            float beta) {
#ifdef IEVO_CUDA
  if (!c.is_cpu()) return cuda::matmul(a, trans_a, b, trans_b, c, alpha, beta);
#endif
  const auto [m, n, k, lda, ldb, ldc] = matmul_dims(a, trans_a, b, trans_b, c);
  if (m == 0 || n == 0) return;
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  cpu::dispatch_float(c.dtype(), "matmul", [&](auto tag) {
    using T = decltype(tag);
    if (k == 0) {  // op(A) @ op(B) is zero; BLAS implementations differ on K = 0
      scale_rows<T>(c, ldc, static_cast<T>(beta));
      return;
    }
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, a.data<float>(), static_cast<int>(lda),
                  b.data<float>(), static_cast<int>(ldb), beta, c.data<float>(),
                  static_cast<int>(ldc));
    } else {
      cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, static_cast<double>(alpha), a.data<double>(),
                  static_cast<int>(lda), b.data<double>(), static_cast<int>(ldb),
                  static_cast<double>(beta), c.data<double>(), static_cast<int>(ldc));
    }
  });
}

void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                Tensor& d) {
  IEVO_CHECK(c.defined() && d.defined(), "matmul_add: tensor 'c' or 'd' is undefined");
  IEVO_CHECK(c.device() == d.device() && c.dtype() == d.dtype() && c.shape() == d.shape() &&
                 c.strides() == d.strides(),
             "matmul_add: tensor 'c' (", shape_str(c.shape()), " ", dtype_name(c.dtype()), " on ",
             device_name(c.device()), ") must match 'd' (", shape_str(d.shape()), " ",
             dtype_name(d.dtype()), " on ", device_name(d.device()), "), strides included");
#ifdef IEVO_CUDA
  if (!d.is_cpu()) return cuda::matmul_add(a, trans_a, b, trans_b, c, d);
#endif
  if (c.raw() != d.raw()) d.copy_from(c);
  matmul(a, trans_a, b, trans_b, d, 1.0f, 1.0f);
}

}  // namespace ievo::ops
