// Loading, validating and writing the training config. One table (kKeys) lists every known key:
// its dotted name, where it lives in Config, whether it is required and what it means. Loading is
//   1. collect:  walk the YAML file, map each leaf to a known dotted key (unknown keys: error with
//                a "did you mean" suggestion), remembering file:line:column for messages;
//   2. override: each "--set key=value" replaces the file's value (value parsed as YAML);
//   3. apply:    convert every value to the key's type (errors name key, value and location);
//   4. resolve:  required keys, model.init_from_hf (config.json), num_kv_heads default;
//   5. validate: ranges and cross-key rules.
#include "launch/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <iterator>
#include <variant>

#include "launch/duration.h"
#include "models/hf_config.h"
#include "parallel/pipeline_schedule.h"
#include "runtime/error.h"

namespace ievo {

namespace {

enum class Need { No, Yes, UnlessSynthetic, UnlessHF };

template <class T>
using Ref = T& (*)(Config&);
using AnyRef = std::variant<Ref<int64_t>, Ref<uint64_t>, Ref<double>, Ref<bool>, Ref<std::string>,
                            Ref<Arch>, Ref<std::vector<std::string>>, Ref<std::vector<double>>,
                            Ref<std::vector<int64_t>>>;

struct Key {
  const char* name;
  AnyRef ref;
  Need need;
  const char* help;
  const char* choices = "";  // "a|b|c" for string enums
};

// F(train.steps): a function pointer returning a reference to that field of a Config.
#define F(field) +[](Config& c) -> auto& { return c.field; }

// Adding a key is one line here (and a field in config.h, and a row in docs/config.md).
const Key kKeys[] = {
    {"run.dir", F(run.dir), Need::No, "run directory: log, resolved config, checkpoints"},
    {"run.seed", F(run.seed), Need::No, "seed for initialisation and data order"},
    {"run.device", F(run.device), Need::No, "where to train", "cpu|cuda"},
    {"run.deterministic", F(run.deterministic), Need::No, "bitwise-reproducible kernels (slower)"},
    {"model.init_from_hf", F(model.init_from_hf), Need::No,
     "Hugging Face model directory: architecture from its config.json, weights from its safetensors"},
    {"model.arch", F(model.model.arch), Need::No, "model family (HF layout)", "llama|internlm2"},
    {"model.vocab_size", F(model.model.vocab_size), Need::UnlessHF, "vocabulary size V"},
    {"model.hidden_size", F(model.model.hidden_size), Need::UnlessHF, "model width d"},
    {"model.num_layers", F(model.model.num_layers), Need::UnlessHF, "number of transformer blocks L"},
    {"model.num_heads", F(model.model.num_heads), Need::UnlessHF, "query heads"},
    {"model.num_kv_heads", F(model.model.num_kv_heads), Need::No,
     "key/value heads (grouped-query attention); default: num_heads"},
    {"model.ffn_hidden_size", F(model.model.ffn_hidden_size), Need::UnlessHF, "SwiGLU inner size F"},
    {"model.head_dim", F(model.model.head_dim), Need::No, "per-head size; 0: hidden_size / num_heads"},
    {"model.rope_theta", F(model.model.rope_theta), Need::No, "RoPE base frequency"},
    {"model.norm_eps", F(model.model.norm_eps), Need::No, "RMSNorm epsilon"},
    {"model.tie_embeddings", F(model.model.tie_embeddings), Need::No,
     "LM head shares the embedding matrix"},
    {"model.init_std", F(model.model.init_std), Need::No, "std of the normal weight initialisation"},
    {"model.max_position_embeddings", F(model.model.max_position_embeddings), Need::No,
     "longest sequence the model supports (data.seq_len must not exceed it)"},
    {"model.checkpointing", F(model.checkpointing), Need::No,
     "activation recomputation: none, full (whole block) or selective (norms + SwiGLU product)",
     "none|full|selective"},
    {"model.head_chunk_tokens", F(model.head_chunk_tokens), Need::No,
     "tokens the fused LM head + loss takes at once (logits [chunk, V] live at a time); 0: the "
     "largest power of two in [1024, 4096] with at most 2^29 logits"},
    {"data.paths", F(data.paths), Need::UnlessSynthetic,
     "dataset prefixes (PREFIX.bin / PREFIX.idx, Megatron indexed format)"},
    {"data.weights", F(data.weights), Need::No,
     "blending weight per path (normalised); empty: equal weights"},
    {"data.seq_len", F(data.seq_len), Need::Yes, "tokens per training sequence T"},
    {"data.shuffle", F(data.shuffle), Need::No, "shuffle sample order (seeded by run.seed)"},
    {"data.synthetic", F(data.synthetic), Need::No, "random tokens instead of files (benchmarks)"},
    {"data.packing", F(data.packing), Need::No,
     "pack documents: attention and positions restart at document boundaries"},
    {"data.valid_paths", F(data.valid_paths), Need::No,
     "validation dataset prefixes (never shuffled, never part of training); empty: no validation"},
    {"train.steps", F(train.steps), Need::Yes, "optimiser steps"},
    {"train.global_batch_size", F(train.global_batch_size), Need::Yes,
     "sequences per optimiser step"},
    {"train.micro_batch_size", F(train.micro_batch_size), Need::Yes,
     "sequences per forward/backward (gradient accumulation = global / micro)"},
    {"train.precision", F(train.precision), Need::No,
     "fp32, or bf16 / fp16 mixed precision (fp32 master weights; cuda only; fp16 with dynamic "
     "loss scaling, fp16.*)",
     "fp32|bf16|fp16"},
    {"train.log_every", F(train.log_every), Need::No, "print and log metrics every N steps"},
    {"train.eval_every", F(train.eval_every), Need::No,
     "validate every N steps (needs data.valid_paths); 0: after the last step only"},
    {"train.eval_batches", F(train.eval_batches), Need::No,
     "validation micro-batches (of train.micro_batch_size) per evaluation"},
    {"train.max_skips_in_a_row", F(train.max_skips_in_a_row), Need::No,
     "abort after this many steps in a row skipped for a non-finite loss or gradient"},
    {"train.max_time", F(train.max_time), Need::No,
     "wall-clock limit (4h, 30m, 1h30m, 90s or seconds): save and exit before it; empty: none"},
    {"optim.lr", F(optim.lr), Need::No, "peak learning rate (AdamW)"},
    {"optim.min_lr", F(optim.min_lr), Need::No, "final learning rate of the decay"},
    {"optim.weight_decay", F(optim.weight_decay), Need::No,
     "decoupled weight decay (not applied to norms)"},
    {"optim.beta1", F(optim.beta1), Need::No, "AdamW first-moment decay"},
    {"optim.beta2", F(optim.beta2), Need::No, "AdamW second-moment decay"},
    {"optim.eps", F(optim.eps), Need::No, "AdamW epsilon"},
    {"optim.grad_clip", F(optim.grad_clip), Need::No, "clip the global gradient L2 norm; 0: off"},
    {"optim.param_remainders", F(optim.param_remainders), Need::No,
     "bf16: keep the f32 master weights as 16-bit remainders beside the bf16 weights (2 bytes a "
     "parameter less, the same master bit for bit)"},
    {"schedule.kind", F(schedule.kind), Need::No, "learning-rate schedule after warmup",
     "constant|cosine|linear|wsd"},
    {"schedule.warmup_steps", F(schedule.warmup_steps), Need::No,
     "linear warmup from 0 to optim.lr"},
    {"schedule.decay_fraction", F(schedule.decay_fraction), Need::No,
     "wsd: fraction of train.steps spent in the final linear decay"},
    {"checkpoint.every", F(checkpoint.every), Need::No,
     "save a checkpoint every N steps; 0: only at the end"},
    {"checkpoint.at_end", F(checkpoint.at_end), Need::No,
     "save a checkpoint after the last step (false: benchmarks that keep nothing)"},
    {"checkpoint.resume", F(checkpoint.resume), Need::No,
     "auto: continue from the newest valid checkpoint in run.dir; none: start fresh; or the "
     "path of a checkpoint directory"},
    {"checkpoint.keep_last", F(checkpoint.keep_last), Need::No,
     "keep only the K newest checkpoints (older ones removed after a new one is complete); 0: all"},
    {"checkpoint.async", F(checkpoint.async), Need::No,
     "write checkpoints in a background thread from a host copy while training continues"},
    {"checkpoint.overwrite", F(checkpoint.overwrite), Need::No,
     "with resume: none, delete the run directory's existing checkpoints instead of refusing"},
    {"parallel.tensor", F(parallel.tensor), Need::No,
     "tensor-parallel size T: heads, FFN and vocabulary split over T ranks (1: off)"},
    {"parallel.sequence", F(parallel.sequence), Need::No,
     "sequence parallelism: megatron shards norms/residuals over the tensor group; ulysses splits "
     "tokens over parallel.sequence_size ranks with all-to-all around attention",
     "none|megatron|ulysses"},
    {"parallel.sequence_size", F(parallel.sequence_size), Need::No,
     "Ulysses: ranks a micro-batch's tokens are split over (part of the data-parallel group)"},
    {"parallel.pipeline", F(parallel.pipeline), Need::No, "pipeline-parallel stages P (1: off)"},
    {"parallel.schedule", F(parallel.schedule), Need::No, "pipeline schedule",
     "gpipe|1f1b|interleaved"},
    {"parallel.virtual_stages", F(parallel.virtual_stages), Need::No,
     "interleaved schedule: model chunks per pipeline rank V"},
    {"parallel.pipeline_layers", F(parallel.pipeline_layers), Need::No,
     "blocks per (virtual) stage, P x V entries summing to model.num_layers; empty: balanced by cost"},
    {"parallel.zero", F(parallel.zero), Need::No,
     "ZeRO stage over the data-parallel ranks: 0 none, 1 optimizer state, 2 + gradients, 3 + weights"},
    {"parallel.bucket_mb", F(parallel.bucket_mb), Need::No,
     "MiB per gradient reduce / weight gather bucket"},
    {"parallel.timeout_s", F(parallel.timeout_s), Need::No,
     "with several ranks: end the job when a rank makes no progress this long; 0: never"},
    {"metrics.tensorboard", F(metrics.tensorboard), Need::No,
     "also write TensorBoard scalars (events.out.tfevents.*) beside metrics.jsonl"},
    {"fp16.initial_scale", F(fp16.initial_scale), Need::No, "fp16: initial loss scale"},
    {"fp16.min_scale", F(fp16.min_scale), Need::No, "fp16: the loss scale never drops below this"},
    {"fp16.max_scale", F(fp16.max_scale), Need::No, "fp16: the loss scale never grows above this"},
    {"fp16.growth_factor", F(fp16.growth_factor), Need::No,
     "fp16: scale *= growth_factor after growth_interval steps without overflow"},
    {"fp16.backoff_factor", F(fp16.backoff_factor), Need::No,
     "fp16: scale *= backoff_factor on overflow (once hysteresis overflows are reached)"},
    {"fp16.growth_interval", F(fp16.growth_interval), Need::No,
     "fp16: overflow-free steps before the scale grows"},
    {"fp16.hysteresis", F(fp16.hysteresis), Need::No,
     "fp16: overflows tolerated before the first backoff (reset when the scale grows)"},
    {"debug.nan_at_step", F(debug.nan_at_step), Need::No,
     "test hook: poison a gradient with NaN at this step; 0: off"},
    {"debug.nan_steps", F(debug.nan_steps), Need::No,
     "test hook: poison this many consecutive steps from debug.nan_at_step"},
    {"debug.nan_param", F(debug.nan_param), Need::No,
     "test hook: the parameter whose gradient is poisoned; empty: the first parameter"},
};
#undef F

const Key* find_key(const std::string& name) {
  for (const Key& k : kKeys)
    if (name == k.name) return &k;
  return nullptr;
}

bool is_section(const std::string& prefix) {
  for (const Key& k : kKeys)
    if (std::string_view(k.name).starts_with(prefix + ".")) return true;
  return false;
}

// model.* keys that describe the architecture; with model.init_from_hf they come from config.json.
bool from_hf(const Key& k) {
  const std::string n = k.name;
  return n.starts_with("model.") && n != "model.init_from_hf" && n != "model.checkpointing" &&
         n != "model.head_chunk_tokens";
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string last_part(const std::string& s) {
  auto dot = s.rfind('.');
  return dot == std::string::npos ? s : s.substr(dot + 1);
}

// "; did you mean 'train.steps'?" for a near miss of the whole key ("train.stepz") or of its
// last part in another section ("steps", "optim.warmup_steps"); "" if nothing is close.
std::string suggestion(const std::string& name) {
  const Key* best = nullptr;
  size_t best_d = SIZE_MAX;
  for (const Key& k : kKeys) {
    size_t full = edit_distance(name, k.name);
    size_t last = edit_distance(last_part(name), last_part(k.name));
    size_t d = full <= 2 ? full : last <= last_part(name).size() / 4 ? last : SIZE_MAX;
    if (d < best_d) best_d = d, best = &k;
  }
  return best ? std::string("; did you mean '") + best->name + "'?" : "";
}

std::string location(const std::string& file, const YAML::Mark& m) {
  if (m.is_null()) return file;
  return detail::cat(file, ":", m.line + 1, ":", m.column + 1);
}

std::string describe(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "nothing (null)";
}

// ---- YAML value -> typed field ------------------------------------------------------------

struct Value {
  YAML::Node node;
  std::string where;  // "configs/x.yaml:12:10" or "--set train.steps"
  std::string file;   // the YAML file it came from; "" for --set
};

[[noreturn]] void type_error(const std::string& key, const char* expected, const Value& v) {
  IEVO_FAIL(key, ": expected ", expected, ", got ", describe(v.node), " (", v.where, ")");
}

template <class T>
std::optional<T> parse_number(std::string s) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  T x{};
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return x;
}

std::optional<double> parse_float(const std::string& s) {
  auto d = parse_number<double>(s);
  if (d && !std::isfinite(*d)) return std::nullopt;
  return d;
}

std::optional<int64_t> parse_int(const std::string& s) {
  if (auto i = parse_number<int64_t>(s)) return i;
  auto d = parse_float(s);  // 1e6 or 2.0 is an integer too
  if (d && *d == std::floor(*d) && std::fabs(*d) < 9.2e18) return static_cast<int64_t>(*d);
  return std::nullopt;
}

void check_choice(const Key& k, const std::string& s, const Value& v) {
  if (!*k.choices) return;
  std::string list = k.choices;
  std::stringstream ss(list);
  for (std::string c; std::getline(ss, c, '|');)
    if (c == s) return;
  std::replace(list.begin(), list.end(), '|', ',');
  IEVO_FAIL(k.name, ": invalid value '", s, "' (expected one of: ", list, ") (", v.where, ")");
}

void decode(const Key& k, const Value& v, int64_t& out) {
  std::optional<int64_t> i;
  if (v.node.IsScalar()) i = parse_int(v.node.Scalar());
  if (!i) type_error(k.name, "an integer", v);
  out = *i;
}
void decode(const Key& k, const Value& v, uint64_t& out) {
  std::optional<uint64_t> i;
  if (v.node.IsScalar()) i = parse_number<uint64_t>(v.node.Scalar());
  if (!i) type_error(k.name, "a non-negative integer", v);
  out = *i;
}
void decode(const Key& k, const Value& v, double& out) {
  std::optional<double> d;
  if (v.node.IsScalar()) d = parse_float(v.node.Scalar());
  if (!d) type_error(k.name, "a number", v);
  out = *d;
}
void decode(const Key& k, const Value& v, bool& out) {
  if (!v.node.IsScalar() || !YAML::convert<bool>::decode(v.node, out))
    type_error(k.name, "true or false", v);
}
void decode(const Key& k, const Value& v, std::string& out) {
  if (v.node.IsNull()) {
    out.clear();
  } else {
    if (!v.node.IsScalar()) type_error(k.name, "a string", v);
    out = v.node.Scalar();
  }
  check_choice(k, out, v);
}
void decode(const Key& k, const Value& v, Arch& out) {
  std::string s;
  decode(k, v, s);  // the choices check names the key and location
  out = arch_from_name(s);
}
// Lists: a YAML sequence, or a single scalar meaning a one-element list; null means empty.
template <class T>
void decode_list(const Key& k, const Value& v, std::vector<T>& out, const char* expected) {
  out.clear();
  if (v.node.IsNull()) return;
  if (v.node.IsScalar()) {
    out.resize(1);
    decode(k, v, out[0]);
    return;
  }
  if (!v.node.IsSequence()) type_error(k.name, expected, v);
  out.resize(v.node.size());
  for (size_t i = 0; i < v.node.size(); ++i) {
    const std::string elem = detail::cat(k.name, "[", i, "]");
    Key ek = k;
    ek.name = elem.c_str();
    Value ev{v.node[i], v.file.empty() ? v.where : location(v.file, v.node[i].Mark()), v.file};
    if (!ev.node.IsScalar()) type_error(elem, expected, ev);
    decode(ek, ev, out[i]);
  }
}
void decode(const Key& k, const Value& v, std::vector<std::string>& out) {
  decode_list(k, v, out, "a list of strings");
}
void decode(const Key& k, const Value& v, std::vector<double>& out) {
  decode_list(k, v, out, "a list of numbers");
}
void decode(const Key& k, const Value& v, std::vector<int64_t>& out) {
  decode_list(k, v, out, "a list of integers");
}

// ---- typed field -> YAML text -------------------------------------------------------------

std::string fmt(int64_t x) { return std::to_string(x); }
std::string fmt(uint64_t x) { return std::to_string(x); }
std::string fmt(bool x) { return x ? "true" : "false"; }
std::string fmt(Arch a) { return arch_name(a); }
std::string fmt(double x) {  // shortest text that reads back to the same double
  char buf[400];
  const double ax = std::fabs(x);
  const bool fixed = ax == 0 || (ax >= 1e-4 && ax < 1e16);  // 500000.0, 0.0003; else 1.0e-05
  auto r = std::to_chars(buf, buf + sizeof buf, x,
                         fixed ? std::chars_format::fixed : std::chars_format::scientific);
  std::string s(buf, r.ptr);
  // YAML 1.1 readers (PyYAML) want a '.' in every float: 10000 -> 10000.0, 1e-05 -> 1.0e-05.
  if (s.find('.') == std::string::npos) s.insert(std::min(s.find('e'), s.size()), ".0");
  return s;
}
std::string fmt(const std::string& s) {
  YAML::Emitter e;
  e << s;  // quotes when needed ("", "null", "a: b", ...)
  return e.c_str();
}
template <class T>
std::string fmt(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + fmt(v[i]);
  return s + "]";
}

std::string format_value(const Key& k, const Config& c) {
  return std::visit([&](auto ref) { return fmt(ref(const_cast<Config&>(c))); }, k.ref);
}

const char* type_name(const Key& k) {
  // One name per AnyRef alternative, in its order (the static_assert keeps them in step).
  static constexpr const char* names[] = {"int",    "int",  "float", "bool", "string",
                                          "string", "list of strings", "list of floats",
                                          "list of ints"};
  static_assert(std::size(names) == std::variant_size_v<AnyRef>);
  return names[k.ref.index()];
}

// ---- loading ------------------------------------------------------------------------------

class Loader {
 public:
  explicit Loader(std::string file) : file_(std::move(file)) {}

