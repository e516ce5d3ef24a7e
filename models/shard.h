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
// Pipeline parallelism: the stage holds one or more chunks of consecutive blocks (interleaved
// schedules give a rank V chunks: model chunks p, p + P, ..., as Megatron's virtual stages). The
// embedding sits in the first chunk of the first stage, the final norm and LM head in the last
// chunk of the last stage. With tied embeddings
// the last stage holds a copy of model.embed_tokens.weight as its LM head (as Megatron does); the
// pipeline keeps the two copies equal by summing their gradients.
#pragma once
#include <cstdint>
#include <vector>

#include "models/model_config.h"

namespace ievo {

struct LayerRange {
  int64_t begin = 0, end = 0;  // blocks [begin, end)
};

struct ModelShard {
  std::vector<LayerRange> chunks;  // this rank's model chunks in order; empty: one with every block
  bool first = true;               // chunk 0 holds the embedding (first pipeline stage)
  bool last = true;                // the last chunk holds the final norm and LM head (last stage)
  int tp = 1, tp_rank = 0;         // tensor-parallel size and this rank's index in the group

  std::vector<LayerRange> ranges(const ModelConfig& c) const {
    return chunks.empty() ? std::vector<LayerRange>{{0, c.num_layers}} : chunks;
  }
  int num_chunks() const { return chunks.empty() ? 1 : static_cast<int>(chunks.size()); }
  bool whole(const ModelConfig& c) const {
    return num_chunks() == 1 && ranges(c)[0].begin == 0 && ranges(c)[0].end == c.num_layers &&
           first && last && tp == 1;
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
