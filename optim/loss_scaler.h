// Dynamic loss scaling for fp16 training, the state machine of InternEvo's DynamicGradScaler
// (and Megatron's): the loss is multiplied by `scale` before the backward so that small gradients
// survive fp16, and the optimiser divides the gradients by it again.
//
//   update(overflow):                        (overflow: some scaled gradient is NaN/Inf; the
//     overflow:  hysteresis_count += 1;       step is skipped by the caller)
//                good_steps = 0
//                if hysteresis_count >= hysteresis:  scale = max(scale * backoff, min_scale)
//     else:      good_steps += 1
//                if good_steps == growth_interval:   good_steps = 0; hysteresis_count = 0;
//                                                    scale = min(scale * growth, max_scale)
//
// The hysteresis count is not reset by a backoff, only by a growth: once `hysteresis` overflows
// have happened, every further overflow backs off until the scale grows again.
// Pure host-side state; save/restore it with state()/set_state() for checkpoints.
#pragma once
#include <cstdint>

namespace ievo {

struct LossScalerConfig {
  double initial_scale = 65536.0, min_scale = 1.0, max_scale = 16777216.0;
  double growth_factor = 2.0, backoff_factor = 0.5;
  int64_t growth_interval = 1000, hysteresis = 2;
};

struct LossScalerState {
  double scale = 0;
  int64_t good_steps = 0;        // overflow-free steps since the last overflow or growth
  int64_t hysteresis_count = 0;  // overflows since the last growth
};

class LossScaler {
 public:
  explicit LossScaler(const LossScalerConfig& c);  // validates c (errors name the field)
  double scale() const { return s_.scale; }
  double inv_scale() const { return 1.0 / s_.scale; }
  bool at_min_scale() const { return s_.scale <= c_.min_scale; }
  // Records one step; returns true when the step's update should be skipped (= overflow).
  bool update(bool overflow);
  const LossScalerState& state() const { return s_; }
  void set_state(const LossScalerState& s) { s_ = s; }
  const LossScalerConfig& config() const { return c_; }

 private:
  LossScalerConfig c_;
  LossScalerState s_;
};

}  // namespace ievo
