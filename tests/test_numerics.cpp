// Numerical safety (launch/numerics.h) and the time limit, on a tiny Llama on the CPU:
//   * a NaN injected into one gradient (debug.nan_at_step) skips the update: "skipped": true and a
//     running "skipped_total" in metrics.jsonl, AdamW's step count is that of the applied updates,
//     the weights stay finite and training goes on;
//   * train.max_skips_in_a_row skipped steps in a row abort `ievo train` with the step and the
//     poisoned tensor named;
//   * the skip counts survive a checkpoint and resume (skipped_total continues, and so does a
//     run of skips in a row);
//   * train.max_time saves a checkpoint and exits 0 before the limit;
//   * durations and the config rules of these keys.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "launch/config.h"
#include "launch/duration.h"
#include "launch/trainer.h"
#include "runtime/error.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

std::string tiny_yaml(const std::string& run_dir, int64_t steps) {
  std::ostringstream os;
  os << "run: {dir: " << run_dir << ", seed: 7}\n"
     << "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4,\n"
     << "        num_kv_heads: 2, ffn_hidden_size: 64, max_position_embeddings: 64}\n"
     << "data: {paths: [" << test::source_dir() << "/configs/data/tiny], seq_len: 32}\n"
     << "train: {steps: " << steps << ", global_batch_size: 4, micro_batch_size: 2}\n"
     << "optim: {lr: 1.0e-3}\n"
     << "schedule: {kind: constant}\n";
  return os.str();
}

std::string write_config(const std::string& dir, int64_t steps) {
  const std::string path = dir + "/tiny.yaml";
  std::ofstream(path) << tiny_yaml(dir + "/run", steps);
  return path;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

const char* kPoisoned = "model.layers.1.mlp.down_proj.weight";

TEST(Numerics, NanStepsAreSkippedAndCounted) {
  const std::string dir = test::temp_dir("numerics_skip");
  // NaN in one gradient at steps 3 and 4: two skips in a row, below the limit of 3.
  Config cfg = load_config_string(tiny_yaml(dir + "/run", 8), "tiny",
                                  {"debug.nan_at_step=3", "debug.nan_steps=2",
                                   std::string("debug.nan_param=") + kPoisoned,
                                   "train.max_skips_in_a_row=3"});
  const std::vector<StepMetrics> ms = run_train(cfg);
  ASSERT_EQ(ms.size(), 8u);
  const std::vector<int64_t> total = {0, 0, 1, 2, 2, 2, 2, 2};
  for (size_t i = 0; i < ms.size(); ++i) {
    const bool poisoned = ms[i].step == 3 || ms[i].step == 4;
    EXPECT_EQ(ms[i].skipped, poisoned) << "step " << ms[i].step;
    EXPECT_EQ(ms[i].skipped_total, total[i]) << "step " << ms[i].step;
    EXPECT_TRUE(std::isfinite(ms[i].loss)) << "the loss is computed before the poisoning";
    EXPECT_EQ(std::isfinite(ms[i].grad_norm), !poisoned) << "step " << ms[i].step;
  }
  // The skipped updates left the weights alone: training continues from finite weights and the
  // loss keeps falling over the steps that were applied.
  EXPECT_LT(ms[7].loss, ms[0].loss - 0.05);

  // metrics.jsonl: the same flags; the NaN norm is written as null.
  const auto lines = read_jsonl(dir + "/run/metrics.jsonl");
  ASSERT_EQ(lines.size(), 8u);
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i]["step"].get<int64_t>(), static_cast<int64_t>(i + 1));
    EXPECT_EQ(lines[i]["skipped"].get<bool>(), ms[i].skipped);
    EXPECT_EQ(lines[i]["skipped_total"].get<int64_t>(), total[i]);
    EXPECT_EQ(lines[i]["grad_norm"].is_null(), ms[i].skipped);
  }
  // AdamW took 8 - 2 steps (its bias correction counts applied updates only).
  std::ifstream st(dir + "/run/checkpoints/step_8/state.json");
  ASSERT_TRUE(st.good());
  const auto state = nlohmann::json::parse(st);
  EXPECT_EQ(state["extra"]["optimizer_steps"].get<int64_t>(), 6);
  // The per-rank log names the poisoned tensor at each skip.
  const std::string log = test::read_file(dir + "/run/logs/rank_0.log");
  EXPECT_NE(log.find(std::string("step 3: non-finite loss or gradient (first non-finite gradient: ") +
                     kPoisoned),
            std::string::npos)
      << log;
}

