// The step-time model of `ievo plan` (parallel/perf_model.h): each term against the formula worked
// by hand for a small Llama, the ZeRO communication volumes, the pipeline bubble, recomputation,
// the calibration from `ievo bench --json` (a bench of the same config is reproduced exactly), the
// kernel throughputs of bench_gpu_kernels (--kernels-json), and the plan's output.
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

// The windows the collectives hide in (ievo's CUDA overlap): stages 0-1 only the last
// micro-batch's backward, stage 3 the whole compute; what does not fit stays exposed.
TEST(PerfModel, OverlapWindows) {
  const double psi = static_cast<double>(small_model().num_params()), b = 2, f = 3.0 / 4.0, m = 4;
  PerfHardware hw = default_hardware(DType::BF16);
  hw.measured_flops_per_s = 1e14;  // compute 1.6 ms per GPU, the collectives about 11 ms
  hw.comm_overlap = 1.0;
  hw.intra_bw = 1e9;  // slow links, so the windows are the limit
  const PerfEstimate e0 = estimate_step(input(4, 0), hw);
  const double bwd_last = e0.compute_s * 2 / 3 / m;
  EXPECT_NEAR(e0.dp_exposed_s, 2 * f * psi * b / 1e9 - bwd_last, 1e-12);
  const PerfEstimate e1 = estimate_step(input(4, 1), hw);
  EXPECT_NEAR(e1.dp_exposed_s, f * psi * b / 1e9 + (f * psi * b / 1e9 - bwd_last), 1e-12);
  const PerfEstimate e3 = estimate_step(input(4, 3), hw);
  EXPECT_NEAR(e3.dp_exposed_s, m * f * psi * 3 * b / 1e9 - e3.compute_s, 1e-12);
  // Fast links: stages 0 and 3 hide completely; stage 1 still waits for its weight all-gather.
  hw.intra_bw = 1e15;
  EXPECT_EQ(estimate_step(input(4, 0), hw).dp_exposed_s, 0.0);
  EXPECT_EQ(estimate_step(input(4, 3), hw).dp_exposed_s, 0.0);
  EXPECT_NEAR(estimate_step(input(4, 1), hw).dp_exposed_s, f * psi * b / 1e15, 1e-20);
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
  // A bench of the same shape with 2 of the 4 layers (model_shape, params) gives the same rate
  // when its time is the part of the FLOPs those layers execute.
  {
    Config c2 = cfg;
    c2.model.model.num_layers = 2;
    PerfInput i2 = perf_input(c2, 1, PerfOptions{});
    i2.global_batch = 64;
    const PerfEstimate e2 = estimate_step(i2, default_hardware(DType::BF16));
    const double rate = estimate_step(perf_input(cfg, 1, o), perf_hardware(perf_input(cfg, 1, o), o)).executed_flops_gpu / 0.12;
    const double fb2 = e2.executed_flops_gpu / rate;
    std::ofstream(dir + "/shallow.json")
        << nlohmann::json{{"seq_len", 512}, {"micro_batch", 4}, {"global_batch", 64}, {"checkpointing", "none"},
                          {"params", c2.model.model.num_params()},
                          {"model_shape", {{"hidden_size", 256}, {"num_layers", 2}, {"num_heads", 8},
                                           {"num_kv_heads", 4}, {"ffn_hidden_size", 768}, {"vocab_size", 1000}}},
                          {"phases_s", {{"forward", fb2 / 3}, {"backward", 2 * fb2 / 3}, {"optimizer", 0.001}}}}
                               .dump();
    PerfOptions os;
    os.bench_json = dir + "/shallow.json";
    const PerfInput is = perf_input(cfg, 1, os);
    const PerfEstimate es = estimate_step(is, perf_hardware(is, os));
    EXPECT_NEAR(es.compute_s, 0.12, 1e-9);
    // The optimizer scales with the parameters: the bench's 0.001 s for its own count.
    EXPECT_NEAR(es.optimizer_s, 0.001 * cfg.model.model.num_params() / c2.model.model.num_params(), 1e-12);
    // Another width is not the same shape: an error naming the key.
    std::ofstream(dir + "/wide.json") << nlohmann::json{{"seq_len", 512}, {"micro_batch", 4}, {"global_batch", 64},
                                                       {"model_shape", {{"hidden_size", 512}, {"num_layers", 2}}},
                                                       {"phases_s", {{"forward", 1}, {"backward", 1}, {"optimizer", 1}}}}
                                                        .dump();
    os.bench_json = dir + "/wide.json";
    try {
      perf_hardware(is, os);
      ADD_FAILURE() << "a bench of another width calibrated";
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find("model_shape.hidden_size 512"), std::string::npos) << err.what();
    }
  }
  // A broken file is an error naming the option.
  std::ofstream(dir + "/bad.json") << "{\"seq_len\": 512}";
  o.bench_json = dir + "/bad.json";
  EXPECT_THROW(perf_hardware(in, o), Error);
}