  // Step 1: walk the YAML tree, mapping leaves to dotted keys.
  void collect(const YAML::Node& node, const std::string& prefix) {
    for (const auto& kv : node) {
      const YAML::Node kn = kv.first, vn = kv.second;
      const std::string key_at = location(file_, kn.Mark());
      if (!kn.IsScalar()) IEVO_FAIL("keys must be plain names (", key_at, ")");
      const std::string path = prefix.empty() ? kn.Scalar() : prefix + "." + kn.Scalar();
      if (find_key(path)) {
        if (given_.count(path)) IEVO_FAIL(path, ": duplicate key (", key_at, ")");
        // A null value has no useful mark of its own: point at the key.
        given_[path] = {vn, vn.IsNull() ? key_at : location(file_, vn.Mark()), file_};
      } else if (is_section(path) && (vn.IsNull() || (vn.IsMap() && vn.size() == 0))) {
        continue;  // an empty section ("optim:" with its keys commented out)
      } else if (vn.IsMap() && vn.size() > 0) {
        collect(vn, path);  // a section (or a misspelt one: its leaves get the suggestion)
      } else if (is_section(path)) {
        IEVO_FAIL(path, ": expected a mapping of ", path, ".* keys, got ", describe(vn), " (",
                  key_at, ")");
      } else {
        IEVO_FAIL(path, ": unknown key", suggestion(path), " (", key_at, ")");
      }
    }
  }

