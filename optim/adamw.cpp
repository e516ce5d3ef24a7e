#include "optim/adamw.h"

#include <algorithm>

#include "runtime/ops/elementwise.h"

namespace ievo {

AdamW::AdamW(const ParamStore& params, const AdamWConfig& cfg)
    : cfg_(cfg),
      m_(params.specs(), params.dtype(), params.device()),
      v_(params.specs(), params.dtype(), params.device()) {}

void AdamW::step(ParamStore& params, const ParamStore& grads, double lr, double grad_scale,
                 ParamStore* lowp) {
  ++t_;
  for (size_t i = 0; i < params.size(); ++i) {
    ops::AdamWHyper h;
    h.lr = lr;
    h.beta1 = cfg_.beta1;
    h.beta2 = cfg_.beta2;
    h.eps = cfg_.eps;
    h.weight_decay = params.spec(i).decay ? cfg_.weight_decay : 0.0;
    h.step = t_;
    h.grad_scale = grad_scale;
    ops::adamw_step(params[i], grads[i], m_[i], v_[i], h, lowp ? &(*lowp)[i] : nullptr);
  }
}

double grad_sum_squares(const ParamStore& grads) {
  // Padding between tensors is zero, so the flat buffer gives the same sum in one call.
  return ops::sum_squares(grads.flat());
}

double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

}  // namespace ievo
