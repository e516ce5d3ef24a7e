// The YAML config: shipped configs load, every error names key + file:line, --set overrides,
// validation rules, config_to_yaml round trip, model.init_from_hf and the HF config.json codec.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "launch/config.h"
#include "models/hf_config.h"
#include "runtime/error.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

// Line numbers below refer to this text (1-based): 13 is "  steps: 10", value at column 10.
const std::string kBase = R"(run:
  device: cpu
model:
  vocab_size: 256
  hidden_size: 64
  num_layers: 2
  num_heads: 4
  ffn_hidden_size: 128
data:
  paths: [a]
  seq_len: 32
train:
  steps: 10
  global_batch_size: 8
  micro_batch_size: 4
)";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto p = s.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

// The message of the ievo::Error that f throws ("" if none, which fails the test).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an ievo::Error";
  return "";
}

// The error of loading `yaml` as x.yaml; set_error: kBase with one --set override.
std::string config_error(const std::string& yaml) {
  return error_of([&] { load_config_string(yaml, "x.yaml"); });
}
std::string set_error(const std::string& set) {
  return error_of([&] { load_config_string(kBase, "x.yaml", {set}); });
}

std::string write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
  return path;
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

// config_to_yaml without its first comment line (which names the source file).
std::string body(const Config& c) {
  std::string y = config_to_yaml(c);
  return y.substr(y.find('\n') + 1);
}

}  // namespace

TEST(Config, ShippedConfigsLoad) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(test::source_dir() + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    SCOPED_TRACE(e.path().string());
    Config c = load_config(e.path().string());
    EXPECT_EQ(c.source, e.path().string());
    EXPECT_GT(c.train.steps, 0);
    ++n;
  }
  EXPECT_GE(n, 4);
  const std::string dir = test::source_dir() + "/configs/";
  Config tiny = load_config(dir + "tiny.yaml");
  EXPECT_EQ(tiny.model.model.hidden_size, 128);
  EXPECT_EQ(tiny.model.model.num_kv_heads, 2);
  EXPECT_EQ(tiny.train.global_batch_size / tiny.train.micro_batch_size, 2);
  EXPECT_EQ(tiny.optim.lr, 2e-3);
  EXPECT_EQ(tiny.schedule.kind, "cosine");
  EXPECT_EQ(tiny.run.device, "cpu");
  // Parameter counts of the published models (TinyLlama 1,100,048,384; InternLM2-1.8B
  // 1,889,110,016) check that the sizes in the files are the real ones.
  EXPECT_EQ(load_config(dir + "tinyllama-1.1b.yaml").model.model.num_params(), 1100048384);
  Config il = load_config(dir + "internlm2-1.8b.yaml");
  EXPECT_EQ(il.model.model.arch, Arch::InternLM2);
  EXPECT_EQ(il.model.model.num_params(), 1889110016);
  EXPECT_EQ(load_config(dir + "llama-134m.yaml").model.model.num_params(), 134105856);
}

TEST(Config, DefaultsAndBase) {
  Config c = load_config_string(kBase, "x.yaml");
  EXPECT_EQ(c.model.model.num_kv_heads, 4);  // defaults to num_heads
  EXPECT_EQ(c.model.model.hd(), 16);
  EXPECT_EQ(c.data.paths, std::vector<std::string>{"a"});
  EXPECT_EQ(c.optim.lr, 3e-4);
  EXPECT_EQ(c.train.precision, "fp32");
  EXPECT_EQ(c.run.dir, "runs/default");
}

