// Token embedding.
//   forward:  out[n, :] = table[ids[n], :]          table [V, D], ids [N] i32, out [N, D]
//   backward: dtable[ids[n], :] += dout[n, :]        (accumulates into dtable)
// An id outside [0, V) is an error naming the id and its position.
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

// ids_host (optional, with ids on a device): the same ids on the host. They are checked there, so
// nothing is read back from the device (as attention's cu_seqlens_host); without it the device
// checks them and the host waits for the answer.
void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host = Tensor());
void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable,
                        const Tensor& ids_host = Tensor());

// Throws naming the first of the host's ids outside [0, vocab), and its position.
void check_token_ids(const Tensor& ids, int64_t vocab, const char* op);

}  // namespace ievo::ops
