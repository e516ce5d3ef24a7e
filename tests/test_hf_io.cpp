// Model file formats: safetensors (read/write/validation), the HF state-dict adapter (Llama,
// InternLM2 packed wqkv, tied embeddings, shards), HDF5 checkpoints and HF <-> checkpoint
// conversion. Round trips are compared bit for bit.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "launch/convert.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/safetensors.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;
using ievo::test::random_tensor;
using ievo::test::temp_dir;

namespace {

ModelConfig small_config(Arch arch = Arch::Llama, bool tied = false) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;  // G = 2, head dim 4
  c.ffn_hidden_size = 24;
  c.tie_embeddings = tied;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 128;
  return c;
}

ParamStore random_store(const ModelConfig& c, uint64_t seed, DType dt = DType::F32) {
  ParamStore s(param_specs(c), dt, Device::CPU);
  for (size_t i = 0; i < s.size(); ++i)
    s[i].copy_from(random_tensor(s.spec(i).shape, DType::F32, seed + i).to(dt));
  return s;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void expect_same_store(const ParamStore& a, const ParamStore& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(same_bytes(a[i], b[i])) << a.spec(i).name;
}

// Runs fn, expects an ievo::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing '" << parts.at(0) << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// A safetensors file from a literal header and `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes,
               uint64_t header_len_override = 0) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = header_len_override ? header_len_override : header.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  f.write(len, 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::string zeros(data_bytes, '\0');
  f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
}

// Rewrites DIR/model.safetensors through `edit` (name -> tensor, in file order).
void edit_hf(const std::string& dir,
             const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  const std::string path = dir + "/model.safetensors";
  std::vector<std::pair<std::string, Tensor>> ts;
  {
    auto f = SafetensorsFile::open(path);
    for (auto& n : f.names()) ts.push_back({n, f.get(n).clone()});
  }
  edit(ts);
  write_safetensors(path, ts, {{"format", "pt"}});
}

// Every tensor's (dtype, shape, bytes) of an HF directory.
std::map<std::string, std::string> hf_bytes(const std::string& dir) {
  HfWeights w(dir);
  std::map<std::string, std::string> out;
  for (auto& n : w.names()) {
    const auto& f = w.file_of(n);
    out[n] = std::string(dtype_name(f.dtype(n))) + shape_str(f.shape(n)) +
             std::string(static_cast<const char*>(f.data(n)), f.nbytes(n));
  }
  return out;
}

}  // namespace

// ---- safetensors ----------------------------------------------------------------------------