TEST(Config, UnknownKeyNamesKeyFileLineAndSuggests) {
  const std::string file = write_file(test::temp_dir("config") + "/x.yaml",
                                      replace(kBase, "  micro_batch_size: 4\n",
                                              "  micro_batch_size: 4\n  stepz: 5\n"));
  std::string m = error_of([&] { load_config(file); });
  EXPECT_HAS(m, "train.stepz: unknown key; did you mean 'train.steps'?");
  EXPECT_HAS(m, file + ":16:3");
  // A key in the wrong section is matched by its last part.
  m = config_error(kBase + "optim:\n  warmup_steps: 3\n");
  EXPECT_HAS(m, "optim.warmup_steps: unknown key; did you mean 'schedule.warmup_steps'?");
  EXPECT_HAS(m, "x.yaml:17:3");
  m = config_error(kBase + "colour: blue\n");
  EXPECT_HAS(m, "colour: unknown key (x.yaml:16:1)");  // nothing close: no suggestion
  m = config_error(kBase + "optim: 3\n");
  EXPECT_HAS(m, "optim: expected a mapping of optim.* keys, got '3' (x.yaml:16:1)");
  m = config_error(kBase + "train:\n  steps: 3\n");
  EXPECT_HAS(m, "train.steps: duplicate key (x.yaml:17:3)");
}

TEST(Config, WrongTypeNamesValueAndPosition) {
  std::string m = error_of(
      [&] { load_config_string(replace(kBase, "steps: 10", "steps: ten"), "configs/x.yaml"); });
  EXPECT_HAS(m, "train.steps: expected an integer, got 'ten' (configs/x.yaml:13:10)");
  m = config_error(replace(kBase, "steps: 10", "steps: 2.5"));
  EXPECT_HAS(m, "train.steps: expected an integer, got '2.5'");
  m = config_error(replace(kBase, "steps: 10", "steps: [1]"));
  EXPECT_HAS(m, "train.steps: expected an integer, got a list");
  m = config_error(kBase + "optim:\n  lr: fast\n");
  EXPECT_HAS(m, "optim.lr: expected a number, got 'fast' (x.yaml:17:7)");
  // An empty section is fine (all its keys commented out); an empty unknown one is not.
  EXPECT_EQ(load_config_string(kBase + "optim:\n  # lr: 1\n", "x.yaml").optim.lr, 3e-4);
  m = config_error(kBase + "optimizer:\n");
  EXPECT_HAS(m, "optimizer: unknown key (x.yaml:16:1)");
  m = config_error(replace(kBase, "paths: [a]", "paths: [a, {b: 1}]"));
  EXPECT_HAS(m, "data.paths[1]: expected a list of strings, got a mapping (x.yaml:10:14)");
  m = config_error(kBase + "optim:\n  lr: .inf\n");
  EXPECT_HAS(m, "optim.lr: expected a number, got '.inf'");
  // Integers written as exact floats are integers; 1e3 steps is 1000.
  EXPECT_EQ(load_config_string(replace(kBase, "steps: 10", "steps: 1e3"), "x").train.steps, 1000);
}

TEST(Config, MissingRequiredKeys) {
  std::string m = config_error(replace(kBase, "  micro_batch_size: 4\n", ""));
  EXPECT_HAS(m, "train.micro_batch_size: required key is missing (x.yaml)");
  m = config_error(replace(kBase, "  hidden_size: 64\n", ""));
  EXPECT_HAS(m, "model.hidden_size: required key is missing (x.yaml");
  m = config_error(replace(kBase, "  paths: [a]\n", ""));
  EXPECT_HAS(m, "data.paths: required key is missing (x.yaml; not needed with data.synthetic");
  Config c = load_config_string(replace(kBase, "  paths: [a]\n", "  synthetic: true\n"), "x.yaml");
  EXPECT_TRUE(c.data.synthetic);
  EXPECT_TRUE(c.data.paths.empty());
  m = error_of([&] { load_config_string("", "empty.yaml"); });
  EXPECT_HAS(m, "required key is missing (empty.yaml");
  m = error_of([&] { load_config(test::temp_dir("config") + "/nope.yaml"); });
  EXPECT_HAS(m, "nope.yaml: does not exist");
}

