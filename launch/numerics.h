// Numerical safety of a training step (the trainer calls this after the backward):
//
//   * a step whose loss or global gradient norm is not finite is skipped: no optimiser update, the
//     step counts as done (data and LR schedule move on, AdamW's bias-correction step does not);
//     metrics.jsonl has "skipped": true and "skipped_total";
//   * train.max_skips_in_a_row skipped steps in a row abort the run with an error naming the step
//     and the first gradient tensor (in parameter order) holding a NaN/Inf, found by scanning the
//     gradients tensor by tensor with ops::all_finite (only on skipped steps: it costs a pass);
//   * train.precision: fp16: the backward's gradient scale is multiplied by the dynamic loss scale
//     (optim/loss_scaler.h), an overflow (non-finite scaled gradients) is a skipped step that backs
//     the scale off; such skips count towards the abort only once the scale is at fp16.min_scale;
//   * the counts (skipped_total, the current run of skips in a row) are part of the checkpoint
//     (state.json "extra": {"numerics": {...}}) so that a resumed run continues them;
//   * test hook debug.nan_at_step / nan_steps / nan_param: after the backward of those steps the
//     named gradient is multiplied by NaN (all its elements become NaN, on any device).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

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
  // The debug.nan_* hook: poisons the configured gradient at the configured steps.
  void inject(int64_t step, ParamStore& grads) const;
  // Decides whether the step's update is applied. `scaled_grad_norm` is the norm of the gradients
  // as computed (still multiplied by loss_scale()). Fills m.grad_norm (unscaled), m.skipped,
  // m.skipped_total, m.loss_scale; updates the fp16 scaler; throws ievo::Error after
  // train.max_skips_in_a_row counted skips in a row.
  bool accept(int64_t step, double loss, double scaled_grad_norm, const ParamStore& grads,
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
