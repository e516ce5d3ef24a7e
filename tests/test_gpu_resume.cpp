// Issue 6 on the GPU (label gpu; skipped without a GPU): kill -9 at random steps, then
// checkpoint.resume: auto, in deterministic mode (run.deterministic: true: cuDNN's deterministic
// attention backward, no GEMM autotuning, fixed-order reductions), through the real `ievo train`:
// the resumed run's metrics.jsonl (loss, grad_norm, lr, loss scale) is bit-identical to an
// uninterrupted run's, with one line per step, and so are the final weights and AdamW moments.
// bf16, and fp16 (whose dynamic loss scale is checkpoint state too). A second uninterrupted run
// first checks that the GPU run is deterministic at all (else the comparison would mean nothing).
// The model has head dim 64, so attention runs on the tensor-core kernels (cuDNN where usable).
#include <gtest/gtest.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "util.h"

using namespace ievo;

namespace {

constexpr int64_t kSteps = 12;

std::string write_config(const std::string& dir, const std::string& precision) {
  const std::string path = dir + "/gpu_resume.yaml";
  std::ofstream(path) << "run: {seed: 5, device: cuda, deterministic: true}\n"
                         "model: {arch: llama, vocab_size: 256, hidden_size: 256, num_layers: 2,\n"
                         "        num_heads: 4, num_kv_heads: 2, ffn_hidden_size: 512,\n"
                         "        max_position_embeddings: 128}\n"
                         "data: {paths: ["
                      << test::source_dir()
                      << "/configs/data/tiny], seq_len: 128}\n"
                         "train: {steps: "
                      << kSteps << ", global_batch_size: 8, micro_batch_size: 4, precision: " << precision
                      << "}\n"
                         "optim: {lr: 1.0e-3, min_lr: 1.0e-4}\n"
                         "schedule: {kind: cosine, warmup_steps: 2}\n"
                         "fp16: {growth_interval: 4}\n"  // the scale grows during the run
                         "checkpoint: {every: 3}\n";
  return path;
}

// `env ievo train CONFIG --set run.dir=RUN [--set ...]`; the exit status, 128 + N if killed by N.
int train(const std::string& config, const std::string& run, const std::string& env, std::string* out,
          const std::vector<std::string>& sets = {}) {
  std::string cmd = env + " " + test::ievo_binary() + " train " + config + " --set run.dir=" + run;
  for (const auto& s : sets) cmd += " --set " + s;
  test::run_command("{ (" + cmd + ") 2>&1; echo \"[exit $?]\"; }", out);
  const auto at = out->rfind("[exit ");
  return at == std::string::npos ? -1 : std::atoi(out->c_str() + at + 6);
}

std::vector<nlohmann::json> metrics(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::ifstream f(run + "/metrics.jsonl");
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// The fields that must continue exactly; step_time_s, tokens_per_s, ... are wall-clock.
void expect_same_curve(const std::string& run, const std::vector<nlohmann::json>& ref, const std::string& what) {
  const auto m = metrics(run);
  ASSERT_EQ(m.size(), ref.size()) << what << ": one metrics line per step";
  for (size_t i = 0; i < m.size(); ++i) {
    EXPECT_EQ(m[i]["step"], ref[i]["step"]) << what;
    for (const char* k : {"loss", "grad_norm", "lr", "loss_scale", "skipped_total"}) {
      EXPECT_EQ(m[i].contains(k), ref[i].contains(k)) << what << " step " << i + 1 << " " << k;
      if (m[i].contains(k)) {
        EXPECT_EQ(m[i][k], ref[i][k]) << what << " step " << i + 1 << " " << k;
      }
    }
  }
}

void expect_same_checkpoint(const std::string& a, const std::string& b, const std::string& what) {
  CheckpointReader ra(a), rb(b);
  ASSERT_EQ(ra.groups(), rb.groups()) << what;
  int compared = 0, differ = 0;
  for (const auto& g : ra.groups())
    for (const auto& n : ra.tensor_names(g)) {
      Tensor x = ra.read(g, n), y = rb.read(g, n);
      ASSERT_EQ(x.nbytes(), y.nbytes()) << what << " " << g << "/" << n;
      if (std::memcmp(x.raw(), y.raw(), x.nbytes()) != 0) {
        ++differ;
        ADD_FAILURE() << what << ": " << g << "/" << n << " differs";
      }
      ++compared;
    }
  EXPECT_GE(compared, 3 * 11) << what;
  EXPECT_EQ(differ, 0) << what;
}

class GpuResume : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuResume, KillAtRandomStepsThenAutoResumeIsBitIdentical) {
  IEVO_REQUIRE_GPU();
  const std::string precision = GetParam();
  const std::string root = test::temp_dir("gpu_resume_" + precision);
  const std::string config = write_config(root, precision);
  std::string out;
  ASSERT_EQ(train(config, root + "/ref", "", &out), 0) << out;
  ASSERT_EQ(train(config, root + "/ref2", "", &out), 0) << out;
  const auto ref = metrics(root + "/ref");
  ASSERT_EQ(static_cast<int64_t>(ref.size()), kSteps);
  for (const auto& m : ref)
    std::printf("[gpu] %s ref step %2d loss %.17g\n", precision.c_str(), m["step"].get<int>(),
                m["loss"].get<double>());
  // Determinism first: two uninterrupted runs agree bit for bit.
  expect_same_curve(root + "/ref2", ref, precision + " second uninterrupted run");
  expect_same_checkpoint(root + "/ref2/checkpoints/step_12", root + "/ref/checkpoints/step_12", "determinism");

  std::mt19937 rng(20261125);  // fixed: a failure reproduces
  std::uniform_int_distribution<int> any_step(1, kSteps - 1);
  std::vector<std::vector<int>> trials = {{any_step(rng)}, {any_step(rng)}, {any_step(rng)}};
  trials.push_back({4, 8});  // killed twice
  int t = 0;
  for (const auto& kills : trials) {
    const std::string run = root + "/kill" + std::to_string(t++);
    std::string what = precision + " " + run;
    for (int step : kills) {
      what += " kill@" + std::to_string(step);
      const int rc = train(config, run, "IEVO_TEST_KILL_AT_STEP=" + std::to_string(step), &out);
      ASSERT_EQ(rc, 128 + SIGKILL) << what << "\n" << out;
    }
    ASSERT_EQ(train(config, run, "", &out), 0) << what << "\n" << out;
    // The kill comes after the step's metrics, before its checkpoint: killed at step 3 or
    // earlier, there is no checkpoint yet and the run starts over.
    const bool resumes = *std::max_element(kills.begin(), kills.end()) > 3;
    EXPECT_EQ(out.find("resuming from") != std::string::npos, resumes) << what << "\n" << out;
    expect_same_curve(run, ref, what);
    expect_same_checkpoint(run + "/checkpoints/step_12", root + "/ref/checkpoints/step_12", what);
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, GpuResume, ::testing::Values("bf16", "fp16"),
                         [](const auto& i) { return i.param; });

}  // namespace
