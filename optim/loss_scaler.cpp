#include "optim/loss_scaler.h"

#include <algorithm>

#include "runtime/error.h"

namespace ievo {

LossScaler::LossScaler(const LossScalerConfig& c) : c_(c) {
  IEVO_CHECK(c.min_scale > 0, "loss scaler: min_scale must be positive, got ", c.min_scale);
  IEVO_CHECK(c.initial_scale >= c.min_scale && c.initial_scale <= c.max_scale,
             "loss scaler: initial_scale ", c.initial_scale, " must be in [min_scale ",
             c.min_scale, ", max_scale ", c.max_scale, "]");
  IEVO_CHECK(c.growth_factor > 1, "loss scaler: growth_factor must be > 1, got ", c.growth_factor);
  IEVO_CHECK(c.backoff_factor > 0 && c.backoff_factor < 1,
             "loss scaler: backoff_factor must be in (0, 1), got ", c.backoff_factor);
  IEVO_CHECK(c.growth_interval >= 1, "loss scaler: growth_interval must be >= 1, got ",
             c.growth_interval);
  IEVO_CHECK(c.hysteresis >= 1, "loss scaler: hysteresis must be >= 1, got ", c.hysteresis);
  s_.scale = c.initial_scale;
}

bool LossScaler::update(bool overflow) {
  if (overflow) {
    ++s_.hysteresis_count;
    s_.good_steps = 0;
    if (s_.hysteresis_count >= c_.hysteresis)
      s_.scale = std::max(s_.scale * c_.backoff_factor, c_.min_scale);
    return true;
  }
  if (++s_.good_steps == c_.growth_interval) {
    s_.good_steps = 0;
    s_.hysteresis_count = 0;
    s_.scale = std::min(s_.scale * c_.growth_factor, c_.max_scale);
  }
  return false;
}

}  // namespace ievo
