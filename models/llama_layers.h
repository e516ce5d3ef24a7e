// The layer pieces that Llama's training path (llama.cpp) and its decode path
// (llama_decode.cpp, Llama::forward_step) share, so that decoding runs the same GEMMs and norms.
#pragma once
#include <initializer_list>
#include <vector>

#include "runtime/tensor.h"

namespace ievo::layers {

// y = x W^T for W [out, in].
Tensor linear(const Tensor& x, const Tensor& w);

// y_i = x W_i^T for weights back to back in the store (q/k/v, gate/up): column slices of one
// GEMM's output over the joint weight, or one GEMM each with Llama::set_joint_linears(false).
std::vector<Tensor> linears(const Tensor& x, std::initializer_list<const Tensor*> ws);

// RMSNorm of the rows of x; rstd receives the rows' 1 / rms (f32, or f64 for f64 x).
Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps, Tensor& rstd);
Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps);

}  // namespace ievo::layers
