// SwiGLU on the CPU, in the tensors' type:
//   sig = 1 / (1 + exp(-g)),  silu = g * sig,  out = silu * u
//   silu'(g) = sig * (1 + g * (1 - sig)),  dgate = dout * u * silu'(g),  dup = dout * silu
// Each element is read before it is written, so dgate/dup may alias gate/up. Rows may be strided.
#include "runtime/ops/swiglu.h"

#include <cmath>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  cpu::expect_float_rows(t, name, op);
  check_shape(t, ref.shape(), name);
  check_dtype(t, ref.dtype(), name);
}

// Element i of t, viewed as rows of `cols` elements (row_stride() apart when `strided`).
inline int64_t at(const Tensor& t, int64_t i, int64_t cols, bool strided) {
  return strided ? i / cols * t.row_stride() + i % cols : i;
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
#ifdef IEVO_CUDA
  if (!gate.is_cpu()) return cuda::swiglu_forward(gate, up, out);
#endif
  const char* op = "swiglu_forward";
  cpu::expect_float_rows(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(out, gate, "out", op);
  const bool strided = !(gate.is_contiguous() && up.is_contiguous() && out.is_contiguous());
  const int64_t n = gate.numel(), cols = gate.dim() > 0 && gate.size(0) > 0 ? n / gate.size(0) : 1;
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *g = gate.data<T>(), *u = up.data<T>();
    T* o = out.data<T>();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T x = g[at(gate, i, cols, strided)];
      const T sig = T(1) / (T(1) + std::exp(-x));
      o[at(out, i, cols, strided)] = x * sig * u[at(up, i, cols, strided)];
    }
  });
}

void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup) {
#ifdef IEVO_CUDA
  if (!gate.is_cpu()) return cuda::swiglu_backward(dout, gate, up, dgate, dup);
#endif
  const char* op = "swiglu_backward";
  cpu::expect_float_rows(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(dout, gate, "dout", op);
  check_like(dgate, gate, "dgate", op);
  check_like(dup, gate, "dup", op);
  const bool strided = !(dout.is_contiguous() && gate.is_contiguous() && up.is_contiguous() &&
                         dgate.is_contiguous() && dup.is_contiguous());
  const int64_t n = gate.numel(), cols = gate.dim() > 0 && gate.size(0) > 0 ? n / gate.size(0) : 1;
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *go = dout.data<T>(), *g = gate.data<T>(), *u = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T x = g[at(gate, i, cols, strided)], y = u[at(up, i, cols, strided)],
              d = go[at(dout, i, cols, strided)];
      const T sig = T(1) / (T(1) + std::exp(-x));
      dg[at(dgate, i, cols, strided)] = d * y * (sig * (T(1) + x * (T(1) - sig)));
      du[at(dup, i, cols, strided)] = d * (x * sig);
    }
  });
}

}  // namespace ievo::ops
