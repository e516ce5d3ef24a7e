#include "models/hf_adapter.h"

#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "models/atomic_file.h"
#include "models/hf_config.h"
#include "models/safetensors.h"

namespace fs = std::filesystem;

namespace ievo {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Llama name -> InternLM2 name; q/k/v all map to the layer's packed wqkv.
std::string internlm2_name(const std::string& n) {
  if (n == "model.embed_tokens.weight") return "model.tok_embeddings.weight";
  if (n == "lm_head.weight") return "output.weight";
  if (!starts_with(n, "model.layers.")) return n;  // model.norm.weight
  const size_t dot = n.find('.', std::strlen("model.layers."));
  const std::string layer = n.substr(0, dot + 1), rest = n.substr(dot + 1);
  static const std::pair<const char*, const char*> kMap[] = {
      {"input_layernorm.weight", "attention_norm.weight"},
      {"self_attn.q_proj.weight", "attention.wqkv.weight"},
      {"self_attn.k_proj.weight", "attention.wqkv.weight"},
      {"self_attn.v_proj.weight", "attention.wqkv.weight"},
      {"self_attn.o_proj.weight", "attention.wo.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "feed_forward.w1.weight"},
      {"mlp.up_proj.weight", "feed_forward.w3.weight"},
      {"mlp.down_proj.weight", "feed_forward.w2.weight"},
  };
  for (auto& [from, to] : kMap)
    if (rest == from) return layer + to;
  IEVO_FAIL("no InternLM2 name for parameter '", n, "'");
}

bool is_qkv(const std::string& n) {
  return ends_with(n, "self_attn.q_proj.weight") || ends_with(n, "self_attn.k_proj.weight") ||
         ends_with(n, "self_attn.v_proj.weight");
}

Shape wqkv_shape(const ModelConfig& c) {
  return {(c.num_heads + 2 * c.num_kv_heads) * c.hd(), c.hidden_size};
}

bool is_float(DType t) {
  return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16;
}

// Moves blocks of hd rows between the packed wqkv and q/k/v: packed block j*(G+2)+g is q head
// j*G+g for g < G, k head j for g = G, v head j for g = G+1.
template <typename Fn>
void for_each_head_block(const ModelConfig& c, Fn fn) {
  const int64_t G = c.num_heads / c.num_kv_heads;
  for (int64_t j = 0; j < c.num_kv_heads; ++j) {
    for (int64_t g = 0; g < G; ++g) fn(j * (G + 2) + g, 'q', j * G + g);
    fn(j * (G + 2) + G, 'k', j);
    fn(j * (G + 2) + G + 1, 'v', j);
  }
}

void check_qkv_args(const ModelConfig& c, const Tensor& t, const Shape& s, const char* what) {
  IEVO_CHECK(t.is_cpu() && t.is_contiguous(), "InternLM2 wqkv: ", what,
             " must be a contiguous CPU tensor, got ", t.describe());
  IEVO_CHECK(t.shape() == s, "InternLM2 wqkv: ", what, " has shape ", shape_str(t.shape()),
             ", expected ", shape_str(s), " (heads ", c.num_heads, ", kv heads ", c.num_kv_heads,
             ", head dim ", c.hd(), ")");
}

}  // namespace

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F64: return "float64";
    default: IEVO_FAIL("HF weights cannot be saved as ", dtype_name(t), " (use f32, bf16, f16 or f64)");
  }
}

Tensor internlm2_pack_wqkv(const ModelConfig& c, const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t d = c.hidden_size, hd = c.hd();
  check_qkv_args(c, q, {c.q_dim(), d}, "q");
  check_qkv_args(c, k, {c.kv_dim(), d}, "k");
  check_qkv_args(c, v, {c.kv_dim(), d}, "v");
  IEVO_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "InternLM2 wqkv: q, k, v dtypes differ");
  Tensor out = Tensor::empty(wqkv_shape(c), q.dtype());
  const size_t block = static_cast<size_t>(hd * d) * dtype_size(q.dtype());
  char* dst = static_cast<char*>(out.raw());
  for_each_head_block(c, [&](int64_t packed, char which, int64_t head) {
    const Tensor& src = which == 'q' ? q : which == 'k' ? k : v;
    std::memcpy(dst + packed * block, static_cast<const char*>(src.raw()) + head * block, block);
  });
  return out;
}

