// Where the model's data flow crosses ranks, as the model sees it: no ranks, no communicators,
// only the points at which a tensor-parallel, sequence-parallel or Ulysses layout must act. The
// model calls these at fixed places in every block; this base class is one rank (every region is
// the identity, embedding and loss are the plain ops). parallel/tensor_parallel.h overrides them
// (Megatron-LM's conjugate f/g operators, Korthikanti et al. 2022 for sequence parallelism,
// DeepSpeed-Ulysses for the all-to-all around attention).
//
// Rows: the residual stream between the regions holds n_local tokens (all N tokens under plain
// tensor parallelism; N / T under Megatron sequence parallelism; N / S under Ulysses). Inside a
// column-parallel region (q/k/v, gate/up, LM head) it holds the whole micro-batch, N tokens.
//
//   x --rmsnorm--> gather_input --> [column-parallel matmuls] ... [row-parallel matmul] --> reduce_output --> + x
//   backward:  reduce_input_grad <-- ...                                           <-- gather_output_grad
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace ievo {

class ModelParallel {
 public:
  virtual ~ModelParallel() = default;

  // Megatron's f: [n_local, d] -> [N, d] (TP: identity; SP: all-gather along the sequence).
  virtual Tensor gather_input(const Tensor& x) { return x; }
  // f backward: partial sums [N, d] -> [n_local, d] (TP: all-reduce; SP: reduce-scatter).
  virtual Tensor reduce_input_grad(const Tensor& dx) { return dx; }
  // Megatron's g: partial sums [N, d] -> [n_local, d] (TP: all-reduce; SP: reduce-scatter).
  virtual Tensor reduce_output(const Tensor& y) { return y; }
  // g backward: [n_local, d] -> [N, d] (TP: identity; SP: all-gather).
  virtual Tensor gather_output_grad(const Tensor& dy) { return dy; }
  // Whether reduce_output does anything. When not, the model folds the residual add into the
  // output projection (x + y in the GEMM's epilogue); when it does, x is added after it.
  virtual bool reduces_output() const { return false; }

  // Ulysses, around attention: parts (q, k, v) [n_local, H_i, hd] of this rank's tokens and all
  // its heads -> [N, H_i / S, hd] of every token and 1/S of the heads; gather_heads the inverse
  // (the output, and q, k, v's gradients). All parts in one all-to-all, and the results are
  // column slices of one matrix (the joint GEMMs and RoPE read them as one). With
  // overwrite_parts, the parts' buffer may receive the results when the parts fill one buffer
  // (the caller no longer needs them: one buffer less at the peak). Identity without Ulysses.
  virtual std::vector<Tensor> scatter_heads(const std::vector<Tensor>& parts, bool overwrite_parts = false) {
    (void)overwrite_parts;
    return parts;
  }
  virtual std::vector<Tensor> gather_heads(const std::vector<Tensor>& parts, bool overwrite_parts = false) {
    (void)overwrite_parts;
    return parts;
  }
  virtual int attention_head_split() const { return 1; }  // S

  // Embedding of ids [n] with this rank's rows of the table: out [n, d] (a partial sum under
  // vocabulary parallelism: rows of other ranks' tokens are zero; the model then calls
  // reduce_output). Backward: adds dout's rows into dtable for the ids this rank holds.
  // ids_host: the ids on the host, checked there (ops::embedding_forward); may be undefined
  virtual void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host);
  virtual void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable, const Tensor& ids_host);

  // The fused LM head and cross-entropy (ops::lm_head_loss) with this rank's rows of the head
  // (vocabulary-parallel: never gathers the logits). h [N, d]; returns the summed loss over the
  // targets and adds their count to *count (the same on every rank of the group); dh (if
  // defined, may alias h) gets the rank's partial d loss/dh (the model calls reduce_input_grad), dw
  // = dw_beta dw + its rows (ParamStore::accumulator's beta).
  virtual double head_loss(const Tensor& h, const Tensor& w, const Tensor& targets, double grad_scale,
                           int64_t chunk_tokens, int64_t* count, Tensor* dh, Tensor* dw, float dw_beta);
};

}  // namespace ievo
