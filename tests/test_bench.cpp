// `ievo bench` (launch/bench.h) on the CPU: the JSON report, the phase times against the step
// time, activation checkpointing (none / selective / full) computing the same losses, the report
// under mpirun, and the --comm switch.
#include <gtest/gtest.h>

#include <cmath>

#include <nlohmann/json.hpp>

#include "util.h"

using namespace ievo;

namespace {

// Two micro-batches a step (accumulation: forward/backward marks twice per step), short rows.
nlohmann::json bench(const std::string& dir, const std::string& name, const std::string& extra) {
  const std::string json = dir + "/" + name + ".json";
  const std::string cmd = test::ievo_binary() + " bench " + test::source_dir() +
                          "/configs/tiny.yaml --steps 3 --warmup 1 --json " + json +
                          " --set data.seq_len=64 --set train.global_batch_size=4"
                          " --set train.micro_batch_size=2 " + extra;
  std::string out;
  EXPECT_EQ(test::run_command(cmd, &out), 0) << cmd << "\n" << out;
  EXPECT_NE(out.find("tokens/s"), std::string::npos) << out;
  return nlohmann::json::parse(test::read_file(json));
}

}  // namespace

TEST(Bench, ReportsStepsPhasesAndTokensPerSecond) {
  const std::string dir = test::temp_dir("bench");
  const auto j = bench(dir, "none", "");
  EXPECT_EQ(j["steps"], 3);
  EXPECT_EQ(j["warmup"], 1);
  EXPECT_EQ(j["seq_len"], 64);
  EXPECT_EQ(j["global_batch"], 4);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["checkpointing"], "none");
  const double step = j["step_time_s"], tps = j["tokens_per_s"];
  ASSERT_GT(step, 0);
  // tokens/s = tokens of the timed steps over their summed time = 4 * 64 / mean step time.
  EXPECT_NEAR(tps, 4.0 * 64.0 / step, 1e-9 * tps);
  // The phases cover the step from its first to its last mark; the step time adds only the loop
  // around them (host clock on the CPU), so they sum to at most the step and to most of it.
  double sum = 0;
  for (const char* p : {"data", "forward", "backward", "reduce", "optimizer"}) {
    ASSERT_TRUE(j["phases_s"].contains(p)) << p;
    const double t = j["phases_s"][p];
    EXPECT_GE(t, 0) << p;
    sum += t;
  }
  EXPECT_GT(j["phases_s"]["forward"].get<double>(), 0);
  EXPECT_GT(j["phases_s"]["backward"].get<double>(), j["phases_s"]["forward"].get<double>() * 0.5);
  EXPECT_LE(sum, step * 1.0001);
  EXPECT_GE(sum, step * 0.8);
  EXPECT_GT(j["peak_mem_bytes"].get<int64_t>(), 0);
  // The bench trains: the same synthetic data and seed give a finite, falling-or-not loss, and
  // no checkpoint is written (the temporary run directory is gone).
  EXPECT_TRUE(std::isfinite(j["last_loss"].get<double>()));
}

TEST(Bench, CheckpointingModesTrainTheSameLosses) {
  const std::string dir = test::temp_dir("bench_ckpt");
  const auto none = bench(dir, "none", "");
  for (const char* mode : {"selective", "full"}) {
    const auto j = bench(dir, mode, std::string("--set model.checkpointing=") + mode);
    EXPECT_EQ(j["checkpointing"], mode);
    // Same data, same weights, the same kernels recomputed: the losses agree to f32 rounding.
    EXPECT_NEAR(j["first_loss"].get<double>(), none["first_loss"].get<double>(), 1e-6) << mode;
    EXPECT_NEAR(j["last_loss"].get<double>(), none["last_loss"].get<double>(), 1e-5) << mode;
  }
}

TEST(Bench, RejectsBadStepCounts) {
  std::string out;
  const std::string cmd =
      test::ievo_binary() + " bench " + test::source_dir() + "/configs/tiny.yaml --steps 0";
  EXPECT_NE(test::run_command(cmd, &out), 0) << out;
}

// Under mpirun: the layout over all ranks, tokens/s of the whole job and per rank, one report
// (rank 0's) and one JSON file.
TEST(Bench, UnderMpirunReportsTheLayoutOnce) {
  const std::string dir = test::temp_dir("bench_mpi");
  const std::string json = dir + "/b.json";
  const std::string cmd = test::mpirun_ievo(2) + " bench " + test::source_dir() +
                          "/configs/tiny.yaml --steps 2 --warmup 1 --json " + json +
                          " --set data.seq_len=64 --set train.global_batch_size=4 --set train.micro_batch_size=2"
                          " --set parallel.zero=1";
  std::string out;
  ASSERT_EQ(test::run_command(cmd, &out), 0) << cmd << "\n" << out;
  size_t reports = 0;
  for (size_t p = out.find("ievo bench "); p != std::string::npos; p = out.find("ievo bench ", p + 1)) ++reports;
  EXPECT_EQ(reports, 1u) << out;
  EXPECT_NE(out.find("layout      2 ranks: dp 2 x tp 1 x pp 1, zero 1"), std::string::npos) << out;
  const auto j = nlohmann::json::parse(test::read_file(json));
  EXPECT_EQ(j["ranks"].get<int>(), 2);
  EXPECT_EQ(j["layout"].get<std::string>(), "dp 2 x tp 1 x pp 1, zero 1");
  EXPECT_DOUBLE_EQ(j["tokens_per_s_per_rank"].get<double>() * 2, j["tokens_per_s"].get<double>());
  EXPECT_EQ(j["global_batch"].get<int>(), 4);
  EXPECT_EQ(j["model_shape"]["num_layers"].get<int>(), 2);
}

// --comm takes no config; without --comm a config is required; both say so.
TEST(Bench, CommAndConfigAreExclusive) {
  std::string out;
  EXPECT_NE(test::run_command(test::ievo_binary() + " bench --comm --device cpu " + test::source_dir() +
                                  "/configs/tiny.yaml",
                              &out),
            0);
  EXPECT_NE(out.find("--comm takes no config"), std::string::npos) << out;
  EXPECT_NE(test::run_command(test::ievo_binary() + " bench", &out), 0);
  EXPECT_NE(out.find("a config file is required (or --comm)"), std::string::npos) << out;
  // One process: the sweep runs (a world of one; nothing crosses a link).
  ASSERT_EQ(test::run_command(test::ievo_binary() + " bench --comm --device cpu --comm-min-mib 1 --comm-max-mib 1", &out), 0)
      << out;
  EXPECT_NE(out.find("collectives: local over 1 ranks"), std::string::npos) << out;
  EXPECT_NE(out.find("the bus bandwidth is 0"), std::string::npos) << out;
}
