// The local pieces of vocabulary-parallel layers and the layout change around Ulysses attention.
// No communication happens here (runtime/ is below parallel/): parallel/tensor_parallel.cpp calls
// these around its collectives.
//
// Vocabulary parallelism (Megatron-LM): rank t of T holds rows [begin, begin + V_local) of the
// embedding table and of the LM head, `vocab` = V the whole vocabulary.
//
//   embedding_forward_range:  out[n, :] = table[ids[n] - begin, :] if begin <= ids[n] < begin +
//                             V_local, else 0 (a partial sum: summed over the ranks it is the
//                             whole embedding).
//   embedding_backward_range: dtable[ids[n] - begin, :] += dout[n, :] for the ids this rank holds.
//   An id outside [0, vocab) is an error naming it and its position.
//
// Cross-entropy over logits split by vocabulary (logits [n, V_local] = h W_local^T):
//   vocab_ce_local:    stats [2, n]: row 0 = local lse_t = log sum_{v local} exp(logit_v),
//                      row 1 = the target's logit if this rank holds the target, else 0 (also 0
//                      for ignored rows). Max-subtracted, summed in double (CPU) / fp32 (CUDA).
//   vocab_ce_combine:  gathered [T, 2, n] (every rank's stats, as an all-gather lays them out)
//                      -> lse [n] = log sum_t exp(lse_t)  (the whole vocabulary's log-sum-exp),
//                      losses_n = lse_n - sum_t target_logit_t; returns the sum over non-ignored
//                      rows (double, in row order) and writes their count.
//   vocab_ce_backward: dlogits = grad_scale * (exp(logit - lse) - onehot(target - begin)),
//                      0 for ignored rows; dlogits may alias logits.
// stats / gathered / lse are f32, or f64 for f64 logits. Targets: i32, global ids or -100
// (ignored); a target outside [0, vocab) other than -100 is an error naming it.
// Summed over the T shards these equal ops::cross_entropy_* on the whole logits.
//
// Ulysses (DeepSpeed-Ulysses all-to-all around attention):
//   swap_leading_dims: x [A, B, rest...] -> out [B, A, rest...] (out[b, a] = x[a, b]); the
//                      packing between [tokens, ranks x heads, hd] and per-rank blocks. Each
//                      [rest...] block is contiguous; the two leading dimensions may have any
//                      strides that keep the blocks apart (views of column slices: q, k and v
//                      in and out of one joint matrix).
#pragma once
#include <cstdint>

#include "runtime/tensor.h"

namespace ievo::ops {

// ids_host: as in ops::embedding_forward (the ids' host copy, checked there; may be undefined).
void embedding_forward_range(const Tensor& table, const Tensor& ids, int64_t begin, int64_t vocab,
                             Tensor& out, const Tensor& ids_host = Tensor());
void embedding_backward_range(const Tensor& dout, const Tensor& ids, int64_t begin, int64_t vocab,
                              Tensor& dtable, const Tensor& ids_host = Tensor());

void vocab_ce_local(const Tensor& logits, const Tensor& targets, int64_t begin, int64_t vocab,
                    Tensor& stats);
double vocab_ce_combine(const Tensor& gathered, const Tensor& targets, int64_t vocab, Tensor& lse,
                        int64_t* count);
void vocab_ce_backward(const Tensor& logits, const Tensor& targets, int64_t begin,
                       const Tensor& lse, double grad_scale, Tensor& dlogits);

// The dtype of stats / lse for logits of dtype `logits`: f64 for f64, else f32.
DType vocab_ce_stat_dtype(DType logits);

void swap_leading_dims(const Tensor& x, Tensor& out);

#ifdef IEVO_CUDA
namespace cuda {
void embedding_forward_range(const Tensor& table, const Tensor& ids, int64_t begin, int64_t vocab,
                             Tensor& out, const Tensor& ids_host);
void embedding_backward_range(const Tensor& dout, const Tensor& ids, int64_t begin, int64_t vocab,
                              Tensor& dtable, const Tensor& ids_host);
void vocab_ce_local(const Tensor& logits, const Tensor& targets, int64_t begin, int64_t vocab,
                    Tensor& stats);
double vocab_ce_combine(const Tensor& gathered, const Tensor& targets, int64_t vocab, Tensor& lse,
                        int64_t* count);
void vocab_ce_backward(const Tensor& logits, const Tensor& targets, int64_t begin,
                       const Tensor& lse, double grad_scale, Tensor& dlogits);
void swap_leading_dims(const Tensor& x, Tensor& out);
}  // namespace cuda
#endif

}  // namespace ievo::ops
