// SwiGLU on the CPU, in the tensors' type:
//   sig = 1 / (1 + exp(-g)),  silu = g * sig,  out = silu * u
//   silu'(g) = sig * (1 + g * (1 - sig)),  dgate = dout * u * silu'(g),  dup = dout * silu
// Each element is read before it is written, so dgate/dup may alias gate/up. Rows may be strided.
#include "runtime/ops/swiglu.h"

#include <cmath>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/row_layout.h"

namespace ievo::ops {
namespace {

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  cpu::expect_float_rows(t, name, op);
  check_shape(t, ref.shape(), name);
  check_dtype(t, ref.dtype(), name);
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
  const Rows d = rows_of({&gate, &up, &out});
  const int64_t gs = stride_of(gate, d), us = stride_of(up, d), os = stride_of(out, d);
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *g = gate.data<T>(), *u = up.data<T>();
    T* o = out.data<T>();
#pragma omp parallel for collapse(2) schedule(static) if (gate.numel() > cpu::kParallelMin)
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t c = 0; c < d.cols; ++c) {
        const T x = g[r * gs + c];
        const T sig = T(1) / (T(1) + std::exp(-x));
        o[r * os + c] = x * sig * u[r * us + c];
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
  const Rows d = rows_of({&dout, &gate, &up, &dgate, &dup});
  const int64_t ds = stride_of(dout, d), gs = stride_of(gate, d), us = stride_of(up, d),
                dgs = stride_of(dgate, d), dus = stride_of(dup, d);
  cpu::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *go = dout.data<T>(), *g = gate.data<T>(), *u = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
#pragma omp parallel for collapse(2) schedule(static) if (gate.numel() > cpu::kParallelMin)
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t c = 0; c < d.cols; ++c) {
        const T x = g[r * gs + c], y = u[r * us + c], dv = go[r * ds + c];
        const T sig = T(1) / (T(1) + std::exp(-x));
        dg[r * dgs + c] = dv * y * (sig * (T(1) + x * (T(1) - sig)));
        du[r * dus + c] = dv * (x * sig);
      }
  });
}

}  // namespace ievo::ops
