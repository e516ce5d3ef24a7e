// Which part of the model one rank holds: a pipeline stage (a range of blocks, the embedding on the
// first stage, the final norm + LM head on the last) and a tensor-parallel slice of every matrix.
//
// Tensor parallelism (Megatron-LM): with T ranks in the tensor group, rank t holds
//   q_proj rows of heads [t*Hq/T, (t+1)*Hq/T)            (column-parallel: split dim 0)
//   k_proj, v_proj rows of its key/value heads            (Hkv >= T: Hkv/T heads each; Hkv < T:
//                                                          the one head its query heads use,
//                                                          replicated on T/Hkv ranks)
//   o_proj columns of its query heads                     (row-parallel: split dim 1)
//   gate_proj, up_proj rows [t*F/T, (t+1)*F/T); down_proj those columns
//   embed_tokens, lm_head rows [t*V/T, (t+1)*V/T)         (vocabulary-parallel)
//   norms whole on every rank.
// Every spec keeps the global tensor's name and says where its slice sits (ParamSpec::global_shape,
// split_dim, split_offset, replicas), so checkpoints store global tensors whatever the layout.
//
// Pipeline parallelism: the stage holding blocks [first_layer, end_layer). With tied embeddings
// the last stage holds a copy of model.embed_tokens.weight as its LM head (as Megatron does); the
// pipeline keeps the two copies equal by summing their gradients.
#pragma once
#include <cstdint>
#include <vector>

#include "models/model_config.h"

namespace ievo {

struct ModelShard {
  int64_t first_layer = 0;  // blocks [first_layer, end_layer)
  int64_t end_layer = -1;   // -1: num_layers
  bool first = true;        // holds the embedding
  bool last = true;         // holds the final norm and the LM head
  int tp = 1, tp_rank = 0;  // tensor-parallel size and this rank's index in the group

  int64_t end(const ModelConfig& c) const { return end_layer < 0 ? c.num_layers : end_layer; }
  bool whole(const ModelConfig& c) const {
    return first_layer == 0 && end(c) == c.num_layers && first && last && tp == 1;
  }
  // Throws naming the key (parallel.tensor, parallel.pipeline) when the model cannot be split so:
  // heads, key/value heads (unless replicated), FFN size or vocabulary not divisible by tp.
  void validate(const ModelConfig& c) const;
  // Per-rank sizes.
  int64_t heads(const ModelConfig& c) const { return c.num_heads / tp; }
  int64_t kv_heads(const ModelConfig& c) const {
    return c.num_kv_heads >= tp ? c.num_kv_heads / tp : 1;
  }
  int64_t ffn(const ModelConfig& c) const { return c.ffn_hidden_size / tp; }
  int64_t vocab(const ModelConfig& c) const { return c.vocab_size / tp; }
  int64_t vocab_begin(const ModelConfig& c) const { return tp_rank * vocab(c); }
};

// This rank's parameters: the specs of param_specs(c) that the shard holds, in the same order,
// with local shapes and the slice information filled in.
std::vector<ParamSpec> param_specs(const ModelConfig& c, const ModelShard& s);

// The slice of a global tensor (whole tensor of spec.global_shape) that `spec` describes, as a
// copy, and the reverse: write a local slice into its place in the global tensor.
Tensor slice_for(const ParamSpec& spec, const Tensor& global);
void place_slice(const ParamSpec& spec, const Tensor& local, Tensor& global);

}  // namespace ievo
