// Validation during training: val_loss / val_ppl lines in metrics.jsonl at the eval steps, the
// validation set never changes the training stream, packing through the trainer, config rules.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "launch/config.h"
#include "launch/trainer.h"
#include "util.h"

using namespace ievo;

namespace {

std::string yaml(const std::string& run_dir) {
  return "run: {dir: " + run_dir + ", seed: 3}\n"
         "model: {vocab_size: 256, hidden_size: 32, num_layers: 1, num_heads: 2, ffn_hidden_size: 64,"
         " max_position_embeddings: 64}\n"
         "data: {paths: [" + test::source_dir() + "/configs/data/tiny], seq_len: 32}\n"
         "train: {steps: 6, global_batch_size: 4, micro_batch_size: 2, log_every: 100}\n"
         "optim: {lr: 3.0e-3}\n";
}

std::vector<nlohmann::json> metrics(const std::string& run_dir) {
  std::ifstream f(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(Validation, LogsValLossWithoutTouchingTraining) {
  const std::string dir = test::temp_dir("validation");
  const std::string valid = "data.valid_paths=[" + test::source_dir() + "/configs/data/tiny]";
  const auto plain = run_train(load_config_string(yaml(dir + "/a"), "a.yaml"));
  const auto with_val = run_train(load_config_string(
      yaml(dir + "/b"), "b.yaml", {valid, "train.eval_every=2", "train.eval_batches=3"}));
  ASSERT_EQ(plain.size(), 6u);
  ASSERT_EQ(with_val.size(), 6u);
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(plain[i].loss, with_val[i].loss) << "step " << i + 1;

  std::vector<std::pair<int64_t, double>> val;
  for (const auto& j : metrics(dir + "/b"))
    if (j.contains("val_loss")) {
      val.emplace_back(j["step"].get<int64_t>(), j["val_loss"].get<double>());
      EXPECT_NEAR(j["val_ppl"].get<double>(), std::exp(j["val_loss"].get<double>()), 1e-9);
    }
  ASSERT_EQ(val.size(), 3u);
  EXPECT_EQ(val[0].first, 2);
  EXPECT_EQ(val[1].first, 4);
  EXPECT_EQ(val[2].first, 6);
  EXPECT_LT(val[2].second, val[0].second);  // lr 3e-3 on byte text: the loss falls within 6 steps
  EXPECT_GT(val[0].second, 2.0);
  EXPECT_LT(val[0].second, std::log(256.0) + 0.5);
  for (const auto& j : metrics(dir + "/a")) EXPECT_FALSE(j.contains("val_loss"));
}

TEST(Validation, PackingTrainsAndDiffersFromUnpacked) {
  const std::string dir = test::temp_dir("validation_pack");
  const auto plain = run_train(load_config_string(yaml(dir + "/a"), "a.yaml"));
  const auto packed = run_train(load_config_string(yaml(dir + "/b"), "b.yaml", {"data.packing=true"}));
  ASSERT_EQ(packed.size(), 6u);
  for (const auto& m : packed) EXPECT_TRUE(std::isfinite(m.loss));
  // Same tokens, different masks: the first step's loss differs but only a little (init ~ ln 256).
  EXPECT_NE(plain[0].loss, packed[0].loss);
  EXPECT_NEAR(plain[0].loss, packed[0].loss, 0.1);
}

TEST(Validation, ConfigRules) {
  const std::string base = yaml("/tmp/unused");
  auto error_of = [&](const std::vector<std::string>& sets) -> std::string {
    try {
      load_config_string(base, "x.yaml", sets);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of({"train.eval_every=5"}).find("data.valid_paths is empty"), std::string::npos);
  EXPECT_NE(error_of({"train.eval_batches=0"}).find("train.eval_batches"), std::string::npos);
  EXPECT_NE(error_of({"data.packing=true", "data.synthetic=true"}).find("data.packing"),
            std::string::npos);
  EXPECT_EQ(error_of({"data.packing=true", "data.valid_paths=[a]", "train.eval_every=5"}), "");
}