TEST(Safetensors, RoundTripEveryDtype) {
  const std::string path = temp_dir("st") + "/t.safetensors";
  Tensor f32 = random_tensor({3, 5}, DType::F32, 1);
  Tensor f64 = random_tensor({4}, DType::F64, 2);
  Tensor bf16 = random_tensor({2, 3}, DType::F32, 3).to(DType::BF16);
  Tensor f16 = random_tensor({7}, DType::F32, 4).to(DType::F16);  // 14 bytes: the next ones are misaligned
  Tensor i32 = Tensor::from_vector(std::vector<int32_t>{-7, 0, 2147483647, 42}, {2, 2});
  Tensor i64 = Tensor::empty({3}, DType::I64);
  i64.data<int64_t>()[0] = -1;
  i64.data<int64_t>()[1] = int64_t{1} << 60;
  i64.data<int64_t>()[2] = 5;
  Tensor empty = Tensor::empty({0, 4}, DType::F32);
  Tensor scalar = Tensor::from_vector(std::vector<float>{3.5f}, {});
  Tensor strided = random_tensor({4, 6}, DType::F32, 5).slice(1, 1, 4);  // non-contiguous
  std::vector<std::pair<std::string, Tensor>> ts = {
      {"a.f32", f32}, {"b.f64", f64}, {"c.bf16", bf16}, {"d.f16", f16}, {"e.i32", i32},
      {"f.i64", i64}, {"g.empty", empty}, {"h.scalar", scalar}, {"i.strided", strided}};
  write_safetensors(path, ts, {{"format", "pt"}, {"note", "x"}});

  const std::string raw = ievo::test::read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);  // header padded with spaces, as HF does
  EXPECT_EQ(raw[8], '{');
  EXPECT_EQ(raw[8 + n - 1] == '}' || raw[8 + n - 1] == ' ', true);
  size_t data = 0;
  for (auto& [name, t] : ts) data += t.nbytes();
  EXPECT_EQ(raw.size(), 8 + n + data);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  auto f = SafetensorsFile::open(path);
  std::vector<std::string> names;
  for (auto& [name, t] : ts) names.push_back(name);
  EXPECT_EQ(f.names(), names);  // data in the given order
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "x");
  for (auto& [name, t] : ts) {
    Tensor r = f.get(name);
    EXPECT_EQ(f.dtype(name), t.dtype()) << name;
    EXPECT_EQ(f.shape(name), t.shape()) << name;
    EXPECT_TRUE(same_bytes(r, t.clone())) << name;
  }
  EXPECT_FALSE(f.has("zzz"));
  expect_error([&] { f.get("zzz"); }, {path, "zzz"});

  // Tensors are views of a private mapping: writing one does not change the file.
  Tensor v = f.get("a.f32");
  v.data<float>()[0] = 1234.0f;
  EXPECT_EQ(SafetensorsFile::open(path).get("a.f32").item(0), f32.item(0));
  // Views outlive the SafetensorsFile object.
  Tensor keep;
  { keep = SafetensorsFile::open(path).get("b.f64"); }
  EXPECT_EQ(keep.item(3), f64.item(3));
}

TEST(Safetensors, ReadsHfWrittenFile) {
  // Written by Python safetensors (tests/fixtures/make_hf_fixtures.py).
  const std::string path = ievo::test::fixture_dir("llama_gqa") + "/hf/model.safetensors";
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names().size(), 21u);  // embed, 2 x 9 per layer, norm, lm_head
  EXPECT_EQ(f.shape("model.layers.1.self_attn.k_proj.weight"), (Shape{32, 64}));
  EXPECT_EQ(f.dtype("model.norm.weight"), DType::F32);
  EXPECT_EQ(f.metadata().at("format"), "pt");
}

