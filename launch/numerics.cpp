#include "launch/numerics.h"

#include <cmath>

#include "launch/log.h"
#include "runtime/error.h"
#include "runtime/ops/elementwise.h"

namespace ievo {

std::string first_nonfinite_tensor(const ParamStore& grads) {
  for (size_t i = 0; i < grads.size(); ++i)
    if (!ops::all_finite(grads[i])) return grads.spec(i).name;
  return "";
}

NumericsGuard::NumericsGuard(const Config& cfg)
    : max_in_a_row_(cfg.train.max_skips_in_a_row), debug_(cfg.debug) {
  if (cfg.train.precision == "fp16") {
    const Fp16Config& f = cfg.fp16;
    LossScalerConfig c;
    c.initial_scale = f.initial_scale;
    c.min_scale = f.min_scale;
    c.max_scale = f.max_scale;
    c.growth_factor = f.growth_factor;
    c.backoff_factor = f.backoff_factor;
    c.growth_interval = f.growth_interval;
    c.hysteresis = f.hysteresis;
    scaler_ = std::make_unique<LossScaler>(c);
  }
}

void NumericsGuard::restore_counts(int64_t skipped_total, int64_t skipped_in_a_row) {
  IEVO_CHECK(skipped_total >= 0 && skipped_in_a_row >= 0 && skipped_in_a_row <= skipped_total,
             "checkpoint state: numerics counts skipped_total ", skipped_total, ", skipped_in_a_row ",
             skipped_in_a_row, " are inconsistent");
  skipped_total_ = skipped_total;
  in_a_row_ = skipped_in_a_row;
}

double NumericsGuard::loss_scale() const { return scaler_ ? scaler_->scale() : 1.0; }

int64_t NumericsGuard::poison_index(int64_t step, const std::vector<ParamSpec>& specs) const {
  if (debug_.nan_at_step <= 0 || step < debug_.nan_at_step ||
      step >= debug_.nan_at_step + debug_.nan_steps || specs.empty())
    return -1;
  for (size_t i = 0; i < specs.size(); ++i)
    if (debug_.nan_param.empty() || specs[i].name == debug_.nan_param) {
      log_info("debug.nan_at_step: step %lld: set the gradient of %s to NaN", static_cast<long long>(step),
               specs[i].name.c_str());
      return static_cast<int64_t>(i);
    }
  return -1;  // config validation knows the name: another rank holds it
}

bool NumericsGuard::accept(int64_t step, double loss, double scaled_grad_norm,
                           const FirstNonfinite& first_nonfinite, StepMetrics& m) {
  const double scale = loss_scale();
  m.loss_scale = scaler_ ? scale : 0.0;
  m.grad_norm = scaled_grad_norm / scale;
  const bool finite = std::isfinite(loss) && std::isfinite(scaled_grad_norm);
  // fp16: overflows are expected now and then; they count towards the abort only when the scale
  // cannot back off any further.
  const bool counts = !scaler_ || scaler_->at_min_scale();
  if (scaler_) scaler_->update(!finite);
  m.skipped = !finite;
  if (finite) {
    in_a_row_ = 0;
    m.skipped_total = skipped_total_;
    return true;
  }
  ++skipped_total_;
  m.skipped_total = skipped_total_;
  if (counts) ++in_a_row_;
  const std::string bad = first_nonfinite ? first_nonfinite() : std::string();
  const std::string culprit = !bad.empty()         ? detail::cat("first non-finite gradient: ", bad)
                              : !first_nonfinite   ? detail::cat("the loss (", loss, ")")
                              : std::isfinite(loss) ? std::string("gradient norm not finite, but every gradient of this "
                                                                  "model-parallel rank is finite")
                                                   : detail::cat("the loss (", loss, "); every gradient is finite");
  if (in_a_row_ >= max_in_a_row_)
    IEVO_FAIL("step ", step, ": ", in_a_row_,
              " steps in a row skipped for a non-finite loss or gradient (train.max_skips_in_a_row: ",
              max_in_a_row_, "); ", culprit, "; loss ", loss, ", gradient norm ", m.grad_norm);
  if (scaler_)
    log_info("step %lld: fp16 overflow (%s); skipped, loss scale %g -> %g",
             static_cast<long long>(step), culprit.c_str(), scale, scaler_->scale());
  else
    log_info("step %lld: non-finite loss or gradient (%s); update skipped (%lld in a row)",
             static_cast<long long>(step), culprit.c_str(), static_cast<long long>(in_a_row_));
  return false;
}

}  // namespace ievo
