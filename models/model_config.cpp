#include "models/model_config.h"

namespace ievo {

const char* arch_name(Arch a) { return a == Arch::Llama ? "llama" : "internlm2"; }

Arch arch_from_name(const std::string& s) {
  if (s == "llama") return Arch::Llama;
  if (s == "internlm2") return Arch::InternLM2;
  IEVO_FAIL("unknown model.arch '", s, "' (expected llama or internlm2)");
}

void ModelConfig::validate() const {
  auto pos = [](int64_t v, const char* key) {
    IEVO_CHECK(v > 0, "model.", key, " must be positive, got ", v);
  };
  pos(vocab_size, "vocab_size");
  pos(hidden_size, "hidden_size");
  pos(num_layers, "num_layers");
  pos(num_heads, "num_heads");
  pos(num_kv_heads, "num_kv_heads");
  pos(ffn_hidden_size, "ffn_hidden_size");
  IEVO_CHECK(head_dim > 0 || hidden_size % num_heads == 0, "model.hidden_size (", hidden_size,
             ") is not divisible by model.num_heads (", num_heads, ")");
  IEVO_CHECK(num_heads % num_kv_heads == 0, "model.num_heads (", num_heads,
             ") is not divisible by model.num_kv_heads (", num_kv_heads, ")");
  IEVO_CHECK(hd() % 2 == 0, "head dimension must be even for RoPE, got ", hd());
  IEVO_CHECK(rope_theta > 0, "model.rope_theta must be positive");
  IEVO_CHECK(norm_eps > 0, "model.norm_eps must be positive");
}

std::vector<ParamSpec> param_specs(const ModelConfig& c) {
  const int64_t d = c.hidden_size, V = c.vocab_size, F = c.ffn_hidden_size;
  std::vector<ParamSpec> s;
  s.push_back({"model.embed_tokens.weight", {V, d}, true});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", {d}, false});
    s.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), d}, true});
    s.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), d}, true});
    s.back().joins_previous = true;
    s.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), d}, true});
    s.back().joins_previous = true;
    s.push_back({p + "self_attn.o_proj.weight", {d, c.q_dim()}, true});
    s.push_back({p + "post_attention_layernorm.weight", {d}, false});
    s.push_back({p + "mlp.gate_proj.weight", {F, d}, true});
    s.push_back({p + "mlp.up_proj.weight", {F, d}, true});
    s.back().joins_previous = true;
    s.push_back({p + "mlp.down_proj.weight", {d, F}, true});
  }
  s.push_back({"model.norm.weight", {d}, false});
  if (!c.tie_embeddings) s.push_back({"lm_head.weight", {V, d}, true});
  return s;
}

int64_t ModelConfig::num_params() const {
  int64_t n = 0;
  for (auto& p : param_specs(*this)) n += shape_numel(p.shape);
  return n;
}

int64_t ModelConfig::num_matmul_params() const {
  const int64_t d = hidden_size;
  int64_t per_layer = d * q_dim() + 2 * d * kv_dim() + q_dim() * d + 3 * d * ffn_hidden_size;
  return num_layers * per_layer + vocab_size * d;
}

double ModelConfig::flops_per_token(int64_t seq_len) const {
  return 6.0 * static_cast<double>(num_matmul_params()) +
         6.0 * static_cast<double>(num_layers) * static_cast<double>(hidden_size) *
             static_cast<double>(seq_len);
}

}  // namespace ievo
