// RMSNorm as in HF Llama: y = w * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (f64 for f64).
//   x [N, D], w [D], y [N, D], rstd [N] (f32, or f64 for f64 inputs) = 1/sqrt(mean(x^2)+eps)
//   backward: dx = (rstd * (w*dy) - x * rstd^3 * mean(w*dy*x)) ; dw (+)= sum_n dy * x * rstd
// dx is written (not accumulated); dw_beta 1: dw += the sum; 0: dw = the sum, and dw is not read
// (it may hold anything, as a GEMM's C with beta 0). With `residual` defined ([N, D], x's dtype),
// dx = (the above) + residual: the gradient of a residual stream y = x + f(rmsnorm(x)) in one pass.
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw, const Tensor& residual = Tensor(), float dw_beta = 1.0f);

}  // namespace ievo::ops
