// Tensor and sequence parallelism: the ModelParallel the model calls at its cross-rank points
// (models/model_parallel.h), over the tensor group's Communicator and, for Ulysses, the sequence
// group's.
//
// Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): q/k/v and gate/up are column-parallel
// (a rank holds its heads / FFN columns), o and down row-parallel (their outputs are partial sums),
// so each block needs one reduction forward (g) and one backward (f):
//   parallel.sequence: none      f = identity forward, all-reduce backward;
//                                g = all-reduce forward, identity backward.
//   parallel.sequence: megatron  (Korthikanti et al. 2022) the residual stream between the regions
//                                holds N/T tokens per rank: f = all-gather along the tokens
//                                forward, reduce-scatter backward; g = reduce-scatter forward,
//                                all-gather backward. Same bytes as the all-reduce, but norms and
//                                residual adds run on N/T tokens. N must divide by T.
// The embedding and the LM head are vocabulary-parallel: rank t holds rows [t*V/T, (t+1)*V/T).
//   embedding: masked lookup (other ranks' ids give zero rows), then the model's g sums them.
//   head_loss: per chunk of tokens, logits_t = h W_t^T [chunk, V/T] (never the whole [N, V]);
//     each rank's (log-sum-exp over its columns, target logit if it holds the target) are
//     all-gathered ([T, 2, chunk] floats), combined to the whole vocabulary's lse and loss on every
//     rank (the same bits everywhere; targets counted once), then dlogits = grad_scale *
//     (softmax - onehot) on the rank's columns, dh = dlogits W_t (partial: the model's f backward
//     sums it), dW_t += dlogits^T h.
//
// Ulysses (parallel.sequence: ulysses, parallel.sequence_size S; Jacobs et al. 2023): the S ranks
// of a sequence group each hold a contiguous N/S of the micro-batch's tokens (inputs, targets,
// positions; cu_seqlens and max_seqlen stay whole) and every weight. Around attention an
// all-to-all trades tokens for heads: scatter_heads [N/S, H, hd] -> [N, H/S, hd] (all tokens, 1/S
// of the heads, attention sees whole sequences), gather_heads back; q, k and v (and their
// gradients) share one all-to-all, each rank's block of it their heads side by side. Heads and key/value heads
// (per tensor rank) must divide by S. Gradients of the replicated weights are summed over the
// data x sequence group (the trainer's data-parallel communicator; ZeRO shards over it).
//
// The collectives reuse the input's buffer where they can (reduce_output and reduce_input_grad
// all-reduce in place under plain tensor parallelism): callers must not reuse the argument.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "models/batch.h"
#include "models/model_config.h"
#include "models/model_parallel.h"
#include "models/params.h"
#include "models/shard.h"
#include "parallel/communicator.h"

namespace ievo {

enum class SequenceParallel { None, Megatron, Ulysses };
// "none" / "megatron" / "ulysses"; anything else is an error naming parallel.sequence.
SequenceParallel sequence_parallel_from_name(const std::string& s);
const char* sequence_parallel_name(SequenceParallel m);

// Ulysses: sequence rank `rank` of S's part of a micro-batch: the contiguous tokens
// [rank N/S, (rank+1) N/S) of inputs, targets and positions (views); cu_seqlens and max_seqlen
// stay whole (attention runs on every token after scatter_heads). N must divide by S.
Batch sequence_slice(const Batch& b, int S, int rank);

// Throws naming the keys when the layout cannot run this model, before any work:
// parallel.tensor (heads, FFN or vocabulary not divisible: ModelShard::validate), Megatron's
// tokens per micro-batch (micro_batch x seq_len) not divisible by T, Ulysses S > heads, heads or
// key/value heads per tensor rank not divisible by S, seq_len not divisible by S.
void validate_sequence_layout(const ModelConfig& c, int tp, SequenceParallel mode, int sp,
                              int64_t micro_batch_size, int64_t seq_len);

class TensorParallel final : public ModelParallel {
 public:
  // tp: the tensor group (size shard.tp, this rank shard.tp_rank); sp: the Ulysses sequence
  // group (only with SequenceParallel::Ulysses). Not owned; they must outlive this object.
  TensorParallel(const ModelConfig& c, const ModelShard& shard, SequenceParallel mode,
                 Communicator* tp, Communicator* sp = nullptr);

  Tensor gather_input(const Tensor& x) override;
  Tensor reduce_input_grad(const Tensor& dx) override;
  Tensor reduce_output(const Tensor& y) override;
  Tensor gather_output_grad(const Tensor& dy) override;
  bool reduces_output() const override { return tp_size_ > 1; }

  std::vector<Tensor> scatter_heads(const std::vector<Tensor>& parts, bool overwrite_parts = false) override;
  std::vector<Tensor> gather_heads(const std::vector<Tensor>& parts, bool overwrite_parts = false) override;
  int attention_head_split() const override { return sp_size_; }

  void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host) override;
  void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable, const Tensor& ids_host) override;
  double head_loss(const Tensor& h, const Tensor& w, const Tensor& targets, double grad_scale,
                   int64_t chunk_tokens, int64_t* count, Tensor* dh, Tensor* dw,
                   float dw_beta) override;

  SequenceParallel mode() const { return mode_; }

 private:
  Tensor all_gather_tokens(const Tensor& x);      // [n, ...] -> [T n, ...]
  Tensor reduce_scatter_tokens(const Tensor& x);  // [N, ...] -> [N / T, ...]

  ModelConfig c_;
  ModelShard shard_;
  SequenceParallel mode_;
  Communicator* tp_;
  Communicator* sp_;
  int tp_size_ = 1, sp_size_ = 1;
};

// Gradients of slices that several tensor-parallel ranks hold (ParamSpec::replicas > 1) but each
// computes only in part: norm weights under Megatron sequence parallelism (each rank saw N/T
// tokens) and key/value projections replicated when T > Hkv (each rank's query heads give part of
// its key/value head's gradient). They are summed over the ranks that hold the same slice, in rank
// order (all-gather of every partial gradient in one buffer, then a fixed-order sum), so the
// replicas get identical bits and stay identical after the optimizer step. Without sequence
// parallelism the norms' gradients are already whole (identical on every rank): not summed.
// For parallel/zero.h: ZeroConfig::deferred / pre_reduce / norm_weight.
struct ReplicaGradients {
  std::vector<bool> deferred;        // per local parameter: a partial gradient, summed by pre_reduce
  std::vector<double> norm_weight;   // per local parameter: 1 / replicas (counted once in the norm)
  std::function<void(ParamStore& grads)> pre_reduce;  // empty when nothing is partial
  bool any() const;
};
// Which of these (local) specs have partial gradients in `mode` (ReplicaGradients::deferred,
// without a communicator: `ievo plan` lays out ZeRO buckets with it).
std::vector<bool> partial_replicas(const std::vector<ParamSpec>& specs, SequenceParallel mode);
// For this rank's parameters (param_specs(c, shard), in that order); `tp` must outlive the result.
ReplicaGradients replica_gradients(const ModelConfig& c, const ModelShard& shard,
                                   SequenceParallel mode, Communicator& tp);

}  // namespace ievo
