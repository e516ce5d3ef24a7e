#include "models/hf_config.h"

#include <cmath>
#include <fstream>

#include "runtime/error.h"

namespace ievo {

using nlohmann::json;

namespace {

// Typed access to the top level (or a nested object) of config.json; errors name file and key.
struct JsonReader {
  const json& obj;
  std::string file;
  std::string prefix;  // "" or "rope_parameters." for nested objects

  // nullptr when absent or null (HF writes optional keys as null).
  const json* find(const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& need(const char* key) const {
    const json* v = find(key);
    if (!v) IEVO_FAIL(file, ": missing key '", prefix, key, "'");
    return *v;
  }
  [[noreturn]] void bad(const char* key, const char* what, const json& v) const {
    IEVO_FAIL(file, ": key '", prefix, key, "': expected ", what, ", got ", v.dump());
  }
  int64_t as_int(const char* key, const json& v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {  // 32000.0 is fine, 3.5 is not
      double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e18)
        return static_cast<int64_t>(d);
    }
    bad(key, "an integer", v);
  }
  double as_float(const char* key, const json& v) const {
    if (!v.is_number()) bad(key, "a number", v);
    return v.get<double>();
  }
  int64_t get_int(const char* key) const { return as_int(key, need(key)); }
  int64_t get_int(const char* key, int64_t dflt) const {
    const json* v = find(key);
    return v ? as_int(key, *v) : dflt;
  }
  double get_float(const char* key) const { return as_float(key, need(key)); }
  double get_float(const char* key, double dflt) const {
    const json* v = find(key);
    return v ? as_float(key, *v) : dflt;
  }
  bool get_bool(const char* key, bool dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_boolean()) bad(key, "true or false", *v);
    return v->get<bool>();
  }
  std::string get_string(const char* key, const std::string& dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_string()) bad(key, "a string", *v);
    return v->get<std::string>();
  }
};

}  // namespace

ModelConfig read_hf_model_config(const std::string& hf_dir) {
  const std::string file = hf_dir + "/config.json";
  std::ifstream in(file);
  if (!in) IEVO_FAIL(file, ": cannot open (model.init_from_hf must be a Hugging Face model directory)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    IEVO_FAIL(file, ": JSON syntax error: ", e.what());
  }
  if (!j.is_object()) IEVO_FAIL(file, ": expected a JSON object at the top level");
  JsonReader r{j, file, ""};

  ModelConfig c;
  const json& archs = r.need("architectures");
  if (!archs.is_array() || archs.empty() || !archs[0].is_string())
    r.bad("architectures", "a non-empty list of strings", archs);
  const std::string arch = archs[0].get<std::string>();
  if (arch == "LlamaForCausalLM")
    c.arch = Arch::Llama;
  else if (arch == "InternLM2ForCausalLM")
    c.arch = Arch::InternLM2;
  else
    IEVO_FAIL(file, ": unsupported architecture '", arch,
              "' in architectures[0] (supported: LlamaForCausalLM, InternLM2ForCausalLM)");

  c.vocab_size = r.get_int("vocab_size");
  c.hidden_size = r.get_int("hidden_size");
  c.num_layers = r.get_int("num_hidden_layers");
  c.num_heads = r.get_int("num_attention_heads");
  c.num_kv_heads = r.get_int("num_key_value_heads", c.num_heads);
  c.ffn_hidden_size = r.get_int("intermediate_size");
  c.head_dim = r.get_int("head_dim", 0);
  if (c.num_heads > 0 && c.head_dim * c.num_heads == c.hidden_size) c.head_dim = 0;  // derived
  c.norm_eps = r.get_float("rms_norm_eps");
  c.tie_embeddings = r.get_bool("tie_word_embeddings", false);
  c.max_position_embeddings = r.get_int("max_position_embeddings");
  c.init_std = r.get_float("initializer_range", 0.02);

  // RoPE: plain rotary embeddings only. transformers >= 4.5x moved rope_theta (and the scaling
  // type) into "rope_parameters"; older files have rope_theta and rope_scaling at the top level.
  if (const json* s = r.find("rope_scaling"))
    IEVO_FAIL(file, ": rope_scaling is set (", s->dump(),
              "); RoPE scaling is not supported (only plain RoPE with rope_theta)");
  if (const json* rp = r.find("rope_parameters")) {
    if (!rp->is_object()) r.bad("rope_parameters", "an object", *rp);
    JsonReader p{*rp, file, "rope_parameters."};
    const std::string type = p.get_string("rope_type", "default");
    if (type != "default")
      IEVO_FAIL(file, ": rope_parameters.rope_type is '", type,
                "'; RoPE scaling is not supported (only rope_type 'default')");
    c.rope_theta = r.find("rope_theta") ? r.get_float("rope_theta") : p.get_float("rope_theta");
  } else {
    c.rope_theta = r.get_float("rope_theta");
  }

  const std::string act = r.get_string("hidden_act", "silu");
  if (act != "silu") IEVO_FAIL(file, ": hidden_act '", act, "' is not supported (only silu)");
  for (const char* key : {"attention_bias", "mlp_bias", "bias"})
    if (r.get_bool(key, false)) IEVO_FAIL(file, ": ", key, " = true is not supported (no biases)");

  try {
    c.validate();
  } catch (const Error& e) {
    IEVO_FAIL(file, ": ", e.what());
  }
  return c;
}

json hf_model_config_json(const ModelConfig& c, const std::string& torch_dtype) {
  const bool llama = c.arch == Arch::Llama;
  IEVO_CHECK(llama || c.hd() * c.num_heads == c.hidden_size,
             "InternLM2 config.json cannot express head_dim ", c.hd(),
             " != hidden_size / num_heads");
  json j;
  j["architectures"] = {llama ? "LlamaForCausalLM" : "InternLM2ForCausalLM"};
  j["model_type"] = arch_name(c.arch);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.ffn_hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  if (llama) j["head_dim"] = c.hd();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["initializer_range"] = c.init_std;
  j["rms_norm_eps"] = c.norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  if (llama) {
    j["attention_dropout"] = 0.0;
    j["mlp_bias"] = false;
    j["pretraining_tp"] = 1;
  } else {
    j["bias"] = false;
  }
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["use_cache"] = true;
  j["torch_dtype"] = torch_dtype;
  return j;
}

}  // namespace ievo