TEST(Numerics, TooManySkipsInARowAbortWithTheTensorNamed) {
  const std::string dir = test::temp_dir("numerics_abort");
  const std::string cfg = write_config(dir, 10);
  std::string out;
  const int rc = test::run_command(test::ievo_binary() + " train " + cfg +
                                       " --set debug.nan_at_step=2 --set debug.nan_steps=100"
                                       " --set train.max_skips_in_a_row=3 --set debug.nan_param=" +
                                       kPoisoned,
                                   &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("step 4: 3 steps in a row skipped for a non-finite loss or gradient "
                     "(train.max_skips_in_a_row: 3); first non-finite gradient: " +
                     std::string(kPoisoned)),
            std::string::npos)
      << out;
  // Steps 1-3 were logged (2 and 3 skipped); step 4 aborted before its line; no checkpoint.
  const auto lines = read_jsonl(dir + "/run/metrics.jsonl");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_FALSE(lines[0]["skipped"].get<bool>());
  EXPECT_TRUE(lines[2]["skipped"].get<bool>());
  EXPECT_EQ(lines[2]["skipped_total"].get<int64_t>(), 2);
  EXPECT_FALSE(fs::exists(dir + "/run/checkpoints/step_4"));
  // The fatal error is in the rank's log too.
  const std::string log = test::read_file(dir + "/run/logs/rank_0.log");
  EXPECT_NE(log.find("Z ievo: error: step 4: 3 steps in a row"), std::string::npos) << log;
}

// The skip counts are checkpoint state: a run resumed after the skips continues skipped_total (it
// does not restart at 0), and a run of skips in a row continues across the resume.
TEST(Numerics, SkipCountsContinueAfterAResume) {
  const std::string dir = test::temp_dir("numerics_resume");
  const std::vector<std::string> poison = {"debug.nan_at_step=3", "debug.nan_steps=2",
                                           std::string("debug.nan_param=") + kPoisoned,
                                           "train.max_skips_in_a_row=3"};
  auto cfg_for = [&](const std::string& run, int64_t steps, std::vector<std::string> sets) {
    return load_config_string(tiny_yaml(dir + "/" + run, steps), "tiny", sets);
  };
  const std::vector<StepMetrics> ref = run_train(cfg_for("ref", 8, poison));
  ASSERT_EQ(ref.size(), 8u);
  // Steps 1-4 (3 and 4 skipped), saved at the end; then steps 5-8 resumed from step_4.
  ASSERT_EQ(run_train(cfg_for("split", 4, poison)).size(), 4u);
  const auto state = nlohmann::json::parse(test::read_file(dir + "/split/checkpoints/step_4/state.json"));
  EXPECT_EQ(state["extra"]["numerics"]["skipped_total"].get<int64_t>(), 2);
  EXPECT_EQ(state["extra"]["numerics"]["skipped_in_a_row"].get<int64_t>(), 2);
  const std::vector<StepMetrics> resumed = run_train(cfg_for("split", 8, poison));
  ASSERT_EQ(resumed.size(), 4u);
  for (size_t i = 0; i < resumed.size(); ++i) {
    const StepMetrics& r = ref[4 + i];
    EXPECT_EQ(resumed[i].step, r.step);
    EXPECT_EQ(resumed[i].skipped_total, 2) << "step " << r.step;
    EXPECT_EQ(resumed[i].skipped_total, r.skipped_total) << "step " << r.step;
    EXPECT_EQ(resumed[i].loss, r.loss) << "step " << r.step;  // CPU: bit-identical
  }
  const auto lines = read_jsonl(dir + "/split/metrics.jsonl");
  ASSERT_EQ(lines.size(), 8u);
  for (size_t i = 0; i < lines.size(); ++i)
    EXPECT_EQ(lines[i]["skipped_total"].get<int64_t>(), ref[i].skipped_total) << "line " << i;

  // Two skips in a row before the checkpoint, a third right after the resume: the abort of
  // train.max_skips_in_a_row: 3 comes at step 5, as without the interruption.
  ASSERT_EQ(run_train(cfg_for("row", 4, poison)).size(), 4u);
  std::vector<std::string> third = poison;
  third[0] = "debug.nan_at_step=5", third[1] = "debug.nan_steps=1";
  try {
    run_train(cfg_for("row", 8, third));
    ADD_FAILURE() << "no abort after 3 skips in a row across the resume";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 5: 3 steps in a row skipped"), std::string::npos)
        << e.what();
  }
}

