// Generation: the KV-cache forward equals the full forward (logits and greedy argmax at every
// step), greedy decoding is deterministic, seeded sampling reproducible, the sampling rules
// (temperature, top-k, top-p) give the stated distributions, and `ievo generate` runs on a
// byte-level checkpoint.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "launch/checkpoint.h"
#include "models/generate.h"
#include "util.h"

using namespace ievo;

namespace {

ModelConfig model_config(int64_t vocab = 64) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 48;
  c.max_position_embeddings = 64;
  c.init_std = 0.3;  // spread-out logits: no near-ties for the argmax
  return c;
}

// Logits [n, V] of one whole sequence.
Tensor full_logits(Llama& m, const ParamStore& p, const std::vector<int32_t>& seq) {
  std::vector<int32_t> rows = seq;
  rows.push_back(0);  // make_batch wants T + 1 tokens; the extra one is only a target
  return m.logits(p, make_batch(rows, 1, static_cast<int64_t>(seq.size())));
}

int32_t argmax_row(const Tensor& logits, int64_t row) {
  const std::vector<double> r = logits.slice(0, row, row + 1).to_double_vector();
  return static_cast<int32_t>(std::max_element(r.begin(), r.end()) - r.begin());
}

}  // namespace

TEST(Generate, KvCacheGreedyEqualsFullForwardArgmax) {
  for (DType dt : {DType::F64, DType::F32}) {
    const ModelConfig c = model_config();
    ParamStore p(param_specs(c), dt, Device::CPU);
    init_params(c, p, 5);
    Llama m(c);
    const std::vector<int32_t> prompt = {3, 17, 42, 8, 8, 1};
    SamplingOptions o;
    o.temperature = 0;
    o.max_new_tokens = 24;
    const std::vector<int32_t> gen = generate(m, p, prompt, o);
    ASSERT_EQ(gen.size(), 24u);
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), gen.begin(), gen.end() - 1);
    const Tensor full = full_logits(m, p, seq);
    const int64_t P = static_cast<int64_t>(prompt.size());
    for (size_t i = 0; i < gen.size(); ++i)
      EXPECT_EQ(argmax_row(full, P - 1 + static_cast<int64_t>(i)), gen[i]) << "step " << i;
    EXPECT_GT(std::set<int32_t>(gen.begin(), gen.end()).size(), 3u);  // not a degenerate repeat

    // The cached logits themselves, prefill and one token at a time, against the full forward.
    KvCache cache = m.make_kv_cache(static_cast<int64_t>(seq.size()), dt, Device::CPU);
    const Tensor pre = m.forward_step(p, prompt, cache);
    const double tol = dt == DType::F64 ? 1e-12 : 1e-5;
    EXPECT_LT(test::rel_l2(pre, full.slice(0, 0, P).clone()), tol);
    for (int64_t t = P; t < static_cast<int64_t>(seq.size()); ++t) {
      const Tensor step = m.forward_step(p, {seq[t]}, cache);
      EXPECT_LT(test::rel_l2(step, full.slice(0, t, t + 1).clone()), tol) << "position " << t;
    }
    EXPECT_EQ(cache.length, static_cast<int64_t>(seq.size()));
    EXPECT_THROW(m.forward_step(p, {1}, cache), Error);  // the cache is full
  }
}

TEST(Generate, GreedyDeterministicSeededSamplingReproducible) {
  const ModelConfig c = model_config();
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  init_params(c, p, 9);
  Llama m(c);
  const std::vector<int32_t> prompt = {1, 2, 3};
  SamplingOptions o;
  o.max_new_tokens = 30;
  o.temperature = 0;
  o.seed = 1;
  const auto g1 = generate(m, p, prompt, o);
  o.seed = 2;  // the seed does not matter for greedy decoding
  EXPECT_EQ(generate(m, p, prompt, o), g1);

  o.temperature = 1.0;
  o.top_k = 20;
  o.top_p = 0.95;
  o.seed = 7;
  const auto s1 = generate(m, p, prompt, o), s2 = generate(m, p, prompt, o);
  EXPECT_EQ(s1, s2);
  o.seed = 8;
  EXPECT_NE(generate(m, p, prompt, o), s1);
  EXPECT_NE(s1, g1);

  // A stop token ends generation (and is included); the position limit caps it.
  o.temperature = 0;
  o.stop_token = g1[4];
  const auto stopped = generate(m, p, prompt, o);
  const size_t first = std::find(g1.begin(), g1.end(), g1[4]) - g1.begin();
  EXPECT_EQ(stopped, std::vector<int32_t>(g1.begin(), g1.begin() + first + 1));
  o.stop_token = -1;
  o.max_new_tokens = 1000;
  EXPECT_EQ(generate(m, p, prompt, o).size(), 64u - 3u);  // max_position_embeddings 64
}

