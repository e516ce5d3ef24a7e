#include "launch/perf_plan.h"

#include <fstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "models/atomic_file.h"
#include "runtime/error.h"

namespace ievo {

std::shared_ptr<PerfOptions> add_perf_options(CLI::App& cmd) {
  auto o = std::make_shared<PerfOptions>();
  const char* g = "Step time";
  cmd.add_option("--peak-tflops", o->peak_tflops, "dense matmul peak per GPU (default: H100 SXM)")
      ->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--gemm-eff", o->gemm_eff, "achieved/peak for GEMMs (0.6)")->group(g)->check(CLI::Range(0.01, 1.0));
  cmd.add_option("--attn-eff", o->attn_eff, "achieved/peak for attention (0.4)")->group(g)->check(CLI::Range(0.01, 1.0));
  cmd.add_option("--mem-bw-gbs", o->mem_bw_gbs, "device memory GB/s (3350)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--mem-eff", o->mem_eff, "achieved/peak memory bandwidth (0.7)")->group(g)->check(CLI::Range(0.01, 1.0));
  cmd.add_option("--intra-bw-gbs", o->intra_bw_gbs, "collective GB/s per GPU in a node (360)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--inter-bw-gbs", o->inter_bw_gbs, "collective GB/s per GPU across nodes (45)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--gpus-per-node", o->gpus_per_node, "GPUs per node (8)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--comm-overlap", o->comm_overlap, "fraction of the compute hiding dp collectives (1 on CUDA, 0 on CPU)")->group(g)->check(CLI::Range(0.0, 1.0));
  cmd.add_option("--tp", o->tp, "tensor-parallel size (default: parallel.tensor)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--pp", o->pp, "pipeline-parallel size (default: parallel.pipeline)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--vpp", o->vpp, "virtual pipeline stages per rank (1)")->group(g)->check(CLI::PositiveNumber);
  cmd.add_option("--bench-json", o->bench_json, "calibrate from `ievo bench --json` of this model on one GPU")
      ->group(g)->check(CLI::ExistingFile);
  cmd.add_option("--json", o->json, "also write the step-time estimate as one JSON object to this file")->group(g);
  cmd.add_option("--kernels-json", o->kernels_json,
                 "kernel throughputs from bench_gpu_kernels --benchmark_out=FILE (JSON) instead of peak x efficiency")
      ->group(g)->check(CLI::ExistingFile);
  return o;
}

PerfInput perf_input(const Config& cfg, int dp, const PerfOptions& o) {
  PerfInput in;
  in.model = cfg.model.model;
  in.seq_len = cfg.data.seq_len;
  in.micro_batch = cfg.train.micro_batch_size;
  in.global_batch = cfg.train.global_batch_size;
  in.dp = dp;
  in.tp = o.tp > 0 ? o.tp : static_cast<int>(cfg.parallel.tensor);
  in.pp = o.pp > 0 ? o.pp : static_cast<int>(cfg.parallel.pipeline);
  in.virtual_stages = o.vpp;
  in.zero_stage = static_cast<int>(cfg.parallel.zero);
  const std::string& p = cfg.train.precision;
  in.compute = p == "bf16" ? DType::BF16 : p == "fp16" ? DType::F16 : DType::F32;
  in.recompute = cfg.model.checkpointing;
  in.cuda = cfg.run.device == "cuda";
  return in;
}

PerfHardware perf_hardware(const PerfInput& in, const PerfOptions& o) {
  PerfHardware hw = default_hardware(in.compute);
  if (o.peak_tflops > 0) {
    hw.peak_flops = o.peak_tflops * 1e12;
    hw.name = "given peak";
  }
  hw.gemm_efficiency = o.gemm_eff;
  hw.attn_efficiency = o.attn_eff;
  hw.mem_bw = o.mem_bw_gbs * 1e9;
  hw.mem_efficiency = o.mem_eff;
  hw.intra_bw = o.intra_bw_gbs * 1e9;
  hw.inter_bw = o.inter_bw_gbs * 1e9;
  hw.gpus_per_node = o.gpus_per_node;
  hw.comm_overlap = o.comm_overlap >= 0 ? o.comm_overlap : in.cuda ? 1.0 : 0.0;
  if (!o.kernels_json.empty()) {
    try {
      std::ifstream f(o.kernels_json);
      apply_kernel_bench(nlohmann::json::parse(f), in, hw);
    } catch (const std::exception& e) {
      IEVO_FAIL("--kernels-json ", o.kernels_json, ": ", e.what());
    }
    hw.name += ", kernels measured (" + o.kernels_json + ")";
  }
  if (!o.bench_json.empty()) {
    // ievo bench --json (launch/bench.h) of this model on one GPU: its measured forward + backward
    // time is the achieved rate for the FLOPs that run executed.
    nlohmann::json j;
    try {
      std::ifstream f(o.bench_json);
      j = nlohmann::json::parse(f);
      PerfInput b = in;
      b.dp = b.tp = b.pp = 1;
      // A bench of the same shape with fewer layers (a model too big for one GPU) calibrates too.
      if (j.contains("model_shape")) {
        const auto& ms = j.at("model_shape");
        const ModelConfig& m = in.model;
        const std::pair<const char*, int64_t> same[] = {
            {"hidden_size", m.hidden_size},         {"num_heads", m.num_heads}, {"num_kv_heads", m.num_kv_heads},
            {"ffn_hidden_size", m.ffn_hidden_size}, {"vocab_size", m.vocab_size}};
        for (const auto& [key, want] : same)
          IEVO_CHECK(ms.at(key).get<int64_t>() == want, "a bench of another model: model_shape.", key, " ",
                     ms.at(key).get<int64_t>(), ", the config's ", want);
        b.model.num_layers = ms.at("num_layers").get<int64_t>();
      }
      b.zero_stage = 0;
      b.seq_len = j.at("seq_len").get<int64_t>();
      b.micro_batch = j.at("micro_batch").get<int64_t>();
      b.global_batch = j.at("global_batch").get<int64_t>();
      b.recompute = j.value("checkpointing", in.recompute);
      const auto& ph = j.at("phases_s");
      const double fb = ph.at("forward").get<double>() + ph.at("backward").get<double>();
      IEVO_CHECK(fb > 0, "forward + backward time is not positive");
      PerfHardware plain = hw;
      const PerfEstimate eb = estimate_step(b, plain);
      hw.measured_flops_per_s = eb.executed_flops_gpu / fb;
      hw.measured_optimizer_s = ph.at("optimizer").get<double>();
      hw.measured_params_per_rank = j.contains("params") ? j.at("params").get<int64_t>() : in.model.num_params();
      hw.name += ", calibrated by " + o.bench_json;
    } catch (const std::exception& e) {
      IEVO_FAIL("--bench-json ", o.bench_json, ": ", e.what());
    }
  }
  return hw;
}

namespace {

// The mean of counter `key` over the benchmark runs named `prefix` or `prefix/...` (repetitions;
// aggregates and failed runs are left out); 0 when there is none.
double counter(const nlohmann::json& bench, const std::string& prefix, const char* key) {
  double sum = 0;
  int n = 0;
  for (const auto& b : bench.at("benchmarks")) {
    const std::string name = b.value("name", "");
    if (name != prefix && name.rfind(prefix + "/", 0) != 0) continue;
    if (b.value("run_type", "iteration") != "iteration" || b.value("error_occurred", false) ||
        !b.contains(key))
      continue;
    sum += b.at(key).get<double>();
    ++n;
  }
  return n > 0 ? sum / n : 0.0;
}

}  // namespace

void apply_kernel_bench(const nlohmann::json& bench, const PerfInput& in, PerfHardware& hw) {
  IEVO_CHECK(in.compute != DType::F32 && in.compute != DType::F64,
             "the kernels are timed in bf16; train.precision is fp32");
  const ModelConfig& m = in.model;
  const double d = static_cast<double>(m.hidden_size), L = static_cast<double>(m.num_layers);
  const double q = static_cast<double>(m.q_dim()), kv = static_cast<double>(m.kv_dim());
  const double F = static_cast<double>(m.ffn_hidden_size), V = static_cast<double>(m.vocab_size);
  // The model's matmul FLOPs by shape class, each at its measured rate (time = sum FLOPs / rate).
  const std::pair<double, const char*> classes[] = {{L * (2 * d * q + 2 * d * kv), "BM_matmul/qkv_proj"},
                                                    {L * 3 * d * F, "BM_matmul/mlp_up"},
                                                    {V * d, "BM_matmul/lm_head_chunk"}};
  double flops = 0, time = 0;
  for (const auto& [f, name] : classes) {
    const double r = counter(bench, name, "TFLOP/s") * 1e12;
    IEVO_CHECK(r > 0, "no TFLOP/s of ", name);
    flops += f;
    time += f / r;
  }
  hw.kernel_gemm_flops = flops / time;
  const std::string shape = m.hd() == 128 ? "hd128_" : "";
  for (const char* backend : {"cudnn", "flash"}) {
    const double fwd = counter(bench, "BM_attention/" + shape + backend + "_fwd", "TFLOP/s");
    const double bwd = counter(bench, "BM_attention/" + shape + backend + "_bwd", "TFLOP/s");
    if (fwd > 0 && bwd > 0) {
      hw.kernel_attn_fwd_flops = fwd * 1e12;
      hw.kernel_attn_bwd_flops = bwd * 1e12;
      break;
    }
  }
  IEVO_CHECK(hw.kernel_attn_fwd_flops > 0, "no attention forward/backward TFLOP/s (BM_attention/",
             shape, "cudnn_* or flash_*)");
  double inv = 0;
  int n = 0;
  for (const char* name : {"BM_rmsnorm/fwd", "BM_rmsnorm/bwd", "BM_swiglu", "BM_cross_entropy"}) {
    const double r = counter(bench, name, "GB/s") * 1e9;
    if (r > 0) inv += 1.0 / r, ++n;
  }
  IEVO_CHECK(n > 0, "no GB/s of the memory-bound kernels (BM_rmsnorm, BM_swiglu, BM_cross_entropy)");
  hw.kernel_mem_bw = n / inv;
}

std::string perf_report(const Config& cfg, int dp, const PerfOptions& o) {
  const PerfInput in = perf_input(cfg, dp, o);
  const PerfHardware hw = perf_hardware(in, o);
  PerfEstimate e;
  try {
    e = estimate_step(in, hw);
  } catch (const Error& err) {  // e.g. a batch that does not split over dp
    return std::string("step time (estimate): n/a: ") + err.what() + "\n";
  }
  if (!o.json.empty()) {
    const int64_t gpus = static_cast<int64_t>(in.dp) * in.tp * in.pp;
    const nlohmann::json j = {{"hardware", hw.name},
                              {"dp", in.dp},
                              {"tp", in.tp},
                              {"pp", in.pp},
                              {"zero", in.zero_stage},
                              {"gpus", gpus},
                              {"micro_batches", e.micro_batches},
                              {"compute_s", e.compute_s},
                              {"tp_s", e.tp_s},
                              {"p2p_s", e.p2p_s},
                              {"bubble_s", e.bubble_s},
                              {"dp_s", e.dp_s},
                              {"dp_exposed_s", e.dp_exposed_s},
                              {"optimizer_s", e.optimizer_s},
                              {"step_s", e.step_s},
                              {"tokens_per_s", e.tokens_per_s},
                              {"tokens_per_s_per_gpu", e.tokens_per_s / static_cast<double>(gpus)},
                              {"mfu", e.mfu}};
    write_file_atomic(o.json, j.dump(2) + "\n");
  }
  return format_estimate(in, hw, e);
}

}  // namespace ievo
