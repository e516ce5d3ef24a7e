// Small elementwise ops and reductions on the CPU. Arithmetic is done in the tensor's type;
// reductions accumulate in double over fixed-size chunks summed in order, so the result does
// not depend on the number of threads.
#include "runtime/ops/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

// Sum over [0, n) of f(i), in double, deterministic for any thread count.
template <typename F>
double chunked_sum(int64_t n, F f) {
  constexpr int64_t kChunk = 1 << 15;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) s += f(i);
    part[c] = s;
  }
  double total = 0;
  for (double p : part) total += p;
  return total;
}

void check_same(const Tensor& x, const Tensor& ref, const char* name, const char* ref_name,
                const char* op) {
  cpu::expect_float(x, name, op);
  IEVO_CHECK(x.dtype() == ref.dtype(), op, ": tensor '", name, "' has dtype ",
             dtype_name(x.dtype()), ", tensor '", ref_name, "' has ", dtype_name(ref.dtype()));
  IEVO_CHECK(x.shape() == ref.shape(), op, ": tensor '", name, "' has shape ",
             shape_str(x.shape()), ", tensor '", ref_name, "' has ", shape_str(ref.shape()));
}

}  // namespace

void fill(Tensor& x, double value) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::fill(x, value);
#endif
  cpu::expect_cpu(x, "x", "fill");
  const int64_t n = x.numel();
  auto fill_as = [&](auto v) {
    using T = decltype(v);
    std::fill_n(x.data<T>(), n, v);
  };
  switch (x.dtype()) {
    case DType::F32: fill_as(static_cast<float>(value)); break;
    case DType::F64: fill_as(value); break;
    case DType::BF16: fill_as(f32_to_bf16(static_cast<float>(value))); break;
    case DType::F16: fill_as(f32_to_f16(static_cast<float>(value))); break;
    case DType::I32: fill_as(static_cast<int32_t>(value)); break;
    case DType::I64: fill_as(static_cast<int64_t>(value)); break;
    case DType::I16: fill_as(static_cast<int16_t>(value)); break;
  }
}

void axpy(double alpha, const Tensor& x, Tensor& y) {
#ifdef IEVO_CUDA
  if (!y.is_cpu()) return cuda::axpy(alpha, x, y);
#endif
  cpu::expect_float(y, "y", "axpy");
  check_same(x, y, "x", "y", "axpy");
  cpu::dispatch_float(y.dtype(), "axpy", [&](auto tag) {
    using T = decltype(tag);
    const T a = static_cast<T>(alpha);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    const int64_t n = y.numel();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) yp[i] += a * xp[i];
  });
}

void scale(Tensor& x, double alpha) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::scale(x, alpha);
#endif
  cpu::expect_float(x, "x", "scale");
  cpu::dispatch_float(x.dtype(), "scale", [&](auto tag) {
    using T = decltype(tag);
    const T a = static_cast<T>(alpha);
    T* p = x.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) p[i] *= a;
  });
}

void add(const Tensor& a, const Tensor& b, Tensor& out) {
#ifdef IEVO_CUDA
  if (!out.is_cpu()) return cuda::add(a, b, out);
#endif
  cpu::expect_float(out, "out", "add");
  check_same(a, out, "a", "out", "add");
  check_same(b, out, "b", "out", "add");
  cpu::dispatch_float(out.dtype(), "add", [&](auto tag) {
    using T = decltype(tag);
    const T* ap = a.data<T>();
    const T* bp = b.data<T>();
    T* op = out.data<T>();
    const int64_t n = out.numel();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) op[i] = ap[i] + bp[i];
  });
}

void cast(const Tensor& src, Tensor& dst) {
#ifdef IEVO_CUDA
  if (!dst.is_cpu() || !src.is_cpu()) {
    check_same_device(src, dst, "cast");
    return cuda::cast(src, dst);
  }
#endif
  cpu::expect_cpu(src, "src", "cast");
  cpu::expect_cpu(dst, "dst", "cast");
  check_shape(dst, src.shape(), "dst");
  const int64_t n = src.numel();
  if (src.dtype() == dst.dtype()) {
    cpu::dispatch_storage(src.dtype(), "cast", [](auto) {});  // dtype check
    if (n > 0 && src.raw() != dst.raw()) std::memmove(dst.raw(), src.raw(), src.nbytes());
    return;
  }
  // Through double: exact for every source type; bf16/f16 targets round from float, so an f32
  // source is rounded once (to nearest even).
  cpu::dispatch_storage(src.dtype(), "cast", [&](auto stag) {
    using S = decltype(stag);
    cpu::dispatch_storage(dst.dtype(), "cast", [&](auto dtag) {
      using D = decltype(dtag);
      const S* s = src.data<S>();
      D* d = dst.data<D>();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) d[i] = cpu::from_double<D>(cpu::to_double(s[i]));
    });
  });
}

double sum_squares(const Tensor& x) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::sum_squares(x);
#endif
  cpu::expect_cpu(x, "x", "sum_squares");
  return cpu::dispatch_storage(x.dtype(), "sum_squares", [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data<T>();
    return chunked_sum(x.numel(), [p](int64_t i) {
      const double v = cpu::to_double(p[i]);
      return v * v;
    });
  });
}

bool all_finite(const Tensor& x) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::all_finite(x);
#endif
  cpu::expect_cpu(x, "x", "all_finite");
  return cpu::dispatch_storage(x.dtype(), "all_finite", [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data<T>();
    const int64_t n = x.numel();
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) bad |= std::isfinite(cpu::to_double(p[i])) ? 0 : 1;
    return bad == 0;
  });
}

}  // namespace ievo::ops