  // Step 2: "--set key=value" on top of the file.
  void override_with(const std::string& o) {
    const auto eq = o.find('=');
    if (eq == std::string::npos) IEVO_FAIL("--set ", o, ": expected key=value");
    std::string key = o.substr(0, eq);
    key.erase(0, key.find_first_not_of(" \t"));
    key.erase(key.find_last_not_of(" \t") + 1);
    if (!find_key(key)) IEVO_FAIL("--set ", key, ": unknown key", suggestion(key));
    const std::string text = o.substr(eq + 1);
    YAML::Node n;
    try {
      n = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      IEVO_FAIL("--set ", key, ": value '", text, "' is not valid YAML: ", e.msg);
    }
    given_[key] = {n, "--set " + key, ""};
  }

  Config resolve() {
    Config c;
    c.source = file_;
    // Step 3: typed values.
    for (const auto& [name, v] : given_) {
      const Key& k = *find_key(name);
      std::visit([&](auto ref) { decode(k, v, ref(c)); }, k.ref);
    }
    // Step 4: required keys, HF architecture, defaults.
    for (const Key& k : kKeys) {
      bool needed = k.need == Need::Yes || (k.need == Need::UnlessSynthetic && !c.data.synthetic) ||
                    (k.need == Need::UnlessHF && c.model.init_from_hf.empty());
      if (!needed || given_.count(k.name)) continue;
      const char* why = k.need == Need::UnlessSynthetic ? "; not needed with data.synthetic: true"
                        : k.need == Need::UnlessHF      ? "; not needed with model.init_from_hf"
                                                        : "";
      IEVO_FAIL(k.name, ": required key is missing (", file_, why, ")");
    }
    if (!c.model.init_from_hf.empty())
      merge_hf(c);
    else if (!given_.count("model.num_kv_heads"))
      c.model.model.num_kv_heads = c.model.model.num_heads;
    validate(c);
    return c;
  }

