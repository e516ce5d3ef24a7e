#include "models/shard.h"

#include <cstring>

namespace ievo {

void ModelShard::validate(const ModelConfig& c) const {
  IEVO_CHECK(tp >= 1 && tp_rank >= 0 && tp_rank < tp, "tensor-parallel rank ", tp_rank, " of ", tp);
  if (tp > 1) {
    IEVO_CHECK(c.num_heads % tp == 0, "parallel.tensor (", tp, ") must divide model.num_heads (",
               c.num_heads, ")");
    IEVO_CHECK(c.num_kv_heads % tp == 0 || tp % c.num_kv_heads == 0, "parallel.tensor (", tp,
               ") must divide model.num_kv_heads (", c.num_kv_heads,
               ") or be a multiple of it (key/value heads are then replicated)");
    IEVO_CHECK(c.ffn_hidden_size % tp == 0, "parallel.tensor (", tp,
               ") must divide model.ffn_hidden_size (", c.ffn_hidden_size, ")");
    IEVO_CHECK(c.vocab_size % tp == 0, "parallel.tensor (", tp, ") must divide model.vocab_size (",
               c.vocab_size, ") for the vocabulary-parallel embedding and LM head");
  }
  int64_t next = -1;
  for (const LayerRange& r : ranges(c)) {
    IEVO_CHECK(r.begin >= 0 && r.begin < r.end && r.end <= c.num_layers, "pipeline chunk [", r.begin,
               ", ", r.end, ") is not a non-empty range of the model's ", c.num_layers, " layers");
    IEVO_CHECK(r.begin > next, "pipeline chunks must be in increasing layer order");
    next = r.end - 1;
  }
}

namespace {

// A slice of `global` along `dim`: [offset, offset + n).
ParamSpec sliced(ParamSpec s, int dim, int64_t offset, int64_t n, int replicas = 1) {
  s.global_shape = s.shape;
  s.split_dim = dim;
  s.split_offset = offset;
  s.shape[dim] = n;
  s.replicas = replicas;
  return s;
}

}  // namespace

std::vector<ParamSpec> param_specs(const ModelConfig& c, const ModelShard& sh) {
  sh.validate(c);
  const std::vector<ParamSpec> all = param_specs(c);
  const int T = sh.tp, t = sh.tp_rank;
  const int64_t hd = c.hd();
  // Key/value heads: Hkv >= T: Hkv/T heads each; else the head of this rank's query heads.
  const int64_t kv_local = sh.kv_heads(c);
  const int64_t kv_first = c.num_kv_heads >= T ? t * kv_local : t / (T / c.num_kv_heads);
  const int kv_replicas = c.num_kv_heads >= T ? 1 : T / static_cast<int>(c.num_kv_heads);
  const std::vector<LayerRange> ranges = sh.ranges(c);
  auto holds_layer = [&](int64_t l) {
    for (const LayerRange& r : ranges)
      if (l >= r.begin && l < r.end) return true;
    return false;
  };
  auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  std::vector<ParamSpec> out;
  for (const ParamSpec& s : all) {
    const std::string& n = s.name;
    if (n == "model.embed_tokens.weight") {
      // The first stage embeds; a tied head on the last stage keeps its own copy.
      if (!sh.first && !(sh.last && c.tie_embeddings)) continue;
    } else if (n == "model.norm.weight" || n == "lm_head.weight") {
      if (!sh.last) continue;
    } else {
      const size_t p = std::string("model.layers.").size();
      if (!holds_layer(std::stoll(n.substr(p, n.find('.', p) - p)))) continue;
    }
    if (T == 1) {
      out.push_back(s);
    } else if (n == "model.embed_tokens.weight" || n == "lm_head.weight") {
      out.push_back(sliced(s, 0, t * sh.vocab(c), sh.vocab(c)));
    } else if (ends_with(n, "q_proj.weight")) {
      out.push_back(sliced(s, 0, t * sh.heads(c) * hd, sh.heads(c) * hd));
    } else if (ends_with(n, "k_proj.weight") || ends_with(n, "v_proj.weight")) {
      out.push_back(sliced(s, 0, kv_first * hd, kv_local * hd, kv_replicas));
    } else if (ends_with(n, "o_proj.weight")) {
      out.push_back(sliced(s, 1, t * sh.heads(c) * hd, sh.heads(c) * hd));
    } else if (ends_with(n, "gate_proj.weight") || ends_with(n, "up_proj.weight")) {
      out.push_back(sliced(s, 0, t * sh.ffn(c), sh.ffn(c)));
    } else if (ends_with(n, "down_proj.weight")) {
      out.push_back(sliced(s, 1, t * sh.ffn(c), sh.ffn(c)));
    } else {  // norms: whole on every rank of the group
      ParamSpec r = s;
      r.replicas = T;
      out.push_back(r);
    }
  }
  return out;
}

namespace {

// Copies the slice between a global and a local tensor (host memory), either direction.
void copy_slice(const ParamSpec& spec, const Tensor& global, const Tensor& local, bool to_local) {
  IEVO_CHECK(global.is_cpu() && local.is_cpu() && global.is_contiguous() && local.is_contiguous(),
             spec.name, ": slices are copied between contiguous host tensors");
  IEVO_CHECK(global.shape() == spec.global(), spec.name, ": global tensor is ",
             shape_str(global.shape()), ", expected ", shape_str(spec.global()));
  IEVO_CHECK(local.shape() == spec.shape && local.dtype() == global.dtype(), spec.name,
             ": local tensor is ", local.describe(), ", expected ", shape_str(spec.shape));
  const size_t es = dtype_size(global.dtype());
  // View both as [outer, dim, inner] and copy the [offset, offset + n) block of the middle axis.
  const int d = spec.split_dim < 0 ? 0 : spec.split_dim;
  const int64_t off = spec.split_dim < 0 ? 0 : spec.split_offset;
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < d; ++i) outer *= spec.shape[i];
  for (size_t i = d + 1; i < spec.shape.size(); ++i) inner *= spec.shape[i];
  const int64_t gn = spec.global()[d], ln = spec.shape[d];
  char* g = static_cast<char*>(global.raw());
  char* l = static_cast<char*>(local.raw());
  for (int64_t o = 0; o < outer; ++o) {
    char* gp = g + ((o * gn + off) * inner) * es;
    char* lp = l + (o * ln * inner) * es;
    const size_t bytes = static_cast<size_t>(ln * inner) * es;
    if (to_local)
      std::memcpy(lp, gp, bytes);
    else
      std::memcpy(gp, lp, bytes);
  }
}

}  // namespace

Tensor slice_for(const ParamSpec& spec, const Tensor& global) {
  Tensor local = Tensor::empty(spec.shape, global.dtype());
  copy_slice(spec, global, local, true);
  return local;
}

void place_slice(const ParamSpec& spec, const Tensor& local, Tensor& global) {
  copy_slice(spec, global, local, false);
}

}  // namespace ievo
