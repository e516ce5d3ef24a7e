// The state-dict adapter between ievo's parameters (HF Llama names, see param_specs) and HF
// checkpoints of each architecture, as torchtitan's StateDictAdapter does.
//
// InternLM2 layout (modeling_internlm2.py), per layer i, "model.layers.{i}.":
//   attention.wqkv.weight   [(Hkv*(G+2))*hd, d], G = Hq/Hkv, viewed as [Hkv, G+2, hd, d]:
//                           for kv group j, blocks 0..G-1 are q heads j*G..j*G+G-1, block G is
//                           k head j, block G+1 is v head j
//   attention.wo.weight     = self_attn.o_proj.weight
//   feed_forward.w1/w3/w2   = mlp.gate_proj / up_proj / down_proj
//   attention_norm, ffn_norm = input_layernorm, post_attention_layernorm
// and model.tok_embeddings.weight, model.norm.weight, output.weight (= lm_head.weight).
// Both use the rotate-half RoPE convention, so q/k rows need no permutation.
#pragma once
#include <cstdint>
#include <string>

#include "models/model_config.h"
#include "models/params.h"

namespace ievo {

// Loads HF_DIR's weights (single or sharded safetensors) into `params` (whose specs are
// param_specs(c); any dtype/device), with the names of c.arch. Shapes are checked ("HF
// checkpoint <dir>: tensor <name> has shape [..], expected [..]"), a missing tensor is an error
// naming it, floating dtypes are converted. With tie_embeddings an lm_head/output tensor in the
// file is ignored.
void load_hf_weights(const std::string& hf_dir, const ModelConfig& c, ParamStore& params);

// Writes OUT_DIR/config.json (hf_model_config_json) and the weights in c.arch's layout as
// `dtype` (F32, BF16, F16 or F64): model.safetensors, or above max_shard_bytes the shards
// model-0000k-of-0000n.safetensors and model.safetensors.index.json. Built in a sibling
// directory OUT_DIR.tmp-XXXXXX and swapped in when complete; files of an existing OUT_DIR other
// than config.json and weights (tokenizer, generation_config.json, ...) are carried over.
void save_hf(const std::string& out_dir, const ModelConfig& c, const ParamStore& params,
             DType dtype, int64_t max_shard_bytes = 5'000'000'000);

// "float32", "bfloat16", "float16", "float64" (config.json's torch_dtype).
const char* torch_dtype_name(DType t);

// InternLM2 wqkv <-> Llama q, k, v (CPU tensors, any one dtype; shapes as in param_specs).
Tensor internlm2_pack_wqkv(const ModelConfig& c, const Tensor& q, const Tensor& k, const Tensor& v);
void internlm2_unpack_wqkv(const ModelConfig& c, const Tensor& wqkv, Tensor* q, Tensor* k, Tensor* v);

}  // namespace ievo
