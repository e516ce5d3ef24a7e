// `ievo bench CONFIG [--set k=v ...] [--steps N] [--warmup W] [--json OUT]`: the training step's
// speed on synthetic tokens.
//
// Runs the config's training for W warm-up + N timed steps with data.synthetic forced on (random
// tokens: the input pipeline is not measured), no checkpoints and no validation, in a temporary run
// directory. Reports over the timed steps:
//   tokens/s      global_batch_size * seq_len * N / (sum of the N step times; host clock, each step
//                 ends with a device synchronisation)
//   MFU           ModelConfig::flops_per_token(T) * tokens/s / (989e12 * ranks) (H100 SXM dense
//                 bf16), the formula of the CUDA issue: (6 N_matmul + 6 L d T) per token
// Under mpirun the run is the config's layout over all ranks (parallel.*); tokens/s is the whole
// job's, rank 0 prints and writes --json, and the memory is rank 0's.
//   memory        the device allocator's peak of live bytes over the whole run (warm-up included;
//                 compare torch.cuda.max_memory_allocated) and the bytes it reserved from CUDA
//   phases        mean device time per step of data, forward, backward, reduce (dp gradient
//                 reduction + global norm: the "comm" phase) and optimizer (launch/phase_timer.h)
//   stages        with parallel.pipeline: each stage's forward, backward and exchange time (the
//                 exchange includes waiting for the other stages: the bubble; parallel/pipeline.h)
// Printed as a short table; --json writes the same numbers as one JSON object (for scripts:
// bench/peer/compare.sh).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/phase_timer.h"

namespace CLI {
class App;
}

namespace ievo {

struct BenchOptions {
  std::string config;
  std::vector<std::string> overrides;  // --set, applied before the bench's own
  int64_t steps = 10;                  // timed steps
  int64_t warmup = 3;                  // untimed steps first (allocator warm-up, cuDNN plans)
  std::string json;                    // "": no JSON file
};

struct BenchResult {
  std::string config, device, precision, checkpointing;
  std::string model;  // "llama d2048 L22 h32/4 ffn5632 V32000"
  std::string layout;  // "dp 2 x tp 2 x pp 1, zero 1"
  nlohmann::json model_shape;  // sizes (ievo plan --bench-json checks them against its config)
  int64_t params = 0, seq_len = 0, global_batch = 0, micro_batch = 0, steps = 0, warmup = 0;
  int gpus = 1;  // ranks of the job (GPUs with run.device: cuda)
  double tokens_per_s = 0, mfu = 0;
  double step_time_s = 0, step_time_median_s = 0;  // timed steps: mean and median
  int64_t peak_bytes = 0, reserved_bytes = 0;
  PhaseTimer::Times phases{};  // mean over the timed steps, seconds
  // parallel.pipeline: per stage (forward, backward, exchange) mean seconds over the timed steps,
  // stage-major; the phases above are then rank 0's, i.e. stage 0's.
  std::vector<double> pipeline_stages;
  double first_loss = 0, last_loss = 0;
};

BenchResult run_bench(const BenchOptions& o);
nlohmann::json bench_to_json(const BenchResult& r);
std::string format_bench(const BenchResult& r);  // the human-readable report

// The subcommand, and what to run when it was parsed.
std::pair<CLI::App*, std::function<void()>> add_bench_command(CLI::App& app);

}  // namespace ievo