TEST(Config, InvalidEnumValues) {
  std::string m = config_error(replace(kBase, "device: cpu", "device: gpu"));
  EXPECT_HAS(m, "run.device: invalid value 'gpu' (expected one of: cpu,cuda) (x.yaml:2:11)");
  m = config_error(kBase + "schedule:\n  kind: step\n");
  EXPECT_HAS(m, "schedule.kind: invalid value 'step' (expected one of: constant,cosine,linear,wsd)");
  EXPECT_HAS(set_error("model.arch=mistral"),
             "model.arch: invalid value 'mistral' (expected one of: llama,internlm2) (--set model.arch)");
  EXPECT_HAS(set_error("model.checkpointing=some"), "model.checkpointing: invalid value 'some'");
  m = set_error("model.head_chunk_tokens=-1");
  EXPECT_HAS(m, "model.head_chunk_tokens");
  EXPECT_HAS(m, "must be >= 0");
}

TEST(Config, SetOverrides) {
  Config c = load_config_string(kBase, "x.yaml",
                                {"train.steps=7", "optim.lr=1e-3", "data.shuffle=false",
                                 "data.paths=[p1, p2]", "data.weights=[0.25, 0.75]",
                                 " model.num_kv_heads =2", "run.seed=18446744073709551615"});
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_EQ(c.optim.lr, 1e-3);
  EXPECT_FALSE(c.data.shuffle);
  EXPECT_EQ(c.data.paths, (std::vector<std::string>{"p1", "p2"}));
  EXPECT_EQ(c.data.weights, (std::vector<double>{0.25, 0.75}));
  EXPECT_EQ(c.model.model.num_kv_heads, 2);
  EXPECT_EQ(c.run.seed, 18446744073709551615ull);
  // The last --set of a key wins; a scalar is a one-element list; the value may contain '='.
  c = load_config_string(kBase, "x", {"train.steps=7", "train.steps=9", "data.paths=only",
                                      "run.dir=runs/a=b"});
  EXPECT_EQ(c.train.steps, 9);
  EXPECT_EQ(c.data.paths, std::vector<std::string>{"only"});
  EXPECT_EQ(c.run.dir, "runs/a=b");
  EXPECT_HAS(set_error("train.stepz=3"), "--set train.stepz: unknown key; did you mean 'train.steps'?");
  EXPECT_HAS(set_error("train.steps"), "--set train.steps: expected key=value");
  EXPECT_HAS(set_error("train.steps=ten"),
             "train.steps: expected an integer, got 'ten' (--set train.steps)");
  EXPECT_HAS(set_error("data.paths=[a, b"), "--set data.paths: value '[a, b' is not valid YAML");
  EXPECT_HAS(set_error("run.seed=-1"), "run.seed: expected a non-negative integer, got '-1'");
}

TEST(Config, Validation) {
  EXPECT_HAS(set_error("train.global_batch_size=10"),
             "train.global_batch_size: 10 is not divisible by train.micro_batch_size (4) "
             "(--set train.global_batch_size)");
  EXPECT_HAS(set_error("data.weights=[1, 2]"), "data.weights: has 2 entries but data.paths has 1");
  EXPECT_HAS(set_error("train.precision=bf16"), "train.precision: bf16 needs run.device: cuda");
  EXPECT_EQ(load_config_string(kBase, "x", {"train.precision=bf16", "run.device=cuda"})
                .train.precision, "bf16");
  EXPECT_HAS(set_error("optim.min_lr=1e-3"), "optim.min_lr: must satisfy 0 <= min_lr <= optim.lr");
  std::string m = config_error(replace(kBase, "steps: 10", "steps: 0"));
  EXPECT_HAS(m, "train.steps: must be positive, got 0 (x.yaml:13:10)");
  m = set_error("model.num_kv_heads=3");
  EXPECT_HAS(m, "model.num_heads (4) is not divisible by model.num_kv_heads (3)");
  EXPECT_HAS(m, "(model.num_heads at x.yaml:7:14; model.num_kv_heads at --set model.num_kv_heads)");
  EXPECT_HAS(set_error("model.max_position_embeddings=16"),
             "data.seq_len: 32 exceeds model.max_position_embeddings (16)");
  EXPECT_HAS(set_error("schedule.warmup_steps=11"),
             "schedule.warmup_steps: must be in [0, train.steps = 10], got 11");
  EXPECT_HAS(set_error("data.paths=[]"), "data.paths: is empty");
}