 private:
  std::string at(const std::string& key) const {
    auto it = given_.find(key);
    return it == given_.end() ? file_ + ", default" : it->second.where;
  }

  template <class... A>
  void check(bool ok, const std::string& key, const A&... msg) const {
    if (!ok) IEVO_FAIL(key, ": ", msg..., " (", at(key), ")");
  }

  // model.* comes from HF_DIR/config.json; model.* keys also given in the YAML must agree.
  void merge_hf(Config& c) const {
    const std::string dir = c.model.init_from_hf;
    ModelConfig hf;
    try {
      hf = read_hf_model_config(dir);
    } catch (const Error& e) {
      IEVO_FAIL(e.what(), " (model.init_from_hf, ", at("model.init_from_hf"), ")");
    }
    Config theirs = c;
    theirs.model.model = hf;
    for (const Key& k : kKeys) {
      if (!from_hf(k) || !given_.count(k.name)) continue;
      std::string mine = format_value(k, c), hf_value = format_value(k, theirs);
      if (std::string(k.name) == "model.head_dim") {  // 0 means hidden_size / num_heads
        int64_t h = c.model.model.head_dim;
        mine = fmt(h ? h : hf.hidden_size / hf.num_heads);
        hf_value = fmt(hf.hd());
      }
      if (mine != hf_value)
        IEVO_FAIL(k.name, ": ", mine, " (", at(k.name), ") disagrees with ", hf_value, " from ",
                  dir, "/config.json (model.init_from_hf)");
    }
    c.model.model = hf;
  }

