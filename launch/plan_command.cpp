#include "launch/plan_command.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "launch/config.h"
#include "launch/perf_plan.h"
#include "parallel/batch_split.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/plan.h"
#include "runtime/error.h"

namespace ievo {

std::pair<CLI::App*, std::function<void()>> add_plan_command(CLI::App& app) {
  struct Options {
    std::string config;
    std::vector<std::string> overrides;
    int dp = 1;
    double gpu_mem_gib = 80;
    std::string weights_dtype = "bf16", kv_dtype = "bf16";
    bool schedule = false, exchanges = false;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("plan", "Memory per rank for a config (ZeRO stages), and for inference");
  cmd->add_option("config", o->config, "YAML config file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--set", o->overrides, "Override a config key: --set parallel.zero=2")
      ->allow_extra_args(false);
  cmd->add_option("--dp", o->dp, "data-parallel ranks N (default 1)")->check(CLI::PositiveNumber);
  cmd->add_option("--gpu-mem-gib", o->gpu_mem_gib, "memory of one GPU in GiB (default 80)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--weights-dtype", o->weights_dtype, "inference weights: fp32|bf16|fp16|fp8|int8|int4");
  cmd->add_option("--kv-dtype", o->kv_dtype, "inference KV cache: fp32|bf16|fp16|fp8|int8");
  cmd->add_flag("--schedule", o->schedule, "print the pipeline schedule of every stage (parallel.pipeline)");
  cmd->add_flag("--schedule-exchanges", o->exchanges, "... with its sends and receives");
  auto perf = add_perf_options(*cmd);  // step-time estimate (launch/perf_plan.h)
  auto run = [o, perf] {
    const Config cfg = load_config(o->config, o->overrides);
    PlanInput in;
    in.model = cfg.model.model;
    in.dp = o->dp;
    in.zero = ZeroConfig{static_cast<int>(cfg.parallel.zero), cfg.parallel.bucket_mb};
    in.zero.param_remainders = cfg.optim.param_remainders;
    in.compute = cfg.train.precision == "bf16"   ? DType::BF16
                 : cfg.train.precision == "fp16" ? DType::F16
                                                 : DType::F32;
    in.micro_batch_size = cfg.train.micro_batch_size;
    in.seq_len = cfg.data.seq_len;
    in.recompute = recompute_mode(cfg.model.checkpointing);
    in.head_chunk_tokens = cfg.model.head_chunk_tokens;
    in.tp = static_cast<int>(cfg.parallel.tensor);  // tensor / sequence parallelism (parallel/plan.h)
    in.sequence = sequence_parallel_from_name(cfg.parallel.sequence);
    in.sp = static_cast<int>(cfg.parallel.sequence_size);
    in.pp = static_cast<int>(cfg.parallel.pipeline);  // pipeline: stage 0, bubble (parallel/plan.h)
    in.virtual_stages = static_cast<int>(cfg.parallel.virtual_stages);
    in.schedule = cfg.parallel.schedule;
    in.pipeline_layers = cfg.parallel.pipeline_layers;
    in.micro_batches = std::max<int64_t>(1, cfg.train.global_batch_size / (cfg.train.micro_batch_size * o->dp));
    in.gpu_mem_gib = o->gpu_mem_gib;
    in.infer_weight_bytes = bytes_per_element(o->weights_dtype, "--weights-dtype");
    in.infer_kv_bytes = bytes_per_element(o->kv_dtype, "--kv-dtype");
    std::printf("%s", format_plan(in, make_plan(in)).c_str());
    if (o->schedule || o->exchanges)
      std::printf("%s", format_pipeline_schedule(make_pipeline_schedule(pipeline_kind_from_name(in.schedule), in.pp,
                                                                        static_cast<int>(in.micro_batches),
                                                                        in.virtual_stages),
                                                 o->exchanges)
                            .c_str());
    std::printf("%s", perf_report(cfg, o->dp, *perf).c_str());
    const auto& t = cfg.train;
    try {
      BatchSplit s = split_batch(t.global_batch_size, t.micro_batch_size, o->dp, 0);
      std::printf("batch: train.global_batch_size %lld = micro %lld x accumulation %lld x dp %d\n",
                  static_cast<long long>(t.global_batch_size), static_cast<long long>(t.micro_batch_size),
                  static_cast<long long>(s.accum), o->dp);
    } catch (const Error& e) {
      std::printf("batch: does not split over dp %d: %s\n", o->dp, e.what());
    }
  };
  return {cmd, run};
}

}  // namespace ievo
