// Small elementwise and reduction ops. All tensors contiguous, same dtype and device unless noted.
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void fill(Tensor& x, double value);
// y += alpha * x
void axpy(double alpha, const Tensor& x, Tensor& y);
// x *= alpha
void scale(Tensor& x, double alpha);
// out = a + b  (out may alias a or b)
void add(const Tensor& a, const Tensor& b, Tensor& out);
// dst = src converted to dst's dtype (f32 <-> bf16/f16/f64), same device.
void cast(const Tensor& src, Tensor& dst);
// Sum of squares of all elements, accumulated in double; returned on the host.
double sum_squares(const Tensor& x);
// True if every element is finite.
bool all_finite(const Tensor& x);

}  // namespace ievo::ops