// Google Benchmark JSON as bench/bench_gpu_kernels writes it (--benchmark_out_format=json).
nlohmann::json kernel_bench(bool cudnn_ok) {
  auto run = [](const std::string& name, const char* key, double v) {
    return nlohmann::json{{"name", name + "/manual_time"}, {"run_type", "iteration"}, {"real_time", 1.0},
                          {"time_unit", "ms"}, {key, v}};
  };
  nlohmann::json b = nlohmann::json::array();
  b.push_back(run("BM_matmul/qkv_proj", "TFLOP/s", 600));
  b.push_back(run("BM_matmul/mlp_up", "TFLOP/s", 700));
  b.push_back(run("BM_matmul/mlp_up", "TFLOP/s", 720));  // a repetition: averaged (710)
  b.push_back(run("BM_matmul/lm_head_chunk", "TFLOP/s", 650));
  b.push_back(run("BM_matmul/square8192", "TFLOP/s", 900));  // not a model shape: unused
  b.push_back(run("BM_attention/flash_fwd", "TFLOP/s", 170));
  b.push_back(run("BM_attention/flash_bwd", "TFLOP/s", 130));
  b.push_back(run("BM_attention/cudnn_fwd", "TFLOP/s", 300));
  b.push_back(run("BM_attention/cudnn_bwd", "TFLOP/s", 250));
  if (!cudnn_ok)
    for (auto& x : b)
      if (x["name"].get<std::string>().find("cudnn") != std::string::npos) {
        x.erase("TFLOP/s");
        x["error_occurred"] = true;
      }
  b.push_back(run("BM_attention/hd128_cudnn_fwd", "TFLOP/s", 480));
  b.push_back(run("BM_attention/hd128_cudnn_bwd", "TFLOP/s", 400));
  b.push_back(run("BM_rmsnorm/fwd", "GB/s", 2000));
  b.push_back(run("BM_rmsnorm/bwd", "GB/s", 2500));
  b.push_back(run("BM_swiglu", "GB/s", 2500));
  b.push_back(run("BM_cross_entropy", "GB/s", 2000));
  nlohmann::json agg = run("BM_swiglu", "GB/s", 1.0);  // an aggregate row: ignored
  agg["run_type"] = "aggregate";
  b.push_back(agg);
  return {{"context", {{"num_cpus", 16}}}, {"benchmarks", b}};
}