TEST(Config, YamlSyntaxErrorHasFileAndLine) {
  const std::string file = write_file(test::temp_dir("config") + "/bad.yaml",
                                      replace(kBase, "paths: [a]", "paths: [a, b"));
  std::string m = error_of([&] { load_config(file); });
  EXPECT_HAS(m, "YAML syntax error");
  EXPECT_HAS(m, file + ":11:");  // the unclosed list is noticed on the next line
}

TEST(Config, ToYamlRoundTrip) {
  Config a = load_config_string(kBase, "x.yaml",
                                {"data.paths=[p1, 'odd: name', '']", "data.weights=[0.1, 0.2, 0.7]",
                                 "optim.lr=1.2345678901234567e-3", "optim.min_lr=1e-5",
                                 "run.dir=''", "model.arch=internlm2", "model.head_dim=32",
                                 "model.rope_theta=500000", "schedule.kind=wsd",
                                 "run.seed=42", "model.checkpointing=selective",
                                 "model.head_chunk_tokens=512"});
  const std::string y = config_to_yaml(a);
  SCOPED_TRACE(y);
  EXPECT_HAS(y, "\ntrain:\n  steps: 10 ");
  EXPECT_HAS(y, "  global_batch_size: 8 ");
  EXPECT_HAS(y, "  norm_eps: 1.0e-05 ");  // floats always have a '.' (YAML 1.1 readers)
  EXPECT_HAS(y, "  rope_theta: 500000.0 ");
  EXPECT_HAS(y, "  paths: [p1, \"odd: name\", \"\"] ");
  Config b = load_config_string(y, "resolved.yaml");
  EXPECT_EQ(body(a), body(b));
  EXPECT_EQ(b.optim.lr, 1.2345678901234567e-3);  // shortest round-trip formatting, exact
  EXPECT_EQ(b.data.paths, (std::vector<std::string>{"p1", "odd: name", ""}));
  EXPECT_EQ(b.data.weights, (std::vector<double>{0.1, 0.2, 0.7}));
  EXPECT_EQ(b.run.dir, "");
  EXPECT_EQ(b.model.model.arch, Arch::InternLM2);
  EXPECT_EQ(b.model.model.head_dim, 32);
  EXPECT_EQ(b.model.model.num_kv_heads, 4);
  EXPECT_EQ(b.run.seed, 42u);
  EXPECT_EQ(b.model.checkpointing, "selective");
  EXPECT_EQ(b.model.head_chunk_tokens, 512);
  // Every key of the schema is written.
  for (const auto& k : config_schema()) {
    std::string leaf = k.key.substr(k.key.find('.') + 1);
    EXPECT_HAS(y, "\n  " + leaf + ": ");
  }
}

namespace {

// A small Llama config.json as transformers writes it; `rope` is spliced in.
std::string hf_json(const std::string& rope, const std::string& extra = "") {
  return R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96,
  "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "intermediate_size": 160, "rms_norm_eps": 1e-06, "max_position_embeddings": 256,
  "initializer_range": 0.05, "tie_word_embeddings": true, "hidden_act": "silu", )" +
         extra + rope + "}";
}

std::string hf_dir(const std::string& json) {
  std::string d = test::temp_dir("hf");
  write_file(d + "/config.json", json);
  return d;
}

const std::string kHfYaml = R"(model:
  init_from_hf: DIR
data:
  synthetic: true
  seq_len: 32