  // Step 5: ranges and rules between keys.
  void validate(const Config& c) const {
    const ModelConfig& m = c.model.model;
    for (const char* key : {"model.vocab_size", "model.hidden_size", "model.num_layers",
                            "model.num_heads", "model.num_kv_heads", "model.ffn_hidden_size",
                            "model.max_position_embeddings", "data.seq_len", "train.steps",
                            "train.global_batch_size", "train.micro_batch_size",
                            "train.log_every"}) {
      int64_t v = std::get<Ref<int64_t>>(find_key(key)->ref)(const_cast<Config&>(c));
      check(v > 0, key, "must be positive, got ", v);
    }
    check(m.head_dim >= 0, "model.head_dim", "must be >= 0, got ", m.head_dim);
    try {
      m.validate();
    } catch (const Error& e) {  // point at the model.* keys the message names
      std::string where;
      for (const Key& k : kKeys)
        if (from_hf(k) && std::string_view(e.what()).find(k.name) != std::string_view::npos)
          where += (where.empty() ? "" : "; ") + std::string(k.name) + " at " + at(k.name);
      IEVO_FAIL(e.what(), " (", where.empty() ? file_ : where, ")");
    }
    check(m.init_std >= 0, "model.init_std", "must be >= 0, got ", m.init_std);
    check(c.model.head_chunk_tokens >= 0, "model.head_chunk_tokens", "must be >= 0 (0: automatic), got ",
          c.model.head_chunk_tokens);
    check(c.data.seq_len <= m.max_position_embeddings, "data.seq_len", c.data.seq_len,
          " exceeds model.max_position_embeddings (", m.max_position_embeddings, ")");

    check(c.data.synthetic || !c.data.paths.empty(), "data.paths",
          "is empty (give at least one dataset prefix, or set data.synthetic: true)");
    if (!c.data.weights.empty()) {
      check(c.data.weights.size() == c.data.paths.size(), "data.weights", "has ",
            c.data.weights.size(), " entries but data.paths has ", c.data.paths.size());
      double sum = 0;
      for (double w : c.data.weights) {
        check(w >= 0, "data.weights", "must be >= 0, got ", w);
        sum += w;
      }
      check(sum > 0, "data.weights", "must not all be zero");
    }

    check(!(c.data.packing && c.data.synthetic), "data.packing",
          "needs documents; data.synthetic random tokens have none");
    check(c.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0: after the last step), got ",
          c.train.eval_every);
    check(c.train.eval_every == 0 || !c.data.valid_paths.empty(), "train.eval_every",
          "is set but data.valid_paths is empty (give a validation dataset prefix)");
    check(c.train.eval_batches > 0, "train.eval_batches", "must be positive, got ",
          c.train.eval_batches);

