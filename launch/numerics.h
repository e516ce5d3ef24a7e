// Numerical safety of a training step (the trainer calls this after the backward):
//
//   * a step whose loss or global gradient norm is not finite is skipped: no optimiser update, the
//     step counts as done (data and LR schedule move on, AdamW's bias-correction step does not);
//     metrics.jsonl has "skipped": true and "skipped_total";
//   * train.max_skips_in_a_row skipped steps in a row abort the run with an error naming the step
//     and the first gradient tensor (in parameter order) holding a NaN/Inf, found by scanning the
//     reduced gradients with ops::all_finite (only on skipped steps: it costs a pass); with ZeRO
//     every data-parallel rank scans its own shard and the ranks agree on the lowest index
//     (ZeroOptimizer::first_nonfinite_gradient), so sharded gradients (ZeRO-2/3) are named too;
//   * train.precision: fp16: the backward's gradient scale is multiplied by the dynamic loss scale
//     (optim/loss_scaler.h), an overflow (non-finite scaled gradients) is a skipped step that backs
//     the scale off; such skips count towards the abort only once the scale is at fp16.min_scale;
//   * the counts (skipped_total, the current run of skips in a row) are part of the checkpoint
//     (state.json "extra": {"numerics": {...}}) so that a resumed run continues them;
//   * test hook debug.nan_at_step / nan_steps / nan_param: after the backward of those steps the
//     named gradient is multiplied by NaN (all its elements become NaN, on any device; with sharded
//     gradients this rank's pieces of it: ZeroOptimizer::poison_gradient).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "launch/config.h"
#include "launch/trainer.h"
#include "models/params.h"
#include "optim/loss_scaler.h"

namespace ievo {

// The first tensor of `grads` (store order) holding a NaN or Inf; "" if all are finite.
std::string first_nonfinite_tensor(const ParamStore& grads);

class NumericsGuard {
 public:
  explicit NumericsGuard(const Config& cfg);

  // Multiply the backward's gradient scale by this (the loss scale with fp16, else 1).
  double loss_scale() const;
  // The debug.nan_* hook: the index in `specs` (this rank's parameters) of the gradient to poison
  // at this step (logged), or -1: not a poisoned step, or the named parameter is held by another
  // rank (tensor/pipeline parallelism). "" names this rank's first parameter.
  int64_t poison_index(int64_t step, const std::vector<ParamSpec>& specs) const;
  // The name of the first non-finite gradient ("" if all are finite). Called only on skipped
  // steps; every rank's guard calls it then (the skip decision is the same everywhere), so it may
  // be collective.
  using FirstNonfinite = std::function<std::string()>;
  // Decides whether the step's update is applied. `scaled_grad_norm` is the norm of the gradients
  // as computed (still multiplied by loss_scale()). Fills m.grad_norm (unscaled), m.skipped,
  // m.skipped_total, m.loss_scale; updates the fp16 scaler; throws ievo::Error after
  // train.max_skips_in_a_row counted skips in a row.
  bool accept(int64_t step, double loss, double scaled_grad_norm, const FirstNonfinite& first_nonfinite,
              StepMetrics& m);

  int64_t skipped_total() const { return skipped_total_; }
  int64_t skipped_in_a_row() const { return in_a_row_; }
  // A resume: continue the counts of the checkpointed run.
  void restore_counts(int64_t skipped_total, int64_t skipped_in_a_row);
  const LossScaler* scaler() const { return scaler_.get(); }
  LossScaler* scaler() { return scaler_.get(); }

 private:
  int64_t max_in_a_row_;
  DebugConfig debug_;
  std::unique_ptr<LossScaler> scaler_;
  int64_t skipped_total_ = 0, in_a_row_ = 0;
};

}  // namespace ievo
