// Hugging Face config.json <-> ModelConfig, for LlamaForCausalLM and InternLM2ForCausalLM.
//
// Keys read (transformers naming -> ModelConfig):
//   architectures[0]        LlamaForCausalLM -> llama, InternLM2ForCausalLM -> internlm2
//   vocab_size, hidden_size, num_hidden_layers -> num_layers, num_attention_heads -> num_heads,
//   num_key_value_heads -> num_kv_heads (default: num_attention_heads),
//   intermediate_size -> ffn_hidden_size, head_dim (optional; stored as 0 when it equals
//   hidden_size / num_heads), rms_norm_eps -> norm_eps,
//   rope_theta (top level, or rope_parameters.rope_theta in newer transformers),
//   tie_word_embeddings (default false), max_position_embeddings,
//   initializer_range -> init_std (default 0.02).
// RoPE scaling (rope_scaling not null, or rope_parameters.rope_type other than "default"),
// a hidden_act other than silu, and attention/MLP biases are rejected as unsupported.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "models/model_config.h"

namespace ievo {

// Reads HF_DIR/config.json. Errors name the file and the key (missing, wrong type, unsupported).
ModelConfig read_hf_model_config(const std::string& hf_dir);

// The inverse: a config.json for LlamaForCausalLM / InternLM2ForCausalLM ("architectures",
// "model_type", sizes, "hidden_act": "silu", "attention_bias": false, "rope_theta",
// "torch_dtype" (e.g. "bfloat16", "float32"), ...). read_hf_model_config gives `c` back.
nlohmann::json hf_model_config_json(const ModelConfig& c, const std::string& torch_dtype);

}  // namespace ievo
