#include "models/model_parallel.h"

#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/embedding.h"

namespace ievo {

void ModelParallel::embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out,
                                      const Tensor& ids_host) {
  ops::embedding_forward(table, ids, out, ids_host);
}

void ModelParallel::embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable,
                                       const Tensor& ids_host) {
  ops::embedding_backward(dout, ids, dtable, ids_host);
}

double ModelParallel::head_loss(const Tensor& h, const Tensor& w, const Tensor& targets,
                                double grad_scale, int64_t chunk_tokens, int64_t* count, Tensor* dh,
                                Tensor* dw, float dw_beta) {
  return ops::lm_head_loss(h, w, targets, grad_scale, chunk_tokens, count, dh, dw, dw_beta);
}

}  // namespace ievo
