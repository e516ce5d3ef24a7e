// The architecture of a Llama-family model. InternLM2 is the same network with another HF layout
// (packed wqkv), so both share this config and the Llama implementation.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace ievo {

enum class Arch { Llama, InternLM2 };
const char* arch_name(Arch a);       // "llama" / "internlm2"
Arch arch_from_name(const std::string& s);  // throws, naming the value

struct ModelConfig {
  Arch arch = Arch::Llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t ffn_hidden_size = 0;
  int64_t head_dim = 0;  // 0: hidden_size / num_heads
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  double init_std = 0.02;
  int64_t max_position_embeddings = 4096;

  int64_t hd() const { return head_dim ? head_dim : hidden_size / num_heads; }
  int64_t q_dim() const { return num_heads * hd(); }
  int64_t kv_dim() const { return num_kv_heads * hd(); }
  // Throws with the offending field named (heads not dividing, zero sizes, ...).
  void validate() const;
  // Parameter counts: all parameters; matrix-multiply weights incl. the LM head (tied or not)
  // but not the embedding table (the MFU formula's N).
  int64_t num_params() const;
  int64_t num_matmul_params() const;
  // Training FLOPs per token: 6 * N_matmul + 6 * L * d * T (attention, causal counted as full,
  // as in the MFU formula of the CUDA issue).
  double flops_per_token(int64_t seq_len) const;
};

// One parameter: its HF Llama name, shape, and whether weight decay applies (not for 1-D).
// Under tensor or pipeline parallelism (models/shard.h) a rank's spec may be a slice of the
// global tensor: global_shape is the whole tensor, and the slice is [split_offset, split_offset +
// shape[split_dim]) along split_dim (-1: the whole tensor). `replicas` ranks of the tensor group
// hold this same slice (norms: all T; key/value heads when T > Hkv: T / Hkv), so their gradients
// are summed over those ranks and the squared gradient norm counts the slice once.
struct ParamSpec {
  std::string name;
  Shape shape;
  bool decay = true;
  Shape global_shape = {};  // empty: the same as shape
  int split_dim = -1;
  int64_t split_offset = 0;
  int replicas = 1;
  // Stored right after the previous spec and used with it as one matrix (k and v after q, up
  // after gate: the model's joint projections, models/llama.cpp), so a ZeRO bucket does not
  // end between the two.
  bool joins_previous = false;
  const Shape& global() const { return global_shape.empty() ? shape : global_shape; }
};

// Parameters in HF Llama naming, in this order per layer: input_layernorm, q/k/v/o_proj,
// post_attention_layernorm, gate/up/down_proj; then model.norm and lm_head (absent when tied).
//   model.embed_tokens.weight [V, d]
//   model.layers.{i}.input_layernorm.weight [d]
//   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  q [Hq*hd, d], k/v [Hkv*hd, d], o [d, Hq*hd]
//   model.layers.{i}.post_attention_layernorm.weight [d]
//   model.layers.{i}.mlp.{gate,up}_proj.weight [F, d], mlp.down_proj.weight [d, F]
//   model.norm.weight [d];  lm_head.weight [V, d]
std::vector<ParamSpec> param_specs(const ModelConfig& c);

}  // namespace ievo