TEST(Safetensors, BadFilesNameFileAndTensor) {
  const std::string dir = temp_dir("stbad");
  const std::string p = dir + "/bad.safetensors";
  {
    std::ofstream(p, std::ios::binary) << "abc";
    expect_error([&] { SafetensorsFile::open(p); }, {p, "too short"});
  }
  write_raw(p, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8, 1000);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "header length 1000 exceeds"});
  write_raw(p, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'", "out of range"});
  write_raw(p, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", 16);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'", "needs 16"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
               R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 24);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'a' and 'b' overlap"});
  write_raw(p, R"({"w":{"dtype":"Q7","shape":[4],"data_offsets":[0,16]}})", 16);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'", "unknown dtype 'Q7'"});
  write_raw(p, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16])", 16);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "not valid JSON"});
  write_raw(p, R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", 16);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'", "negative"});
  // A huge shape must not overflow into a small byte count.
  write_raw(p, R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'"});
  write_raw(p, R"({"w":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}})", 0);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'w'", "2^63"});
  // An empty tensor needs no bytes, however large its other dimensions.
  write_raw(p, R"({"w":{"dtype":"F32","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(SafetensorsFile::open(p).get("w").numel(), 0);
  // Listed but not readable by ievo.
  write_raw(p, R"({"m":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})", 3);
  auto f = SafetensorsFile::open(p);
  expect_error([&] { f.get("m"); }, {p, "'m'", "U8"});
}

// ---- HF adapter ----------------------------------------------------------------------------

TEST(HfAdapter, LlamaRoundTripAndConfig) {
  const ModelConfig c = small_config();
  ParamStore a = random_store(c, 10);
  const std::string dir = temp_dir("hf") + "/out";
  save_hf(dir, c, a, DType::F32);
  ParamStore b(param_specs(c), DType::F32, Device::CPU);
  load_hf_weights(dir, c, b);
  expect_same_store(a, b);
  auto cfg = nlohmann::json::parse(ievo::test::read_file(dir + "/config.json"));
  EXPECT_EQ(cfg.at("torch_dtype"), "float32");
  const ModelConfig back = read_hf_model_config(dir);
  EXPECT_EQ(back.num_kv_heads, 2);
  EXPECT_EQ(back.ffn_hidden_size, 24);
  EXPECT_EQ(back.arch, Arch::Llama);
}

TEST(HfAdapter, MissingTensorIsNamed) {
  for (Arch arch : {Arch::Llama, Arch::InternLM2}) {
    const ModelConfig c = small_config(arch);
    ParamStore a = random_store(c, 20);
    const std::string dir = temp_dir("hfmiss") + "/m";
    save_hf(dir, c, a, DType::F32);
    const std::string gone = arch == Arch::Llama ? "model.layers.1.mlp.up_proj.weight"
                                                 : "model.layers.0.attention.wqkv.weight";
    edit_hf(dir, [&](auto& ts) {
      std::erase_if(ts, [&](auto& p) { return p.first == gone; });
    });
    ParamStore b(param_specs(c), DType::F32, Device::CPU);
    expect_error([&] { load_hf_weights(dir, c, b); }, {dir, "missing tensor '" + gone + "'"});
  }
}

TEST(HfAdapter, ShapeMismatchIsNamed) {
  const ModelConfig c = small_config();
  ParamStore a = random_store(c, 30);
  const std::string dir = temp_dir("hfshape") + "/m";
  save_hf(dir, c, a, DType::F32);
  edit_hf(dir, [](auto& ts) {
    for (auto& [n, t] : ts)
      if (n == "model.layers.0.self_attn.k_proj.weight") t = Tensor::zeros({4, 16}, DType::F32);
  });
  ParamStore b(param_specs(c), DType::F32, Device::CPU);
  expect_error([&] { load_hf_weights(dir, c, b); },
               {"HF checkpoint " + dir, "tensor model.layers.0.self_attn.k_proj.weight has shape [4, 16], expected [8, 16]"});
}

TEST(HfAdapter, InternLM2PackUnpack) {
  const ModelConfig cl = small_config(Arch::Llama);
  const ModelConfig ci = small_config(Arch::InternLM2);
  ParamStore a = random_store(cl, 40);
  const std::string dir = temp_dir("hfi") + "/m";
  save_hf(dir, ci, a, DType::F32);

  auto f = SafetensorsFile::open(dir + "/model.safetensors");
  EXPECT_EQ(f.names().size(), 2u + 2u * 7u + 1u);  // tok_embeddings, norm, output; 7 per layer
  EXPECT_FALSE(f.has("model.layers.0.self_attn.q_proj.weight"));
  const std::string L = "model.layers.1.";
  Tensor wqkv = f.get(L + "attention.wqkv.weight");
  ASSERT_EQ(wqkv.shape(), (Shape{(4 + 2 * 2) * 4, 16}));
  // kv group j = 1 (G = 2, hd = 4): packed blocks 4, 5 are q heads 2, 3; block 6 is k head 1;
  // block 7 is v head 1. Each block is hd = 4 rows of d = 16.
  const Tensor& q = a.get(L + "self_attn.q_proj.weight");
  const Tensor& k = a.get(L + "self_attn.k_proj.weight");
  const Tensor& v = a.get(L + "self_attn.v_proj.weight");
  auto row_eq = [](const Tensor& x, int64_t rx, const Tensor& y, int64_t ry) {
    for (int64_t col = 0; col < 16; ++col)
      if (x.data<float>()[rx * 16 + col] != y.data<float>()[ry * 16 + col]) return false;
    return true;
  };
  for (int64_t r = 0; r < 4; ++r) {
    EXPECT_TRUE(row_eq(wqkv, 16 + r, q, 8 + r)) << r;   // q head 2
    EXPECT_TRUE(row_eq(wqkv, 20 + r, q, 12 + r)) << r;  // q head 3
    EXPECT_TRUE(row_eq(wqkv, 24 + r, k, 4 + r)) << r;   // k head 1
    EXPECT_TRUE(row_eq(wqkv, 28 + r, v, 4 + r)) << r;   // v head 1
    EXPECT_TRUE(row_eq(wqkv, 0 + r, a.get("model.layers.1.self_attn.q_proj.weight"), r));
  }
  EXPECT_TRUE(same_bytes(f.get("model.tok_embeddings.weight"), a.get("model.embed_tokens.weight")));
  EXPECT_TRUE(same_bytes(f.get("output.weight"), a.get("lm_head.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "feed_forward.w1.weight"), a.get(L + "mlp.gate_proj.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "feed_forward.w3.weight"), a.get(L + "mlp.up_proj.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "feed_forward.w2.weight"), a.get(L + "mlp.down_proj.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "attention.wo.weight"), a.get(L + "self_attn.o_proj.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "attention_norm.weight"), a.get(L + "input_layernorm.weight")));
  EXPECT_TRUE(same_bytes(f.get(L + "ffn_norm.weight"), a.get(L + "post_attention_layernorm.weight")));

  ParamStore b(param_specs(ci), DType::F32, Device::CPU);
  load_hf_weights(dir, ci, b);
  expect_same_store(a, b);
  EXPECT_EQ(read_hf_model_config(dir).arch, Arch::InternLM2);
}

TEST(HfAdapter, FixtureInternLM2EqualsLlama) {
  // The fixture's InternLM2 file was packed by Python from the same HF Llama weights.
  const std::string root = ievo::test::fixture_dir("llama_gqa");
  const ModelConfig cl = read_hf_model_config(root + "/hf");
  const ModelConfig ci = read_hf_model_config(root + "/hf_internlm2");
  ASSERT_EQ(ci.arch, Arch::InternLM2);
  ParamStore a(param_specs(cl), DType::F32, Device::CPU), b(param_specs(ci), DType::F32, Device::CPU);
  load_hf_weights(root + "/hf", cl, a);
  load_hf_weights(root + "/hf_internlm2", ci, b);
  expect_same_store(a, b);
  // A tied model saved by transformers has no lm_head.weight.
  const std::string tied = ievo::test::fixture_dir("llama_tied") + "/hf";
  const ModelConfig ct = read_hf_model_config(tied);
  ASSERT_TRUE(ct.tie_embeddings);
  ParamStore t(param_specs(ct), DType::F64, Device::CPU);
  load_hf_weights(tied, ct, t);
  EXPECT_NE(t.get("model.norm.weight").item(0), 0.0);
}

TEST(HfAdapter, TiedEmbeddings) {
  const ModelConfig ct = small_config(Arch::Llama, /*tied=*/true);
  ParamStore a = random_store(ct, 50);
  const std::string dir = temp_dir("hftied") + "/m";
  save_hf(dir, ct, a, DType::F32);
  EXPECT_FALSE(SafetensorsFile::open(dir + "/model.safetensors").has("lm_head.weight"));
  // An lm_head in the file of a tied model is ignored.
  edit_hf(dir, [](auto& ts) { ts.push_back({"lm_head.weight", Tensor::zeros({32, 16}, DType::F32)}); });
  ParamStore b(param_specs(ct), DType::F32, Device::CPU);
  load_hf_weights(dir, ct, b);
  expect_same_store(a, b);
  // Untied config, no lm_head: error naming it.
  edit_hf(dir, [](auto& ts) { std::erase_if(ts, [](auto& p) { return p.first == "lm_head.weight"; }); });
  const ModelConfig cu = small_config(Arch::Llama, false);
  ParamStore u(param_specs(cu), DType::F32, Device::CPU);
  expect_error([&] { load_hf_weights(dir, cu, u); }, {dir, "missing tensor 'lm_head.weight'"});
}

TEST(HfAdapter, ShardedIndex) {
  for (Arch arch : {Arch::Llama, Arch::InternLM2}) {
    const ModelConfig c = small_config(arch);
    ParamStore a = random_store(c, 60);
    const std::string dir = temp_dir("hfshard") + "/m";
    save_hf(dir, c, a, DType::BF16, /*max_shard_bytes=*/3000);
    EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
    auto index = nlohmann::json::parse(ievo::test::read_file(dir + "/model.safetensors.index.json"));
    std::set<std::string> shards;
    for (auto& [n, file] : index["weight_map"].items()) shards.insert(file.get<std::string>());
    EXPECT_GE(shards.size(), 3u);
    int64_t total = 0;
    for (auto& s : shards) {
      EXPECT_TRUE(fs::exists(dir + "/" + s)) << s;
      auto f = SafetensorsFile::open(dir + "/" + s);
      for (auto& n : f.names()) total += static_cast<int64_t>(f.nbytes(n));
    }
    EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), total);
    EXPECT_EQ(total, c.num_params() * 2);
    HfWeights w(dir);
    EXPECT_TRUE(w.sharded());
    ParamStore b(param_specs(c), DType::F32, Device::CPU);
    load_hf_weights(dir, c, b);
    for (size_t i = 0; i < a.size(); ++i)  // bf16 rounding of the f32 values: |rel| <= 2^-8
      EXPECT_LE(ievo::test::rel_l2(b[i], a[i]), 4e-3) << a.spec(i).name;
    // bf16 -> f32 is exact: the loaded values are the file's.
    EXPECT_TRUE(same_bytes(b.get("model.norm.weight").to(DType::BF16), w.get("model.norm.weight")));
    // An index naming the wrong shard is an error naming the tensor and the file.
    const std::string moved = index["weight_map"].begin().key();
    std::string other;
    for (auto& s : shards)
      if (s != index["weight_map"].begin().value()) other = s;
    index["weight_map"][moved] = other;
    std::ofstream(dir + "/model.safetensors.index.json") << index.dump();
    expect_error([&] { HfWeights bad(dir); }, {"model.safetensors.index.json", moved, other});
  }
}

TEST(HfAdapter, SaveReplacesDirectoryKeepingOtherFiles) {
  const ModelConfig c = small_config();
  const std::string root = temp_dir("hfrepl");
  const std::string dir = root + "/m";
  save_hf(dir, c, random_store(c, 70), DType::F32);
  std::ofstream(dir + "/tokenizer.json") << "{\"tok\": 1}";
  ParamStore b = random_store(c, 71);
  save_hf(dir, c, b, DType::BF16);
  EXPECT_EQ(ievo::test::read_file(dir + "/tokenizer.json"), "{\"tok\": 1}");
  auto cfg = nlohmann::json::parse(ievo::test::read_file(dir + "/config.json"));
  EXPECT_EQ(cfg.at("torch_dtype"), "bfloat16");
  EXPECT_EQ(SafetensorsFile::open(dir + "/model.safetensors").dtype("lm_head.weight"), DType::BF16);
  int entries = 0;
  for (auto& e : fs::directory_iterator(root)) entries += e.is_directory();
  EXPECT_EQ(entries, 1);  // no .tmp-/.old- directories left behind
  expect_error([&] { save_hf(dir, c, b, DType::I32); }, {"i32"});
}

// ---- HDF5 checkpoints ----------------------------------------------------------------------

TEST(Checkpoint, SaveLoadExact) {
  const ModelConfig c = small_config();
  ParamStore p = random_store(c, 80), m = random_store(c, 81), v = random_store(c, 82);
  const std::string run = temp_dir("ckpt");
  const std::string dir = checkpoint_dir(run, 7);
  CheckpointState st;
  st.step = 7;
  st.consumed_samples = 448;
  st.seed = (uint64_t{1} << 63) + 5;
  st.config_yaml = "train:\n  steps: 10\n";
  st.extra = {{"lr", 0.00125}, {"rng", {1, 2, 3}}};
  save_checkpoint(dir, c, st, {{"params", &p}, {"exp_avg", &m}, {"exp_avg_sq", &v}});
  EXPECT_EQ(ievo::test::read_file(run + "/checkpoints/latest"), "step_7\n");
  EXPECT_EQ(latest_checkpoint(run), dir);
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  EXPECT_EQ(checkpoint_groups(dir), (std::vector<std::string>{"exp_avg", "exp_avg_sq", "params"}));

  ParamStore pm(param_specs(c), DType::F32, Device::CPU), mm(param_specs(c), DType::F32, Device::CPU),
      vm(param_specs(c), DType::F32, Device::CPU);
  CheckpointState r = load_checkpoint(dir, {{"params", &pm}, {"exp_avg", &mm}, {"exp_avg_sq", &vm}}, false);
  expect_same_store(p, pm);
  expect_same_store(m, mm);
  expect_same_store(v, vm);
  EXPECT_EQ(r.step, 7);
  EXPECT_EQ(r.consumed_samples, 448);
  EXPECT_EQ(r.seed, st.seed);
  EXPECT_EQ(r.config_yaml, st.config_yaml);
  EXPECT_EQ(r.extra, st.extra);
  auto state = nlohmann::json::parse(ievo::test::read_file(dir + "/state.json"));
  EXPECT_EQ(state.at("ievo_version").get<std::string>().empty(), false);

  const ModelConfig rc = read_checkpoint_model_config(dir);
  EXPECT_EQ(rc.hidden_size, 16);
  EXPECT_EQ(rc.num_kv_heads, 2);
  EXPECT_EQ(rc.ffn_hidden_size, 24);

  // A bf16 store is saved as f32 and loads back exactly.
  ParamStore pb = random_store(c, 83, DType::BF16), pb2(param_specs(c), DType::BF16, Device::CPU);
  save_checkpoint(checkpoint_dir(run, 9), c, st, {{"params", &pb}});
  load_checkpoint(checkpoint_dir(run, 9), {{"params", &pb2}}, false);
  expect_same_store(pb, pb2);
  EXPECT_EQ(latest_checkpoint(run), checkpoint_dir(run, 9));

  // An f64 store is saved as f64.
  ParamStore pd = random_store(c, 85, DType::F64), pd2(param_specs(c), DType::F64, Device::CPU);
  save_checkpoint(checkpoint_dir(run, 8), c, st, {{"params", &pd}}, false);
  load_checkpoint(checkpoint_dir(run, 8), {{"params", &pd2}}, false);
  expect_same_store(pd, pd2);

  // Saving the same step again replaces it.
  st.step = 9;
  st.consumed_samples = 999;
  save_checkpoint(checkpoint_dir(run, 9), c, st, {{"params", &pb}});
  EXPECT_EQ(load_checkpoint(checkpoint_dir(run, 9), {{"params", &pb2}}, false).consumed_samples, 999);

  // Optimizer moments absent: zeroed when optional, an error otherwise.
  ParamStore mo = random_store(c, 84);
  load_checkpoint(checkpoint_dir(run, 9), {{"params", &pb2}, {"exp_avg", &mo}}, true);
  for (size_t i = 0; i < mo.size(); ++i) EXPECT_EQ(ievo::test::max_abs_diff(mo[i], Tensor::zeros(mo.spec(i).shape, DType::F32)), 0.0);
  expect_error([&] { load_checkpoint(checkpoint_dir(run, 9), {{"exp_avg", &mo}}, false); },
               {"model.h5", "missing group /exp_avg"});
}

TEST(Checkpoint, MismatchesAreNamed) {
  const ModelConfig c = small_config();
  ParamStore p = random_store(c, 90);
  const std::string dir = checkpoint_dir(temp_dir("ckmis"), 1);
  save_checkpoint(dir, c, CheckpointState{}, {{"params", &p}});
  ModelConfig wide = c;
  wide.ffn_hidden_size = 32;
  ParamStore w(param_specs(wide), DType::F32, Device::CPU);
  expect_error([&] { load_checkpoint(dir, {{"params", &w}}, false); },
               {dir + "/model.h5", "dataset /params/model.layers.0.mlp.gate_proj.weight has shape [24, 16], expected [32, 16]"});
  ModelConfig deep = c;
  deep.num_layers = 3;
  ParamStore d(param_specs(deep), DType::F32, Device::CPU);
  expect_error([&] { load_checkpoint(dir, {{"params", &d}}, false); },
               {dir + "/model.h5", "missing dataset /params/model.layers.2.input_layernorm.weight"});
  ParamStore t(param_specs(small_config(Arch::Llama, true)), DType::F32, Device::CPU);
  expect_error([&] { load_checkpoint(dir, {{"params", &t}}, false); },
               {"/params/lm_head.weight", "not a parameter"});
  expect_error([&] { load_checkpoint(dir + "/nope", {{"params", &p}}, false); }, {"nope", "state.json"});
}

TEST(Checkpoint, FlippedByteIsDetected) {
  const ModelConfig c = small_config();
  ParamStore p = random_store(c, 100);
  const std::string dir = checkpoint_dir(temp_dir("ckflip"), 3);
  save_checkpoint(dir, c, CheckpointState{}, {{"params", &p}});
  const std::string h5 = dir + "/model.h5";
  const std::string name = "model.layers.1.mlp.down_proj.weight";
  haddr_t off;
  {
    hid_t f = H5Fopen(h5.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = H5Dopen2(f, ("/params/" + name).c_str(), H5P_DEFAULT);
    off = H5Dget_offset(ds);
    H5Dclose(ds);
    H5Fclose(f);
  }
  ASSERT_NE(off, HADDR_UNDEF);
  const std::string good = ievo::test::read_file(h5);
  auto flip_and_load = [&](size_t at) {
    std::string bad = good;
    bad[at] ^= 0x10;
    std::ofstream(h5, std::ios::binary) << bad;
    ParamStore q(param_specs(c), DType::F32, Device::CPU);
    load_checkpoint(dir, {{"params", &q}}, false);
  };
  // In the data of one tensor: its checksum catches it.
  expect_error([&] { flip_and_load(off + 123); }, {h5, "/params/" + name, "corrupt"});
  // In the superblock: HDF5 cannot open the file.
  expect_error([&] { flip_and_load(9); }, {h5});
  // The intact file still loads.
  std::ofstream(h5, std::ios::binary) << good;
  ParamStore q(param_specs(c), DType::F32, Device::CPU);
  load_checkpoint(dir, {{"params", &q}}, false);
  expect_same_store(p, q);
}

TEST(Checkpoint, LatestFallsBackToScan) {
  const ModelConfig c = small_config();
  ParamStore p = random_store(c, 110);
  const std::string run = temp_dir("cklatest");
  EXPECT_EQ(latest_checkpoint(run), "");
  save_checkpoint(checkpoint_dir(run, 20), c, CheckpointState{}, {{"params", &p}}, false);
  save_checkpoint(checkpoint_dir(run, 100), c, CheckpointState{}, {{"params", &p}}, false);
  fs::create_directories(run + "/checkpoints/step_200.tmp");  // an interrupted save
  fs::create_directories(run + "/checkpoints/step_300");      // incomplete: no state.json
  EXPECT_EQ(latest_checkpoint(run), checkpoint_dir(run, 100));
  std::ofstream(run + "/checkpoints/latest") << "step_20\n";
  EXPECT_EQ(latest_checkpoint(run), checkpoint_dir(run, 20));
}

TEST(Checkpoint, ChecksumIsBlockedFnv1a) {
  auto fnv = [](const unsigned char* p, size_t n, uint64_t h = 0xcbf29ce484222325ULL) {
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
  };
  auto le = [](uint64_t d) {
    std::array<unsigned char, 8> b;
    for (int k = 0; k < 8; ++k) b[k] = static_cast<unsigned char>(d >> (8 * k));
    return b;
  };
  EXPECT_EQ(fnv(reinterpret_cast<const unsigned char*>("a"), 1), 0xaf63dc4c8601ec8cULL);  // FNV-1a 64 test vector
  EXPECT_EQ(checkpoint_checksum("", 0), 0xcbf29ce484222325ULL);  // no blocks: the offset basis
  EXPECT_EQ(checkpoint_checksum("a", 1), fnv(le(0xaf63dc4c8601ec8cULL).data(), 8));
  // 2.5 MiB: three blocks hashed separately, then their digests.
  std::vector<unsigned char> buf((5u << 20) / 2);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>(i * 2654435761u >> 13);
  const size_t B = 1u << 20;
  uint64_t expect = 0xcbf29ce484222325ULL;
  for (size_t b = 0; b < 3; ++b) {
    auto d = le(fnv(buf.data() + b * B, std::min(B, buf.size() - b * B)));
    expect = fnv(d.data(), 8, expect);
  }
  EXPECT_EQ(checkpoint_checksum(buf.data(), buf.size()), expect);
  buf[B + 17] ^= 1;
  EXPECT_NE(checkpoint_checksum(buf.data(), buf.size()), expect);
}

// ---- conversion ----------------------------------------------------------------------------

TEST(Convert, HfCheckpointHfIsBitExact) {
  for (Arch arch : {Arch::Llama, Arch::InternLM2}) {
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      const ModelConfig c = small_config(arch);
      const std::string root = temp_dir("conv");
      save_hf(root + "/hf1", c, random_store(c, 120), dt);
      convert_from_hf(root + "/hf1", root + "/ckpt/step_0");
      EXPECT_EQ(load_checkpoint(root + "/ckpt/step_0", {}, false).step, 0);
      EXPECT_EQ(checkpoint_groups(root + "/ckpt/step_0"), std::vector<std::string>{"params"});
      convert_to_hf(root + "/ckpt/step_0", root + "/hf2", dt, std::nullopt);
      auto a = hf_bytes(root + "/hf1"), b = hf_bytes(root + "/hf2");
      EXPECT_EQ(a.size(), b.size());
      for (auto& [n, bytes] : a) EXPECT_TRUE(b.count(n) && b[n] == bytes) << arch_name(arch) << " " << dtype_name(dt) << " " << n;
      EXPECT_EQ(nlohmann::json::parse(ievo::test::read_file(root + "/hf1/config.json")),
                nlohmann::json::parse(ievo::test::read_file(root + "/hf2/config.json")));
      // Another layout on the way out: the same as saving that layout directly.
      const Arch other = arch == Arch::Llama ? Arch::InternLM2 : Arch::Llama;
      convert_to_hf(root + "/ckpt/step_0", root + "/hf3", dt, other);
      ModelConfig co = c;
      co.arch = other;
      ParamStore ps(param_specs(c), DType::F32, Device::CPU);
      load_hf_weights(root + "/hf1", c, ps);
      save_hf(root + "/hf4", co, ps, dt);
      EXPECT_EQ(hf_bytes(root + "/hf3"), hf_bytes(root + "/hf4"));
    }
  }
}
