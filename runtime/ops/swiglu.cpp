// SwiGLU on the CPU, in the tensors' type:
//   sig = 1 / (1 + exp(-g)),  silu = g * sig,  out = silu * u
//   silu'(g) = sig * (1 + g * (1 - sig)),  dgate = dout * u * silu'(g),  dup = dout * silu
// Each element is read before it is written, so dgate/dup may alias gate/up.
#include "runtime/ops/swiglu.h"

#include <cmath>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  cpu::expect_float(t, name, op);
  check_shape(t, ref.shape(), name);
  check_dtype(t, ref.dtype(), name);
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
#ifdef IEVO_CUDA
  if (!gate.is_cpu()) return cuda::swiglu_forward(gate, up, out);
#endif
  const char* op = "swiglu_forward";
  cpu::expect_float(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(out, gate, "out", op);
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *g = gate.data<T>(), *u = up.data<T>();
    T* o = out.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T sig = T(1) / (T(1) + std::exp(-g[i]));
      o[i] = g[i] * sig * u[i];
    }
  });
}

void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup) {
#ifdef IEVO_CUDA
  if (!gate.is_cpu()) return cuda::swiglu_backward(dout, gate, up, dgate, dup);
#endif
  const char* op = "swiglu_backward";
  cpu::expect_float(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(dout, gate, "dout", op);
  check_like(dgate, gate, "dgate", op);
  check_like(dup, gate, "dup", op);
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *go = dout.data<T>(), *g = gate.data<T>(), *u = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T x = g[i], y = u[i], d = go[i];
      const T sig = T(1) / (T(1) + std::exp(-x));
      dg[i] = d * y * (sig * (T(1) + x * (T(1) - sig)));
      du[i] = d * (x * sig);
    }
  });
}

}  // namespace ievo::ops
