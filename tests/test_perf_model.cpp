// The step-time model of `ievo plan` (parallel/perf_model.h): each term against the formula worked
// by hand for a small Llama, the ZeRO communication volumes, the pipeline bubble, recomputation,
// the calibration from `ievo bench --json` (a bench of the same config is reproduced exactly), and
// the plan's output.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "launch/config.h"
#include "launch/perf_plan.h"
#include "parallel/perf_model.h"
#include "util.h"

using namespace ievo;

namespace {

// d 256, L 4, 8 heads (hd 32) / 4 kv heads, F 768, V 1000, untied.
ModelConfig small_model() {
  ModelConfig m;
  m.vocab_size = 1000;
  m.hidden_size = 256;
  m.num_layers = 4;
  m.num_heads = 8;
  m.num_kv_heads = 4;
  m.ffn_hidden_size = 768;
  return m;
}

PerfInput input(int dp, int zero, int64_t global = 64) {
  PerfInput in;
  in.model = small_model();
  in.seq_len = 512;
  in.micro_batch = 4;
  in.global_batch = global;
  in.dp = dp;
  in.zero_stage = zero;
  in.compute = DType::BF16;
  return in;
}

TEST(PerfModel, ComputeTermsByHand) {
  const PerfInput in = input(1, 0);
  const PerfHardware hw = default_hardware(DType::BF16);
  const PerfEstimate e = estimate_step(in, hw);
  // N_matmul = L (d q + 2 d kv + q d + 3 d F) + V d, q = 256, kv = 128.
  const double d = 256, q = 256, kv = 128, F = 768, L = 4, V = 1000, T = 512;
  const double n_mm = L * (d * q + 2 * d * kv + q * d + 3 * d * F) + V * d;
  const double tokens = 64 * T;
  EXPECT_DOUBLE_EQ(e.model_flops, (6 * n_mm + 6 * L * d * T) * tokens);
  EXPECT_DOUBLE_EQ(e.executed_flops_gpu, e.model_flops);
  EXPECT_NEAR(e.gemm_s, 6 * n_mm * tokens / (989e12 * 0.6), 1e-15);
  EXPECT_NEAR(e.attn_s, 6 * L * d * T * tokens / (989e12 * 0.4), 1e-15);
  const double elem = (3 * (10 * d + 2 * q + 2 * kv + 3 * F) * 2 * L + 16 * V) * tokens;
  EXPECT_NEAR(e.elementwise_s, elem / (3.35e12 * 0.7), 1e-15);
  // AdamW: (24 + 3*2 + 2) bytes per parameter.
  const double psi = static_cast<double>(in.model.num_params());
  EXPECT_NEAR(e.optimizer_s, psi * 32 / (3.35e12 * 0.7), 1e-15);
  EXPECT_EQ(e.dp_bytes, 0);
  EXPECT_NEAR(e.step_s, e.gemm_s + e.attn_s + e.elementwise_s + e.optimizer_s, 1e-15);
  EXPECT_NEAR(e.tokens_per_s, tokens / e.step_s, 1e-6);
  EXPECT_NEAR(e.mfu, e.model_flops / (e.step_s * 989e12), 1e-12);
}

TEST(PerfModel, RecomputationAddsTheBlockForward) {
  PerfInput in = input(1, 0);
  const PerfEstimate plain = estimate_step(in, default_hardware(DType::BF16));
  in.recompute = "full";
  const PerfEstimate full = estimate_step(in, default_hardware(DType::BF16));
  const double head = 6.0 * 1000 * 256 * 64 * 512;  // the LM head is not recomputed
  EXPECT_NEAR(full.executed_flops_gpu - head, (plain.executed_flops_gpu - head) * 4.0 / 3.0, 1.0);
  EXPECT_DOUBLE_EQ(full.model_flops, plain.model_flops);  // MFU counts model FLOPs only
  in.recompute = "selective";
  EXPECT_DOUBLE_EQ(estimate_step(in, default_hardware(DType::BF16)).executed_flops_gpu,
                   plain.executed_flops_gpu);
}

TEST(PerfModel, ZeroCommunicationVolumes) {
  const double psi = static_cast<double>(small_model().num_params()), b = 2;
  const double f = 3.0 / 4.0;  // (N-1)/N with N = 4
  const double m = 64.0 / (4 * 4);  // micro-batches per step and replica
  const PerfHardware hw = default_hardware(DType::BF16);
  EXPECT_NEAR(estimate_step(input(4, 0), hw).dp_bytes, 2 * f * psi * b, 1e-6);
  EXPECT_NEAR(estimate_step(input(4, 1), hw).dp_bytes, f * psi * (b + b), 1e-6);
  EXPECT_NEAR(estimate_step(input(4, 2), hw).dp_bytes, m * f * psi * b + f * psi * b, 1e-6);
  EXPECT_NEAR(estimate_step(input(4, 3), hw).dp_bytes, m * f * psi * 3 * b, 1e-6);
  // Stage 0 is all exposed at 360 GB/s inside a node; beyond 8 GPUs the 45 GB/s link counts.
  const PerfEstimate e0 = estimate_step(input(4, 0), hw);
  EXPECT_NEAR(e0.dp_exposed_s, 2 * f * psi * b / 360e9, 1e-12);
  const PerfEstimate e16 = estimate_step(input(16, 0), hw);
  EXPECT_TRUE(e16.dp_inter_node);
  EXPECT_NEAR(e16.dp_s, 2 * (15.0 / 16) * psi * b / 45e9, 1e-12);
  // Optimizer shards over dp from stage 1.
  EXPECT_NEAR(estimate_step(input(4, 1), hw).optimizer_s * 4, e0.optimizer_s, 1e-12);
  // Overlap hides the stage-2 reduce-scatters behind the backward, not the final all-gather.
  PerfHardware ov = hw;
  ov.comm_overlap = 1.0;
  const PerfEstimate e2 = estimate_step(input(4, 2), ov);
  EXPECT_NEAR(e2.dp_exposed_s, f * psi * b / 360e9, 1e-12);
}

TEST(PerfModel, PipelineBubble) {
  PerfInput in = input(1, 0, 64);
  in.micro_batch = 2;  // m = 32
  in.pp = 4;
  in.virtual_stages = 2;
  const PerfEstimate e = estimate_step(in, default_hardware(DType::BF16));
  EXPECT_EQ(e.micro_batches, 32);
  EXPECT_DOUBLE_EQ(e.bubble, 3.0 / (32 * 2 + 3));
  const double pipelined = e.compute_s + e.tp_s + e.p2p_s;
  EXPECT_NEAR(e.bubble_s, pipelined / (1 - e.bubble) - pipelined, 1e-15);
  // 4 GPUs: each does a quarter of the FLOPs.
  EXPECT_NEAR(e.executed_flops_gpu * 4, e.model_flops, 1.0);
}

TEST(PerfModel, BenchCalibrationReproducesTheBench) {
  const std::string dir = test::temp_dir("perf_model");
  const std::string cfg_yaml =
      "run: {device: cuda}\n"
      "model: {arch: llama, vocab_size: 1000, hidden_size: 256, num_layers: 4, num_heads: 8,\n"
      "        num_kv_heads: 4, ffn_hidden_size: 768, max_position_embeddings: 512}\n"
      "data: {synthetic: true, seq_len: 512}\n"
      "train: {steps: 10, global_batch_size: 64, micro_batch_size: 4, precision: bf16}\n";
  const Config cfg = load_config_string(cfg_yaml, "perf");
  // A bench of this config on one GPU: 40 ms forward + 80 ms backward, 5 ms optimizer.
  const std::string bench = dir + "/bench.json";
  std::ofstream(bench) << nlohmann::json{{"seq_len", 512},
                                         {"micro_batch", 4},
                                         {"global_batch", 64},
                                         {"checkpointing", "none"},
                                         {"phases_s",
                                          {{"data", 0.001},
                                           {"forward", 0.04},
                                           {"backward", 0.08},
                                           {"reduce", 0.0},
                                           {"optimizer", 0.005}}}}
                              .dump();
  PerfOptions o;
  o.bench_json = bench;
  PerfInput in = perf_input(cfg, 1, o);
  PerfHardware hw = perf_hardware(in, o);
  PerfEstimate e = estimate_step(in, hw);
  EXPECT_NEAR(e.compute_s, 0.12, 1e-12);
  EXPECT_NEAR(e.optimizer_s, 0.005, 1e-12);
  EXPECT_NEAR(e.step_s, 0.125, 1e-12);
  // The same rate on 4 GPUs with ZeRO-1: a quarter of the compute, a quarter of the optimizer.
  Config c4 = cfg;
  c4.parallel.zero = 1;
  in = perf_input(c4, 4, o);
  e = estimate_step(in, perf_hardware(in, o));
  EXPECT_NEAR(e.compute_s, 0.03, 1e-12);
  EXPECT_NEAR(e.optimizer_s, 0.005 / 4, 1e-12);
  // A broken file is an error naming the option.
  std::ofstream(dir + "/bad.json") << "{\"seq_len\": 512}";
  o.bench_json = dir + "/bad.json";
  EXPECT_THROW(perf_hardware(in, o), Error);
}

TEST(PerfModel, PlanPrintsTheEstimate) {
  std::string out;
  ASSERT_EQ(test::run_command("cd " + test::source_dir() + " && " + test::ievo_binary() +
                                  " plan configs/tinyllama-1.1b.yaml --dp 8 --set parallel.zero=1"
                                  " --set train.global_batch_size=64 --gemm-eff 0.5",
                              &out),
            0)
      << out;
  EXPECT_NE(out.find("step time (estimate): H100 SXM (assumed), dp 8 x tp 1 x pp 1, ZeRO-1"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("989.0 TFLOP/s peak x 0.50"), std::string::npos) << out;
  EXPECT_NE(out.find("dp collectives"), std::string::npos) << out;
  EXPECT_NE(out.find("intra-node 360 GB/s"), std::string::npos) << out;
}

}  // namespace