TEST(Generate, SamplingDistributions) {
  // p = softmax(log [1, 2, 3, 0.5]) / Z: token 2 most likely.
  const std::vector<double> z = {std::log(1.0), std::log(2.0), std::log(3.0), std::log(0.5)};
  auto freq = [&](SamplingOptions o) {
    std::mt19937_64 rng(o.seed);
    std::vector<double> f(4, 0);
    const int n = 60000;
    for (int i = 0; i < n; ++i) f[sample_token(z, o, rng)] += 1.0 / n;
    return f;
  };
  SamplingOptions o;
  o.seed = 3;
  auto expect_freq = [&](const std::vector<double>& got, const std::vector<double>& want) {
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 0.01) << "token " << i;
  };
  expect_freq(freq(o), {1 / 6.5, 2 / 6.5, 3 / 6.5, 0.5 / 6.5});
  o.top_k = 2;  // tokens 2 and 1
  expect_freq(freq(o), {0, 0.4, 0.6, 0});
  o.top_k = 0;
  o.top_p = 0.7;  // 3/6.5 = 0.46 < 0.7 <= 5/6.5 = 0.77: tokens 2 and 1
  expect_freq(freq(o), {0, 0.4, 0.6, 0});
  o.top_p = 0.4;  // the top token alone already has 0.46
  expect_freq(freq(o), {0, 0, 1, 0});
  o.top_p = 1;
  o.temperature = 0.5;  // p ~ w^2: 1, 4, 9, 0.25
  expect_freq(freq(o), {1 / 14.25, 4 / 14.25, 9 / 14.25, 0.25 / 14.25});
  o.temperature = 0;
  std::mt19937_64 rng(1);
  EXPECT_EQ(sample_token(z, o, rng), 2);
}

TEST(Generate, CommandLineOnByteCheckpoint) {
  const std::string dir = test::temp_dir("generate");
  ModelConfig c = model_config(256);
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  init_params(c, p, 1);
  CheckpointState st;
  st.step = 1;
  const std::string ckpt = dir + "/run/checkpoints/step_1";
  save_checkpoint(ckpt, c, st, {{"params", &p}});
  std::string out, out2;
  const std::string cmd = "(" + test::ievo_binary() + " generate " + dir +
                          "/run --prompt 'The GNU' --max-new-tokens 12 --temperature 0 2>/dev/null)";
  ASSERT_EQ(test::run_command(cmd, &out), 0) << out;
  EXPECT_EQ(out.rfind("The GNU", 0), 0u) << out;
  EXPECT_EQ(out.size(), 7u + 12u + 1u) << out;  // prompt, 12 bytes, newline
  ASSERT_EQ(test::run_command(cmd, &out2), 0);
  EXPECT_EQ(out, out2);
  // The greedy bytes are those of the library call.
  Llama m(c);
  SamplingOptions o;
  o.temperature = 0;
  o.max_new_tokens = 12;
  const auto gen = generate(m, p, {'T', 'h', 'e', ' ', 'G', 'N', 'U'}, o);
  EXPECT_EQ(out.substr(7, 12), std::string(gen.begin(), gen.end()));
  ASSERT_NE(test::run_command(test::ievo_binary() + " generate " + dir + "/nothing --prompt x", &out), 0);
  EXPECT_NE(out.find("not a checkpoint directory"), std::string::npos) << out;
}
