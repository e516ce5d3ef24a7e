// Token embedding.
//   forward:  out[n, :] = table[ids[n], :]          table [V, D], ids [N] i32, out [N, D]
//   backward: dtable[ids[n], :] += dout[n, :]        (accumulates into dtable)
// An id outside [0, V) is an error naming the id and its position.
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out);
void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable);

}  // namespace ievo::ops
