// `ievo train CONFIG --dry-run` (launch/dry_run.h): passes on every shipped config (those for CUDA
// too, on a machine or build without it: validated, noted, exit 0), writes nothing, and fails with
// the key named on a broken config or broken data.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "launch/config.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

// Runs from the source directory (the configs' data paths are relative to it).
int dry_run(const std::string& args, std::string* out) {
  return test::run_command("cd " + test::source_dir() + " && " + test::ievo_binary() +
                               " train " + args + " --dry-run",
                           out);
}

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

TEST(DryRun, PassesOnEveryShippedConfig) {
  const std::string tmp = test::temp_dir("dry_run");
  int n = 0;
  for (const auto& e : fs::directory_iterator(test::source_dir() + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    const std::string name = "configs/" + e.path().filename().string();
    const std::string run_dir = tmp + "/" + e.path().stem().string();
    // Datasets that an example script makes (configs/gcide.yaml: tools/gcide_example.sh) are not in
    // a fresh clone: validate such a config on the shipped tiny dataset instead.
    std::string sets = " --set run.dir=" + run_dir;
    const Config cfg = load_config(test::source_dir() + "/" + name);
    bool missing = false;
    for (const auto& prefix : cfg.data.paths) missing |= !fs::exists(test::source_dir() + "/" + prefix + ".idx");
    for (const auto& prefix : cfg.data.valid_paths) missing |= !fs::exists(test::source_dir() + "/" + prefix + ".idx");
    if (missing) sets += " --set data.paths=[configs/data/tiny] --set data.valid_paths=[configs/data/tiny]";
    std::string out;
    ASSERT_EQ(dry_run(name + sets, &out), 0) << name << "\n" << out;
    EXPECT_TRUE(has(out, "ievo train --dry-run: " + name)) << out;
    EXPECT_TRUE(has(out, "config: valid")) << out;
    EXPECT_TRUE(has(out, "layout: world 1 = pp 1 x dp 1 x tp 1\n  rank 0: dp 0, pp 0, tp 0")) << out;
    EXPECT_TRUE(has(out, "per rank")) << out;  // the memory plan
    EXPECT_TRUE(has(out, "step time")) << out;  // the step-time estimate
    EXPECT_TRUE(has(out, "dry run: OK")) << out;
    EXPECT_FALSE(fs::exists(run_dir)) << name << ": a dry run must not create run.dir";
#ifndef IEVO_CUDA
    // Configs for the GPU are validated without one, with a note.
    if (has(out, "precision bf16")) {
      EXPECT_TRUE(has(out, "NOTE this ievo was built without CUDA")) << out;
    }
#endif
  }
  EXPECT_GE(n, 4);
}

TEST(DryRun, DecodesSamplesOfTheData) {
  std::string out;
  ASSERT_EQ(dry_run("configs/tiny.yaml", &out), 0) << out;
  // tiny: 100 steps x 8 sequences; byte-level text, tokens < 128 < vocab 256.
  EXPECT_TRUE(has(out, "3 samples decoded (#0, #400, #799), largest token")) << out;
  EXPECT_TRUE(has(out, "< vocab 256")) << out;
  EXPECT_TRUE(has(out, "batch: 8 sequences x 128 tokens = micro 4 x accumulation 2 x dp 1")) << out;
}

TEST(DryRun, FailsNamingTheKey) {
  struct Case {
    std::string set, expect;
  };
  const std::vector<Case> cases = {
      {"train.stepz=3", "train.stepz: unknown key; did you mean 'train.steps'?"},
      {"train.micro_batch_size=3", "train.global_batch_size: 8 is not divisible by train.micro_batch_size"},
      {"data.paths=[configs/data/missing]", "data.paths: cannot open configs/data/missing.idx"},
      {"data.valid_paths=[configs/data/missing]", "data.valid_paths: cannot open configs/data/missing.idx"},
      // The byte-level data has tokens above 100: decoding a sample finds one.
      {"model.vocab_size=100", "data.paths: sample 0: token id 1"},
      {"model.init_from_hf=/nonexistent", "model.init_from_hf"},
      {"train.max_time=soon", "train.max_time: 'soon' is not a positive duration"},
  };
  for (const auto& c : cases) {
    std::string out;
    EXPECT_EQ(dry_run("configs/tiny.yaml --set " + c.set, &out), 1) << c.set << "\n" << out;
    EXPECT_TRUE(has(out, c.expect)) << c.set << "\n" << out;
    EXPECT_FALSE(has(out, "dry run: OK")) << out;
  }
  // A broken file: the error names the key and the line.
  const std::string dir = test::temp_dir("dry_run_broken");
  std::ofstream(dir + "/broken.yaml") << "run: {device: cpu}\nmodel: {arch: llama, vocab_size: 256, "
                                         "hidden_size: 64, num_layers: 2, num_heads: 4, ffn_hidden_size: 128}\n"
                                         "data: {synthetic: true, seq_len: 32}\n"
                                         "train: {steps: 10, global_batch_size: 4, micro_batch_size: 2,\n"
                                         "        precision: fp8}\n";
  std::string out;
  EXPECT_EQ(dry_run(dir + "/broken.yaml", &out), 1) << out;
  EXPECT_TRUE(has(out, "train.precision: invalid value 'fp8'")) << out;
  EXPECT_TRUE(has(out, "broken.yaml:5:20")) << out;
}

TEST(DryRun, HfInitChecksTheWeights) {
  std::string out;
  ASSERT_EQ(test::run_command("cd " + test::source_dir() + "/tests/fixtures && " +
                                  test::ievo_binary() + " train llama_gqa/train.yaml --dry-run",
                              &out),
            0)
      << out;
  EXPECT_TRUE(has(out, "weights: llama_gqa/hf (21 tensors)")) << out;
}

}  // namespace
