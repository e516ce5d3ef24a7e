// The training loop of `ievo train`: model, optimiser, data and checkpoints wired together.
// One optimiser step = global_batch_size sequences in micro-batches of micro_batch_size; the loss is
// the mean token cross-entropy of the whole global batch, computed before the update.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "launch/config.h"

namespace ievo {

struct StepMetrics {
  int64_t step = 0;
  double loss = 0, grad_norm = 0, lr = 0, tokens_per_s = 0, mfu = 0;
  int64_t tokens = 0;
  double step_time_s = 0;
};

// Runs the configured training; returns the metrics of every step (also in RUN_DIR/metrics.jsonl).
std::vector<StepMetrics> run_train(const Config& cfg);

}  // namespace ievo