void internlm2_unpack_wqkv(const ModelConfig& c, const Tensor& wqkv, Tensor* q, Tensor* k, Tensor* v) {
  const int64_t d = c.hidden_size, hd = c.hd();
  check_qkv_args(c, wqkv, wqkv_shape(c), "wqkv");
  *q = Tensor::empty({c.q_dim(), d}, wqkv.dtype());
  *k = Tensor::empty({c.kv_dim(), d}, wqkv.dtype());
  *v = Tensor::empty({c.kv_dim(), d}, wqkv.dtype());
  const size_t block = static_cast<size_t>(hd * d) * dtype_size(wqkv.dtype());
  const char* src = static_cast<const char*>(wqkv.raw());
  for_each_head_block(c, [&](int64_t packed, char which, int64_t head) {
    Tensor* dst = which == 'q' ? q : which == 'k' ? k : v;
    std::memcpy(static_cast<char*>(dst->raw()) + head * block, src + packed * block, block);
  });
}

void load_hf_weights(const std::string& hf_dir, const ModelConfig& c, ParamStore& params) {
  c.validate();
  HfWeights w(hf_dir);
  const bool intern = c.arch == Arch::InternLM2;

  // The HF tensor named `name`, its shape checked against `expected`.
  auto fetch = [&](const std::string& name, const Shape& expected) {
    IEVO_CHECK(w.has(name), "HF checkpoint ", hf_dir, ": missing tensor '", name, "' (",
               arch_name(c.arch), " layout)");
    const Shape s = w.shape(name);
    IEVO_CHECK(s == expected, "HF checkpoint ", hf_dir, ": tensor ", name, " has shape ",
               shape_str(s), ", expected ", shape_str(expected));
    const DType dt = w.dtype(name);
    IEVO_CHECK(is_float(dt), "HF checkpoint ", hf_dir, ": tensor ", name, " has dtype ",
               dtype_name(dt), ", expected a floating-point dtype");
    return w.get(name);
  };

  std::string cached;  // the wqkv unpacked last, shared by the layer's q, k, v
  Tensor cq, ck, cv;
  for (const ParamSpec& spec : param_specs(c)) {
    IEVO_CHECK(params.has(spec.name), "load_hf_weights: the parameter store has no '", spec.name, "'");
    Tensor& dst = params.get(spec.name);
    IEVO_CHECK(dst.shape() == spec.shape, "load_hf_weights: parameter ", spec.name, " has shape ",
               shape_str(dst.shape()), ", the config gives ", shape_str(spec.shape));
    Tensor src;
    if (intern && is_qkv(spec.name)) {
      const std::string packed = internlm2_name(spec.name);
      if (packed != cached) {
        internlm2_unpack_wqkv(c, fetch(packed, wqkv_shape(c)), &cq, &ck, &cv);
        cached = packed;
      }
      src = ends_with(spec.name, "q_proj.weight") ? cq : ends_with(spec.name, "k_proj.weight") ? ck : cv;
    } else {
      src = fetch(intern ? internlm2_name(spec.name) : spec.name, spec.shape);
    }
    dst.copy_from(src.dtype() == dst.dtype() ? src : src.to(dst.dtype()));
  }
}