    const TrainConfig& t = c.train;
    check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
          t.global_batch_size, " is not divisible by train.micro_batch_size (",
          t.micro_batch_size, ")");
    check(t.precision == "fp32" || c.run.device == "cuda", "train.precision", t.precision,
          " needs run.device: cuda (the CPU backend trains in fp32); run.device is '",
          c.run.device, "'");
    check(t.max_skips_in_a_row >= 1, "train.max_skips_in_a_row", "must be >= 1, got ",
          t.max_skips_in_a_row);
    if (!t.max_time.empty()) {
      auto secs = parse_duration(t.max_time);
      check(secs && *secs > 0, "train.max_time", "'", t.max_time,
            "' is not a positive duration (examples: 4h, 30m, 1h30m, 90s, 3600)");
    }
    const Fp16Config& h = c.fp16;
    check(h.min_scale > 0, "fp16.min_scale", "must be positive, got ", h.min_scale);
    check(h.initial_scale >= h.min_scale, "fp16.initial_scale", "must be >= fp16.min_scale (",
          h.min_scale, "), got ", h.initial_scale);
    check(h.max_scale >= h.initial_scale, "fp16.max_scale", "must be >= fp16.initial_scale (",
          h.initial_scale, "), got ", h.max_scale);
    check(h.growth_factor > 1, "fp16.growth_factor", "must be > 1, got ", h.growth_factor);
    check(h.backoff_factor > 0 && h.backoff_factor < 1, "fp16.backoff_factor",
          "must be in (0, 1), got ", h.backoff_factor);
    check(h.growth_interval >= 1, "fp16.growth_interval", "must be >= 1, got ", h.growth_interval);
    check(h.hysteresis >= 1, "fp16.hysteresis", "must be >= 1, got ", h.hysteresis);
    const DebugConfig& dbg = c.debug;
    check(dbg.nan_at_step >= 0, "debug.nan_at_step", "must be >= 0 (0: off), got ", dbg.nan_at_step);
    check(dbg.nan_steps >= 1, "debug.nan_steps", "must be >= 1, got ", dbg.nan_steps);
    if (!dbg.nan_param.empty()) {
      bool found = false;
      for (const auto& spec : param_specs(m)) found = found || spec.name == dbg.nan_param;
      check(found, "debug.nan_param", "'", dbg.nan_param, "' is not a parameter of the model");
    }