train:
  steps: 10
  global_batch_size: 8
  micro_batch_size: 4
)";

}  // namespace

TEST(Config, InitFromHf) {
  for (const std::string rope : {R"("rope_theta": 50000.0)",
                                 R"("rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"})"}) {
    SCOPED_TRACE(rope);
    const std::string dir = hf_dir(hf_json(rope));
    Config c = load_config_string(replace(kHfYaml, "DIR", dir), "hf.yaml");
    const ModelConfig& m = c.model.model;
    EXPECT_EQ(m.arch, Arch::Llama);
    EXPECT_EQ(m.vocab_size, 96);
    EXPECT_EQ(m.hidden_size, 64);
    EXPECT_EQ(m.num_layers, 2);
    EXPECT_EQ(m.num_heads, 4);
    EXPECT_EQ(m.num_kv_heads, 2);
    EXPECT_EQ(m.ffn_hidden_size, 160);
    EXPECT_EQ(m.head_dim, 0);
    EXPECT_EQ(m.rope_theta, 50000.0);
    EXPECT_EQ(m.norm_eps, 1e-6);
    EXPECT_TRUE(m.tie_embeddings);
    EXPECT_EQ(m.max_position_embeddings, 256);
    EXPECT_EQ(m.init_std, 0.05);
    // Agreeing sizes in the YAML are fine, and the resolved YAML reads back the same.
    Config again = load_config_string(config_to_yaml(c), "resolved.yaml");
    EXPECT_EQ(body(c), body(again));
  }
}

TEST(Config, InitFromHfErrors) {
  const std::string good = hf_json(R"("rope_theta": 50000.0)");
  auto load = [&](const std::string& json, const std::vector<std::string>& sets = {}) {
    return error_of([&] { load_config_string(replace(kHfYaml, "DIR", hf_dir(json)), "hf.yaml", sets); });
  };
  std::string m = load(replace(good, R"("hidden_size": 64, )", ""));
  EXPECT_HAS(m, "config.json: missing key 'hidden_size'");
  EXPECT_HAS(m, "model.init_from_hf, hf.yaml:2:17");
  m = load(replace(good, R"("hidden_size": 64)", R"("hidden_size": "64")"));
  EXPECT_HAS(m, "config.json: key 'hidden_size': expected an integer, got \"64\"");
  m = load(replace(good, R"("rope_theta": 50000.0)", R"("max_seq": 1)"));
  EXPECT_HAS(m, "config.json: missing key 'rope_theta'");
  m = load(hf_json(R"("rope_parameters": {"rope_type": "default"})"));
  EXPECT_HAS(m, "config.json: missing key 'rope_parameters.rope_theta'");
  m = load(good, {"model.hidden_size=128"});
  EXPECT_HAS(m, "model.hidden_size: 128 (--set model.hidden_size) disagrees with 64 from");
  m = load(good, {"model.rope_theta=10000"});
  EXPECT_HAS(m, "model.rope_theta: 10000.0 (--set model.rope_theta) disagrees with 50000.0");
  m = load(good, {"model.head_dim=32"});
  EXPECT_HAS(m, "model.head_dim: 32 (--set model.head_dim) disagrees with 16");
  EXPECT_EQ(load_config_string(replace(kHfYaml, "DIR", hf_dir(good)), "x",
                               {"model.head_dim=16", "model.num_kv_heads=2", "model.arch=llama"})
                .model.model.num_kv_heads, 2);
  m = load(replace(good, "LlamaForCausalLM", "MistralForCausalLM"));
  EXPECT_HAS(m, "unsupported architecture 'MistralForCausalLM'");
  m = load(hf_json(R"("rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0})"));
  EXPECT_HAS(m, "rope_scaling is set");
  EXPECT_HAS(m, "not supported");
  m = load(hf_json(R"("rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3"})"));
  EXPECT_HAS(m, "rope_parameters.rope_type is 'llama3'; RoPE scaling is not supported");
  m = load(hf_json(R"("rope_theta": 1e4)", R"("attention_bias": true, )"));
  EXPECT_HAS(m, "attention_bias = true is not supported");
  m = error_of([&] { read_hf_model_config(test::temp_dir("hf") + "/missing"); });
  EXPECT_HAS(m, "missing/config.json: cannot open");
}

