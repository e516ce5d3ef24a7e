#include "launch/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include "launch/bench_comm.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "models/atomic_file.h"
#include "parallel/topology.h"
#include "runtime/allocator.h"
#include "runtime/error.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace fs = std::filesystem;

namespace ievo {
namespace {

constexpr double kH100PeakBf16Flops = 989e12;  // H100 SXM dense bf16, as in the trainer's MFU

bool has_key(const std::string& key) {
  for (const auto& k : config_schema())
    if (k.key == key) return true;
  return false;
}

std::string describe_model(const ModelConfig& m) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s d%lld L%lld h%lld/%lld ffn%lld V%lld", arch_name(m.arch),
                static_cast<long long>(m.hidden_size), static_cast<long long>(m.num_layers),
                static_cast<long long>(m.num_heads), static_cast<long long>(m.num_kv_heads),
                static_cast<long long>(m.ffn_hidden_size), static_cast<long long>(m.vocab_size));
  return buf;
}

std::string device_string(const Config& cfg) {
#ifdef IEVO_CUDA
  if (cfg.run.device == "cuda") return cuda::device_description();
#endif
  return cfg.run.device;
}

// Removes the temporary run directory however the bench ends.
struct TempDir {
  fs::path path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

BenchResult run_bench(const BenchOptions& o) {
  IEVO_CHECK(o.steps >= 1, "ievo bench: --steps must be >= 1, got ", o.steps);
  IEVO_CHECK(o.warmup >= 0, "ievo bench: --warmup must be >= 0, got ", o.warmup);
  TempDir dir{fs::temp_directory_path() / ("ievo-bench-" + std::to_string(getpid()))};
  // The user's overrides first, then the bench's: synthetic tokens, W + N steps, a fresh temporary
  // run directory, no validation (keys of other features only where this build has them).
  std::vector<std::string> ov = o.overrides;
  ov.push_back("data.synthetic=true");
  ov.push_back("run.dir=" + dir.path.string());
  ov.push_back("checkpoint.resume=none");
  for (const char* extra : {"data.packing=false", "data.valid_paths=[]", "train.eval_every=0"}) {
    const std::string kv = extra;
    if (has_key(kv.substr(0, kv.find('=')))) ov.push_back(kv);
  }
  // W + N steps; the LR warm-up may not be longer than the run (it only sets the LR values).
  const int64_t total = o.warmup + o.steps;
  if (load_config(o.config, ov).schedule.warmup_steps > total)
    ov.push_back("schedule.warmup_steps=" + std::to_string(total));
  ov.push_back("train.steps=" + std::to_string(total));
  const Config cfg = load_config(o.config, ov);
  const Device dev = cfg.run.device == "cuda" ? Device::CUDA : Device::CPU;

  PhaseTimer timer(dev);
  TrainOptions topt;
  topt.phases = &timer;
  topt.checkpoints = false;
  std::vector<std::vector<double>> stage_times;  // parallel.pipeline: per step
  topt.pipeline_stage_times = &stage_times;
  const std::vector<StepMetrics> all = run_train(cfg, topt);
  IEVO_CHECK(static_cast<int64_t>(all.size()) == o.warmup + o.steps, "ievo bench: the run stopped after ",
             all.size(), " of ", o.warmup + o.steps, " steps");
  IEVO_CHECK(timer.steps().size() == all.size(), "ievo bench: phase times of ", timer.steps().size(),
             " steps for ", all.size(), " steps");

  BenchResult r;
  const ModelConfig& m = cfg.model.model;
  r.config = o.config;
  r.device = device_string(cfg);
  r.precision = cfg.train.precision;
  r.checkpointing = cfg.model.checkpointing;
  {
    const auto& P = cfg.parallel;
    const int64_t world = world_size(), dp = world / std::max<int64_t>(1, P.tensor * P.pipeline);
    char buf[160];
    std::snprintf(buf, sizeof buf, "dp %lld x tp %lld x pp %lld, zero %lld%s%s", static_cast<long long>(dp),
                  static_cast<long long>(P.tensor), static_cast<long long>(P.pipeline), static_cast<long long>(P.zero),
                  P.sequence == "none" ? "" : ", sequence ", P.sequence == "none" ? "" : P.sequence.c_str());
    r.layout = buf;
  }
  r.model = describe_model(m);
  r.model_shape = {{"hidden_size", m.hidden_size},         {"num_layers", m.num_layers},
                   {"num_heads", m.num_heads},             {"num_kv_heads", m.num_kv_heads},
                   {"ffn_hidden_size", m.ffn_hidden_size}, {"vocab_size", m.vocab_size}};
  r.params = m.num_params();
  r.seq_len = cfg.data.seq_len;
  r.global_batch = cfg.train.global_batch_size;
  r.micro_batch = cfg.train.micro_batch_size;
  r.steps = o.steps;
  r.warmup = o.warmup;
  std::vector<double> times;
  int64_t tokens = 0;
  for (size_t i = static_cast<size_t>(o.warmup); i < all.size(); ++i) {
    times.push_back(all[i].step_time_s);
    tokens += all[i].tokens;
    for (int p = 0; p < kNumPhases; ++p) r.phases[p] += timer.steps()[i][p] / static_cast<double>(o.steps);
  }
  if (stage_times.size() == all.size()) {  // pipeline: mean of each stage's times
    r.pipeline_stages.assign(stage_times.back().size(), 0.0);
    for (size_t i = static_cast<size_t>(o.warmup); i < all.size(); ++i)
      for (size_t k = 0; k < r.pipeline_stages.size(); ++k)
        r.pipeline_stages[k] += stage_times[i][k] / static_cast<double>(o.steps);
  }
  double seconds = 0;
  for (double t : times) seconds += t;
  r.step_time_s = seconds / static_cast<double>(times.size());
  std::sort(times.begin(), times.end());
  const size_t n = times.size();
  r.step_time_median_s = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
  r.tokens_per_s = static_cast<double>(tokens) / seconds;
  r.gpus = world_size();
  r.mfu = dev == Device::CUDA
              ? m.flops_per_token(cfg.data.seq_len) * r.tokens_per_s / (kH100PeakBf16Flops * r.gpus)
              : 0.0;
  const MemoryStats ms = memory_stats(dev);
  r.peak_bytes = ms.peak_bytes;
  r.reserved_bytes = ms.reserved_bytes;
  r.first_loss = all.front().loss;
  r.last_loss = all.back().loss;
  return r;
}

nlohmann::json bench_to_json(const BenchResult& r) {
  nlohmann::json phases;
  for (int p = 0; p < kNumPhases; ++p) phases[phase_name(static_cast<Phase>(p))] = r.phases[p];
  nlohmann::json stages = nlohmann::json::array();  // parallel.pipeline: one object per stage
  for (size_t k = 0; k + 2 < r.pipeline_stages.size(); k += 3)
    stages.push_back({{"forward", r.pipeline_stages[k]}, {"backward", r.pipeline_stages[k + 1]},
                      {"exchange", r.pipeline_stages[k + 2]}});
  return {{"config", r.config},
          {"device", r.device},
          {"model", r.model},
          {"params", r.params},
          {"model_shape", r.model_shape},
          {"precision", r.precision},
          {"checkpointing", r.checkpointing},
          {"seq_len", r.seq_len},
          {"global_batch", r.global_batch},
          {"micro_batch", r.micro_batch},
          {"steps", r.steps},
          {"warmup", r.warmup},
          {"ranks", r.gpus},
          {"layout", r.layout},
          {"tokens_per_s", r.tokens_per_s},
          {"tokens_per_s_per_rank", r.tokens_per_s / r.gpus},
          {"mfu", r.mfu},
          {"step_time_s", r.step_time_s},
          {"step_time_median_s", r.step_time_median_s},
          {"peak_mem_bytes", r.peak_bytes},
          {"reserved_mem_bytes", r.reserved_bytes},
          {"phases_s", phases},
          {"pipeline_stages_s", stages},
          {"first_loss", r.first_loss},
          {"last_loss", r.last_loss}};
}

std::string format_bench(const BenchResult& r) {
  std::string s;
  char line[256];
  auto add = [&](const char* fmt, auto... args) {
    std::snprintf(line, sizeof line, fmt, args...);
    s += line;
  };
  const double gib = 1024.0 * 1024.0 * 1024.0;
  add("ievo bench %s: %s, %.1fM params, %s, checkpointing %s\n", r.config.c_str(), r.model.c_str(),
      static_cast<double>(r.params) / 1e6, r.precision.c_str(), r.checkpointing.c_str());
  add("  device      %s\n", r.device.c_str());
  if (r.gpus > 1) add("  layout      %d ranks: %s\n", r.gpus, r.layout.c_str());
  add("  batch       %lld x %lld tokens (micro-batch %lld), %lld warm-up + %lld timed steps\n",
      static_cast<long long>(r.global_batch), static_cast<long long>(r.seq_len),
      static_cast<long long>(r.micro_batch), static_cast<long long>(r.warmup),
      static_cast<long long>(r.steps));
  if (r.gpus > 1)
    add("  tokens/s    %.0f (%.0f per rank)\n", r.tokens_per_s, r.tokens_per_s / r.gpus);
  else
    add("  tokens/s    %.0f\n", r.tokens_per_s);
  add("  MFU         %.1f%%\n", 100.0 * r.mfu);
  add("  step        %.2f ms mean, %.2f ms median\n", 1e3 * r.step_time_s, 1e3 * r.step_time_median_s);
  add("  memory      %.2f GiB peak allocated, %.2f GiB reserved\n", r.peak_bytes / gib,
      r.reserved_bytes / gib);
  double sum = 0;
  for (double t : r.phases) sum += t;
  for (int p = 0; p < kNumPhases; ++p)
    add("  %-11s %8.2f ms  %5.1f%%\n", phase_name(static_cast<Phase>(p)), 1e3 * r.phases[p],
        sum > 0 ? 100.0 * r.phases[p] / sum : 0.0);
  for (size_t k = 0; k + 2 < r.pipeline_stages.size(); k += 3)
    add("  stage %-5zu forward %.2f ms, backward %.2f ms, exchange + waiting %.2f ms\n", k / 3,
        1e3 * r.pipeline_stages[k], 1e3 * r.pipeline_stages[k + 1], 1e3 * r.pipeline_stages[k + 2]);
  add("  loss        %.4f (first step) -> %.4f (last)\n", r.first_loss, r.last_loss);
  return s;
}

std::pair<CLI::App*, std::function<void()>> add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  struct Comm {
    bool on = false;
    CommBenchOptions o;
    std::string dtype = "bf16";
    double min_mib = 1, max_mib = 1024;
  };
  auto c = std::make_shared<Comm>();
  auto* cmd = app.add_subcommand("bench", "Training-step speed of a config on synthetic tokens: "
                                          "tokens/s, MFU, peak memory, time per phase; or (--comm) "
                                          "the bus bandwidth of the collectives");
  cmd->add_option("config", o->config, "YAML config file")->check(CLI::ExistingFile);
  cmd->add_option("--set", o->overrides, "Override a config key: --set train.micro_batch_size=4")
      ->allow_extra_args(false);
  cmd->add_option("--steps", o->steps, "timed steps (default 10)")->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", o->warmup, "untimed warm-up steps first (default 3)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--json", o->json, "also write the results as one JSON object to this file");
  const char* g = "Collectives (--comm, launch/bench_comm.h)";
  cmd->add_flag("--comm", c->on, "all-reduce / reduce-scatter / all-gather bus bandwidth over all ranks "
                                 "(under mpirun) instead of a config")->group(g);
  cmd->add_option("--device", c->o.device, "cuda (NCCL, default) or cpu (MPI)")->group(g);
  cmd->add_option("--dtype", c->dtype, "element type (bf16)")->group(g);
  cmd->add_option("--comm-min-mib", c->min_mib, "smallest buffer in MiB (1)")->group(g)->check(CLI::PositiveNumber);
  cmd->add_option("--comm-max-mib", c->max_mib, "largest buffer in MiB (1024); sizes go up by 4x")
      ->group(g)->check(CLI::PositiveNumber);
  cmd->add_option("--comm-iters", c->o.iters, "timed calls per size (20)")->group(g)->check(CLI::PositiveNumber);
  auto write_json = [](const std::string& path, const nlohmann::json& j) {
    if (!path.empty() && world_rank() == 0) write_file_atomic(path, j.dump(2) + "\n");
  };
  auto run = [o, c, write_json] {
    if (c->on) {
      IEVO_CHECK(o->config.empty(), "ievo bench: --comm takes no config (got ", o->config, ")");
      c->o.dtype = dtype_from_name(c->dtype);
      c->o.min_bytes = static_cast<int64_t>(c->min_mib * (1 << 20));
      c->o.max_bytes = static_cast<int64_t>(c->max_mib * (1 << 20));
      const CommBenchResult r = run_comm_bench(c->o);
      if (world_rank() == 0) std::printf("%s", format_comm_bench(r).c_str());
      std::fflush(stdout);
      write_json(o->json, comm_bench_to_json(r));
      return;
    }
    IEVO_CHECK(!o->config.empty(), "ievo bench: a config file is required (or --comm)");
    const BenchResult r = run_bench(*o);
    if (world_rank() == 0) std::printf("%s", format_bench(r).c_str());
    std::fflush(stdout);
    write_json(o->json, bench_to_json(r));
  };
  return {cmd, run};
}

}  // namespace ievo