    const OptimConfig& o = c.optim;
    check(o.lr >= 0, "optim.lr", "must be >= 0, got ", o.lr);
    check(o.min_lr >= 0 && o.min_lr <= o.lr, "optim.min_lr", "must satisfy 0 <= min_lr <= optim.lr (",
          o.lr, "), got ", o.min_lr);
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0, got ", o.weight_decay);
    check(o.beta1 >= 0 && o.beta1 < 1, "optim.beta1", "must be in [0, 1), got ", o.beta1);
    check(o.beta2 >= 0 && o.beta2 < 1, "optim.beta2", "must be in [0, 1), got ", o.beta2);
    check(o.eps > 0, "optim.eps", "must be positive, got ", o.eps);
    check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off), got ", o.grad_clip);

    const ScheduleConfig& s = c.schedule;
    check(s.warmup_steps >= 0 && s.warmup_steps <= t.steps, "schedule.warmup_steps",
          "must be in [0, train.steps = ", t.steps, "], got ", s.warmup_steps);
    check(s.decay_fraction >= 0 && s.decay_fraction <= 1, "schedule.decay_fraction",
          "must be in [0, 1], got ", s.decay_fraction);
    check(c.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end), got ",
          c.checkpoint.every);
    check(!c.checkpoint.resume.empty(), "checkpoint.resume",
          "must be auto, none or the path of a checkpoint directory");
    check(c.checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0: keep all), got ",
          c.checkpoint.keep_last);
    const ParallelConfig& par = c.parallel;
    check(par.tensor >= 1, "parallel.tensor", "must be >= 1, got ", par.tensor);
    check(par.pipeline >= 1, "parallel.pipeline", "must be >= 1, got ", par.pipeline);
    check(par.sequence_size >= 1, "parallel.sequence_size", "must be >= 1, got ", par.sequence_size);
    check(par.sequence_size == 1 || par.sequence == "ulysses", "parallel.sequence_size",
          "> 1 needs parallel.sequence: ulysses, got ", par.sequence_size);
    check(par.virtual_stages >= 1, "parallel.virtual_stages", "must be >= 1, got ", par.virtual_stages);
    check(par.zero >= 0 && par.zero <= 3, "parallel.zero", "unknown ZeRO stage ", par.zero,
          " (expected 0, 1, 2 or 3)");
    check(par.bucket_mb > 0, "parallel.bucket_mb", "must be positive, got ", par.bucket_mb);
    check(par.timeout_s >= 0, "parallel.timeout_s", "must be >= 0 (0: never), got ", par.timeout_s);
    check(par.pipeline == 1 || par.zero <= 2, "parallel.zero", "= 3 with parallel.pipeline = ", par.pipeline,
          ": ZeRO-3 would gather every stage's weights again for each micro-batch of the schedule; use "
          "parallel.zero 0-2 with pipeline parallelism (InternEvo and torchtitan refuse it too)");
    if (par.pipeline > 1 || par.virtual_stages > 1 || !par.pipeline_layers.empty()) {
      // The schedule kind against P and V (the micro-batch count is checked when training
      // starts: it depends on the world size) and the layer split (parallel/pipeline_schedule.h).
      const int P = static_cast<int>(par.pipeline), V = static_cast<int>(par.virtual_stages);
      try {
        make_pipeline_schedule(pipeline_kind_from_name(par.schedule), P, P, V);
        pipeline_layer_split(m, P, V, c.data.seq_len, par.pipeline_layers);
      } catch (const Error& e) {
        std::string where;
        for (const char* k : {"parallel.pipeline", "parallel.virtual_stages", "parallel.schedule",
                              "parallel.pipeline_layers", "model.num_layers"})
          if (std::string_view(e.what()).find(k) != std::string_view::npos)
            where += (where.empty() ? "" : "; ") + std::string(k) + " at " + at(k);
        IEVO_FAIL(e.what(), " (", where.empty() ? file_ : where, ")");
      }
    }
  }

  std::string file_;
  std::map<std::string, Value> given_;
};