TEST(HfConfig, JsonRoundTrip) {
  ModelConfig a;
  a.vocab_size = 1000, a.hidden_size = 96, a.num_layers = 3, a.num_heads = 6, a.num_kv_heads = 2;
  a.ffn_hidden_size = 256, a.rope_theta = 123456.5, a.norm_eps = 1e-6, a.tie_embeddings = true;
  a.init_std = 0.0125, a.max_position_embeddings = 777;
  for (Arch arch : {Arch::Llama, Arch::InternLM2}) {
    for (int64_t head_dim : {0, 32}) {
      if (arch == Arch::InternLM2 && head_dim) continue;  // InternLM2 has no head_dim key
      a.arch = arch, a.head_dim = head_dim;
      nlohmann::json j = hf_model_config_json(a, "bfloat16");
      EXPECT_EQ(j["model_type"], arch_name(arch));
      EXPECT_EQ(j["torch_dtype"], "bfloat16");
      EXPECT_EQ(j["hidden_act"], "silu");
      EXPECT_EQ(j["attention_bias"], false);
      EXPECT_EQ(j.contains("bias"), arch == Arch::InternLM2);
      const std::string d = hf_dir(j.dump(2));
      ModelConfig b = read_hf_model_config(d);
      EXPECT_EQ(b.arch, a.arch);
      EXPECT_EQ(b.vocab_size, a.vocab_size);
      EXPECT_EQ(b.hidden_size, a.hidden_size);
      EXPECT_EQ(b.num_layers, a.num_layers);
      EXPECT_EQ(b.num_heads, a.num_heads);
      EXPECT_EQ(b.num_kv_heads, a.num_kv_heads);
      EXPECT_EQ(b.ffn_hidden_size, a.ffn_hidden_size);
      EXPECT_EQ(b.head_dim, a.head_dim);
      EXPECT_EQ(b.hd(), head_dim ? 32 : 16);
      EXPECT_EQ(b.rope_theta, a.rope_theta);
      EXPECT_EQ(b.norm_eps, a.norm_eps);
      EXPECT_EQ(b.tie_embeddings, a.tie_embeddings);
      EXPECT_EQ(b.init_std, a.init_std);
      EXPECT_EQ(b.max_position_embeddings, a.max_position_embeddings);
      EXPECT_EQ(b.num_params(), a.num_params());
    }
  }
}

TEST(HfConfig, ReadsTransformersFixtures) {
  // Written by transformers 5.17 (rope_parameters) and by the InternLM2 remote code.
  ModelConfig l = read_hf_model_config(test::fixture_dir("llama_gqa/hf"));
  EXPECT_EQ(l.arch, Arch::Llama);
  EXPECT_EQ(l.hidden_size, 64);
  EXPECT_EQ(l.num_kv_heads, 2);
  EXPECT_EQ(l.hd(), 16);
  EXPECT_EQ(l.rope_theta, 50000.0);
  EXPECT_EQ(l.init_std, 0.05);
  ModelConfig i = read_hf_model_config(test::fixture_dir("llama_gqa/hf_internlm2"));
  EXPECT_EQ(i.arch, Arch::InternLM2);
  EXPECT_EQ(i.ffn_hidden_size, 160);
  EXPECT_EQ(i.rope_theta, 50000.0);
}

TEST(Config, DocsListEveryKey) {
  const std::string doc = test::read_file(test::source_dir() + "/docs/config.md");
  for (const auto& k : config_schema()) EXPECT_HAS(doc, "`" + k.key + "`");
}
