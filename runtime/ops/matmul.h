// General matrix multiply on 2-D tensors (leading dimensions of a contiguous tensor may be
// flattened by the caller with view()).
//   C = alpha * op(A) @ op(B) + beta * C,   op(X) = X or X^T
// A: [M, K] (or [K, M] with trans_a), B: [K, N] (or [N, K] with trans_b), C: [M, N].
// CPU: f32/f64 through OpenBLAS cblas. CUDA: cuBLASLt (f32 with TF32 off, bf16 with fp32 accumulate).
// The linear layer y = x W^T (W is [out, in], as in HF) is matmul(x, false, W, true, y).
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
            float alpha = 1.0f, float beta = 0.0f);

// D = op(A) @ op(B) + C, C and D [m, n] with the same strides (C may be D): a residual add folded
// into the GEMM (cuBLASLt reads C in its epilogue, one pass over the activations instead of the
// three of a separate add; the sum is rounded once).
void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                Tensor& d);

// The sizes of a matmul call, validated for every backend: 2-D tensors on c's device with unit
// column stride, one dtype, inner dimensions that agree, c of shape [m, n]; ld* = row strides.
struct MatmulDims {
  int64_t m, n, k, lda, ldb, ldc;
};
MatmulDims matmul_dims(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c);

}  // namespace ievo::ops
