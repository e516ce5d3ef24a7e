// SwiGLU activation: out = silu(gate) * up, silu(x) = x * sigmoid(x).
//   gate, up, out: [N, F]. backward: dgate = dout * up * silu'(gate), dup = dout * silu(gate)
//   (written, not accumulated; dgate/dup may alias gate/up).
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup);

}  // namespace ievo::ops
