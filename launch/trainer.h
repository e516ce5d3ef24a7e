// The training loop of `ievo train`: model, optimiser, data and checkpoints wired together.
// One optimiser step = global_batch_size sequences in micro-batches of micro_batch_size; the loss is
// the mean token cross-entropy of the whole global batch, computed before the update.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <mpi.h>

#include "launch/config.h"

namespace ievo {

struct StepMetrics {
  int64_t step = 0;
  double loss = 0, grad_norm = 0, lr = 0, tokens_per_s = 0, mfu = 0;
  int64_t tokens = 0;
  double step_time_s = 0;
  int64_t peak_mem_bytes = 0;  // device allocator's high-water mark
  bool skipped = false;        // non-finite loss/gradients (or fp16 overflow): no update
  int64_t skipped_total = 0;   // skipped steps so far in this run
  double loss_scale = 0;       // fp16 dynamic loss scale used this step; 0 without fp16
};

// Runs the configured training; returns the metrics of every step (also in RUN_DIR/metrics.jsonl).
std::vector<StepMetrics> run_train(const Config& cfg);
// The same on the ranks of `world` (a communicator of any size: MPI_COMM_WORLD, a split of it, or
// MPI_COMM_SELF for a one-process run inside an MPI job); run_train(cfg) uses MPI_COMM_WORLD
// under mpirun and no MPI otherwise. Data parallelism: parallel/zero.h, docs/parallel.md.
std::vector<StepMetrics> run_train(const Config& cfg, MPI_Comm world);

class PhaseTimer;
// For `ievo bench` (launch/bench.h): time the phases of every step, and write no checkpoints.
struct TrainOptions {
  PhaseTimer* phases = nullptr;  // launch/phase_timer.h; nullptr: no phase timing
  bool checkpoints = true;       // false: never save (not even after the last step)
  // parallel.pipeline: per step, every stage's forward, backward and exchange seconds
  // (parallel/pipeline.h gather_stage_times); nullptr: not collected.
  std::vector<std::vector<double>>* pipeline_stage_times = nullptr;
};
std::vector<StepMetrics> run_train(const Config& cfg, const TrainOptions& opt);

}  // namespace ievo