Config load_node(const YAML::Node& root, const std::string& name,
                 const std::vector<std::string>& overrides) {
  Loader l(name);
  if (root.IsMap())
    l.collect(root, "");
  else if (!root.IsNull())
    IEVO_FAIL("expected a mapping of sections (run, model, data, train, ...) at the top level, got ",
              describe(root), " (", name, ")");
  for (const auto& o : overrides) l.override_with(o);
  return l.resolve();
}

}  // namespace

Config load_config_string(const std::string& yaml, const std::string& name,
                          const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    IEVO_FAIL("YAML syntax error: ", e.msg, " (", location(name, e.mark), ")");
  }
  return load_node(root, name, overrides);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    IEVO_FAIL("config file ", path, ": ",
              std::filesystem::exists(path, ec) ? "not a regular file" : "does not exist");
  std::ifstream in(path, std::ios::binary);
  if (!in) IEVO_FAIL("config file ", path, ": cannot open (", std::strerror(errno), ")");
  std::stringstream ss;
  ss << in.rdbuf();
  return load_config_string(ss.str(), path, overrides);
}

std::string config_to_yaml(const Config& c) {
  std::ostringstream os;
  os << "# ievo configuration, resolved (every key; defaults filled in)";
  if (!c.source.empty()) os << "; read from " << c.source;
  os << "\n";
  std::string section;
  for (const Key& k : kKeys) {
    const std::string name = k.name;
    const auto dot = name.find('.');
    if (name.substr(0, dot) != section) {
      section = name.substr(0, dot);
      os << "\n" << section << ":\n";
    }
    std::string line = "  " + name.substr(dot + 1) + ": " + format_value(k, c);
    line.resize(std::max<size_t>(line.size() + 2, 36), ' ');
    os << line << "# " << k.help << "\n";
  }
  return os.str();
}

std::vector<ConfigKeyInfo> config_schema() {
  const Config defaults;
  std::vector<ConfigKeyInfo> out;
  for (const Key& k : kKeys) {
    std::string type = type_name(k);
    if (*k.choices) {
      type = k.choices;
      for (size_t p = 0; (p = type.find('|', p)) != std::string::npos; p += 3)
        type.replace(p, 1, " | ");
    }
    const char* req = k.need == Need::Yes               ? "yes"
                      : k.need == Need::UnlessSynthetic ? "unless data.synthetic"
                      : k.need == Need::UnlessHF        ? "unless model.init_from_hf"
                                                        : "";
    out.push_back({k.name, type, format_value(k, defaults), req, k.help});
  }
  return out;
}

}  // namespace ievo