TEST(Numerics, DefaultPoisonedTensorIsTheFirstParameter) {
  const std::string dir = test::temp_dir("numerics_first");
  std::string out;
  const int rc = test::run_command(test::ievo_binary() + " train " + write_config(dir, 5) +
                                       " --set debug.nan_at_step=1 --set train.max_skips_in_a_row=1",
                                   &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("step 1: 1 steps in a row skipped"), std::string::npos) << out;
  EXPECT_NE(out.find("first non-finite gradient: model.embed_tokens.weight"), std::string::npos)
      << out;
}

TEST(Numerics, MaxTimeSavesAndExitsBeforeTheLimit) {
  const std::string dir = test::temp_dir("numerics_time");
  std::string out;
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = test::run_command(
      test::ievo_binary() + " train " + write_config(dir, 100000) + " --set train.max_time=4s", &out);
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(rc, 0) << out;
  // The trainer's clock starts after the process and the config load (+ exit): 0.5 s of slack.
  EXPECT_LT(wall, 4.5) << out;
  EXPECT_NE(out.find("train.max_time (4s) is near"), std::string::npos) << out;
  // The checkpoint is of the last step trained, and every trained step has its metrics line.
  const auto lines = read_jsonl(dir + "/run/metrics.jsonl");
  ASSERT_GE(lines.size(), 1u);
  ASSERT_LT(lines.size(), 100000u);
  const std::string last = "step_" + std::to_string(lines.size());
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/" + last + "/state.json")) << last;
  EXPECT_EQ(test::read_file(dir + "/run/checkpoints/latest").substr(0, last.size()), last);
}

TEST(Numerics, ParseDuration) {
  EXPECT_EQ(parse_duration("4h"), 14400.0);
  EXPECT_EQ(parse_duration("30m"), 1800.0);
  EXPECT_EQ(parse_duration("1h30m"), 5400.0);
  EXPECT_EQ(parse_duration("2m10s"), 130.0);
  EXPECT_EQ(parse_duration("1d"), 86400.0);
  EXPECT_EQ(parse_duration("3600"), 3600.0);
  EXPECT_EQ(parse_duration("0.5"), 0.5);
  EXPECT_EQ(parse_duration("1.5h"), 5400.0);
  for (const char* bad : {"", "4x", "-1", "1h30", "h", "4 h", "4hh", "1e3"})
    EXPECT_FALSE(parse_duration(bad).has_value()) << bad;
  EXPECT_EQ(format_duration(3725.4), "1:02:05");
  EXPECT_EQ(format_duration(0), "0:00:00");
}

TEST(Numerics, ConfigRulesNameTheKey) {
  const std::string y = tiny_yaml("/tmp/unused", 4);
  auto error_of = [&](const std::string& set) {
    try {
      load_config_string(y, "tiny", {set});
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("train.max_time=4 hours").find("train.max_time: '4 hours' is not a positive "
                                                    "duration"),
            std::string::npos);
  EXPECT_NE(error_of("train.max_skips_in_a_row=0").find("train.max_skips_in_a_row: must be >= 1"),
            std::string::npos);
  EXPECT_NE(error_of("debug.nan_param=model.nope").find("debug.nan_param: 'model.nope' is not a "
                                                        "parameter of the model"),
            std::string::npos);
  EXPECT_NE(error_of("train.precision=fp16").find("train.precision: fp16 needs run.device: cuda"),
            std::string::npos);
  EXPECT_NE(error_of("fp16.backoff_factor=1.5").find("fp16.backoff_factor: must be in (0, 1)"),
            std::string::npos);
  EXPECT_NE(error_of("fp16.hysteresis=0").find("fp16.hysteresis: must be >= 1"), std::string::npos);
  EXPECT_EQ(error_of("train.max_time=1h30m"), "no error");
}

}  // namespace