void save_hf(const std::string& out_dir, const ModelConfig& c, const ParamStore& params,
             DType dtype, int64_t max_shard_bytes) {
  c.validate();
  const char* torch_dtype = torch_dtype_name(dtype);
  IEVO_CHECK(max_shard_bytes > 0, "save_hf: max_shard_bytes must be positive");
  const bool intern = c.arch == Arch::InternLM2;

  // The tensors in HF layout, produced one at a time while writing.
  auto convert = [dtype](const Tensor& t) {
    Tensor h = t.is_cpu() ? t : t.to(Device::CPU);
    return h.dtype() == dtype && h.is_contiguous() ? h : h.to(dtype);
  };
  std::vector<SafetensorsEntry> entries;
  for (const ParamSpec& spec : param_specs(c)) {
    IEVO_CHECK(params.has(spec.name), "save_hf: the parameter store has no '", spec.name, "'");
    const Tensor* t = &params.get(spec.name);
    IEVO_CHECK(t->shape() == spec.shape, "save_hf: parameter ", spec.name, " has shape ",
               shape_str(t->shape()), ", the config gives ", shape_str(spec.shape));
    if (intern && is_qkv(spec.name)) {
      if (!ends_with(spec.name, "q_proj.weight")) continue;  // packed with q
      const std::string base = spec.name.substr(0, spec.name.size() - std::strlen("q_proj.weight"));
      const Tensor* k = &params.get(base + "k_proj.weight");
      const Tensor* v = &params.get(base + "v_proj.weight");
      entries.push_back({internlm2_name(spec.name), dtype, wqkv_shape(c), [=, &c] {
                           return internlm2_pack_wqkv(c, convert(*t), convert(*k), convert(*v));
                         }});
    } else {
      entries.push_back({intern ? internlm2_name(spec.name) : spec.name, dtype, spec.shape,
                         [=] { return convert(*t); }});
    }
  }

  // Shards: consecutive tensors up to max_shard_bytes each (a larger tensor gets its own).
  std::vector<std::vector<SafetensorsEntry>> shards(1);
  int64_t shard_bytes = 0, total = 0;
  for (auto& e : entries) {
    const int64_t n = shape_numel(e.shape) * static_cast<int64_t>(dtype_size(dtype));
    if (!shards.back().empty() && shard_bytes + n > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(e);
    shard_bytes += n;
    total += n;
  }

  std::string dst = fs::path(out_dir).lexically_normal().string();
  while (dst.size() > 1 && dst.back() == '/') dst.pop_back();
  std::error_code ec0;
  IEVO_CHECK(!fs::exists(dst, ec0) || fs::is_directory(dst, ec0), "save_hf: ", dst,
             " exists and is not a directory");
  const fs::path parent = fs::path(dst).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  const std::string tmp = make_temp_directory(dst + ".tmp-");
  try {
    ::chmod(tmp.c_str(), 0755);
    const std::map<std::string, std::string> meta = {{"format", "pt"}};
    if (shards.size() == 1) {
      write_safetensors((fs::path(tmp) / "model.safetensors").string(), shards[0], meta);
    } else {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total}};
      index["weight_map"] = nlohmann::ordered_json::object();
      for (size_t s = 0; s < shards.size(); ++s) {
        char file[64];
        std::snprintf(file, sizeof file, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
        write_safetensors((fs::path(tmp) / file).string(), shards[s], meta);
        for (auto& e : shards[s]) index["weight_map"][e.name] = file;
      }
      write_file_atomic((fs::path(tmp) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    }
    write_file_atomic((fs::path(tmp) / "config.json").string(),
                      hf_model_config_json(c, torch_dtype).dump(2) + "\n");
    // Carry over what else an existing directory holds (tokenizer files, ...), not old weights.
    std::error_code ec;
    if (fs::is_directory(dst, ec)) {
      for (auto& f : fs::directory_iterator(dst)) {
        const std::string n = f.path().filename().string();
        const bool weights = (starts_with(n, "model") && (ends_with(n, ".safetensors") ||
                                                          ends_with(n, ".safetensors.index.json"))) ||
                             starts_with(n, "pytorch_model") || n == "config.json";
        if (!weights) fs::copy(f.path(), fs::path(tmp) / n, fs::copy_options::recursive);
      }
    }
    replace_directory(tmp, dst);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace ievo
