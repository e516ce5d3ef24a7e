// SwiGLU activation: out = silu(gate) * up, silu(x) = x * sigmoid(x).
//   gate, up, out: [N, F]. backward: dgate = dout * up * silu'(gate), dup = dout * silu(gate)
//   (written, not accumulated; dgate/dup may alias gate/up).
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup);

// The up projection with SwiGLU after it: up = x W_up^T, out = silu(gate) * up.
//   x [N, d], w_up [F, d], gate/up/out [N, F].
// On the GPU in bf16 on Hopper (builds with CUTLASS) one GEMM computes both, SwiGLU in its
// epilogue (runtime/cuda/swiglu_gemm.h); elsewhere matmul then swiglu_forward. The results are
// the same bits either way, up to the GEMM's own accumulation order.
void linear_swiglu_forward(const Tensor& x, const Tensor& w_up, const Tensor& gate, Tensor& up,
                           Tensor& out);

// Backward through the down projection's input into SwiGLU: dh = dy W_down, then
// swiglu_backward(dh, gate, up, dgate, dup). dy [N, d], w_down [d, F], the rest [N, F].
// Fused as above (dh never stored); the unfused path writes dh into `scratch` ([N, F], its
// contents are lost; it may be the dead SwiGLU output). dgate/dup may alias gate/up.
void linear_swiglu_backward(const Tensor& dy, const Tensor& w_down, const Tensor& gate,
                            const Tensor& up, Tensor& dgate, Tensor& dup, Tensor& scratch);

}  // namespace ievo::ops
