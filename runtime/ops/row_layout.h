// An elementwise op's tensors as rows, for ops that take column slices of a joint GEMM output
// (SwiGLU's gate and up): one row of every element when all of them are contiguous, else
// [size(0), numel / size(0)], each tensor with its own row stride (Tensor::rows_contiguous()).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "runtime/tensor.h"

namespace ievo::ops {

struct Rows {
  int64_t rows, cols;
};

inline Rows rows_of(std::initializer_list<const Tensor*> ts) {
  const Tensor& a = **ts.begin();
  bool contiguous = true;
  for (const Tensor* t : ts) contiguous = contiguous && t->is_contiguous();
  if (contiguous || a.dim() == 0 || a.size(0) == 0) return {1, a.numel()};
  return {a.size(0), a.numel() / a.size(0)};
}

// Elements between the rows of t in the layout d.
inline int64_t stride_of(const Tensor& t, const Rows& d) { return d.rows == 1 ? d.cols : t.row_stride(); }

}  // namespace ievo::ops