// --kernels-json: the measured rates replace peak x efficiency, term by term, by hand.
TEST(PerfModel, MeasuredKernelThroughputs) {
  PerfInput in = input(1, 0);
  in.model.num_heads = 4;  // hd 64: the TinyLlama-shaped attention rows
  in.model.num_kv_heads = 2;
  for (bool cudnn_ok : {true, false}) {
    SCOPED_TRACE(cudnn_ok ? "cuDNN ran" : "cuDNN failed");
    PerfHardware hw = default_hardware(DType::BF16);
    apply_kernel_bench(kernel_bench(cudnn_ok), in, hw);
    const double d = 256, q = 256, kv = 128, F = 768, L = 4, V = 1000, T = 512, tokens = 64 * T;
    const double proj = L * (2 * d * q + 2 * d * kv), mlp = L * 3 * d * F, head = V * d;
    const double rate = (proj + mlp + head) / (proj / 600e12 + mlp / 710e12 + head / 650e12);
    EXPECT_NEAR(hw.kernel_gemm_flops / rate, 1.0, 1e-12);
    EXPECT_EQ(hw.kernel_attn_fwd_flops, cudnn_ok ? 300e12 : 170e12);
    EXPECT_EQ(hw.kernel_attn_bwd_flops, cudnn_ok ? 250e12 : 130e12);
    EXPECT_NEAR(hw.kernel_mem_bw, 4.0 / (2.0 / 2000e9 + 2.0 / 2500e9), 1.0);
    for (const char* rc : {"none", "selective", "full"}) {
      in.recompute = rc;
      const PerfEstimate e = estimate_step(in, hw);
      const bool full = in.recompute == "full";
      const double mm = 6 * (proj + mlp) * tokens * (full ? 4.0 / 3 : 1.0) + 6 * head * tokens;
      EXPECT_NEAR(e.gemm_s, mm / rate, 1e-15) << rc;
      const double fwd = 2 * L * d * T * tokens;  // a third of 6 L d T per token
      EXPECT_NEAR(e.attn_s, fwd * (full ? 2 : 1) / hw.kernel_attn_fwd_flops + 2.5 * fwd / hw.kernel_attn_bwd_flops,
                  1e-15) << rc;
      const double pass = 10 * d + 2 * q + 2 * kv + 3 * F;
      const double per = (full ? 4 : 3) * pass + (in.recompute == "selective" ? 4 * d + 3 * F : 0);
      EXPECT_NEAR(e.elementwise_s, (per * 2 * L + 16 * V) * tokens / hw.kernel_mem_bw, 1e-15) << rc;
      const double psi = static_cast<double>(in.model.num_params());
      EXPECT_NEAR(e.optimizer_s, psi * 32 / hw.kernel_mem_bw, 1e-15) << rc;
      EXPECT_NEAR(e.step_s, e.gemm_s + e.attn_s + e.elementwise_s + e.optimizer_s, 1e-15) << rc;
    }
    in.recompute = "none";
  }
  // Head dim 128: the hd128 rows.
  PerfInput in128 = input(1, 0);
  in128.model.num_heads = 2;
  in128.model.num_kv_heads = 1;
  PerfHardware hw = default_hardware(DType::BF16);
  apply_kernel_bench(kernel_bench(true), in128, hw);
  EXPECT_EQ(hw.kernel_attn_fwd_flops, 480e12);
  // Errors name what is missing; fp32 training is refused (the kernels run in bf16).
  nlohmann::json no_gemm = kernel_bench(true);
  no_gemm["benchmarks"].erase(0);
  try {
    apply_kernel_bench(no_gemm, in, hw);
    ADD_FAILURE() << "no error without the QKV GEMM";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no TFLOP/s of BM_matmul/qkv_proj"), std::string::npos) << e.what();
  }
  in.compute = DType::F32;
  EXPECT_THROW(apply_kernel_bench(kernel_bench(true), in, hw), Error);
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
  // --json: the same estimate as one object.
  {
    const std::string jd = test::temp_dir("perf_plan_json");
    ASSERT_EQ(test::run_command("cd " + test::source_dir() + " && " + test::ievo_binary() +
                                    " plan configs/tinyllama-1.1b.yaml --dp 8 --set parallel.zero=1"
                                    " --set train.global_batch_size=64 --json " + jd + "/p.json",
                                &out),
              0)
        << out;
    std::ifstream f(jd + "/p.json");
    const auto j = nlohmann::json::parse(f);
    EXPECT_EQ(j.at("gpus").get<int>(), 8);
    EXPECT_EQ(j.at("zero").get<int>(), 1);
    const double step = j.at("step_s").get<double>();
    EXPECT_NEAR(j.at("tokens_per_s").get<double>(), 64 * 2048 / step, 1e-6 * 64 * 2048 / step);
    EXPECT_NEAR(j.at("tokens_per_s_per_gpu").get<double>() * 8, j.at("tokens_per_s").get<double>(), 1e-6);
    char want[64];
    std::snprintf(want, sizeof want, "= %.0f tokens/s", j.at("tokens_per_s").get<double>());
    EXPECT_NE(out.find(want), std::string::npos) << want << "\n" << out;
  }
  // --kernels-json: the measured rates are used and said so.
  const std::string dir = test::temp_dir("perf_kernels");
  std::ofstream(dir + "/k.json") << kernel_bench(true).dump();
  ASSERT_EQ(test::run_command("cd " + test::source_dir() + " && " + test::ievo_binary() +
                                  " plan configs/tinyllama-1.1b.yaml --kernels-json " + dir + "/k.json",
                              &out),
            0)
      << out;
  for (const char* w : {"kernels measured (", "TFLOP/s measured\n", "300.0 / 250.0 TFLOP/s measured (fwd / bwd)",
                        "GB/s measured"})
    EXPECT_NE(out.find(w), std::string::npos) << w << "\n" << out;
  std::ofstream(dir + "/bad.json") << "{\"benchmarks\": []}";
  ASSERT_NE(test::run_command(test::ievo_binary() + " plan " + test::source_dir() +
                                  "/configs/tinyllama-1.1b.yaml --kernels-json " + dir + "/bad.json",
                              &out),
            0);
  EXPECT_NE(out.find("--kernels-json " + dir + "/bad.json: no TFLOP/s of BM_matmul/qkv_proj"), std::string::npos)
      << out;
}

}  // namespace
