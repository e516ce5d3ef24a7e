// AdamW over a ParamStore: fp32 master weights and moments in the store's layout; no weight decay on
// 1-D parameters (ParamSpec::decay). Gradient clipping by global L2 norm.
#pragma once
#include <cstdint>

#include "models/params.h"
#include "runtime/ops/adamw.h"

namespace ievo {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(const ParamStore& params, const AdamWConfig& cfg);
  // One update of every parameter: grads are multiplied by grad_scale first (clipping, 1/loss
  // scale). If lowp is given, its tensors receive the updated weights in its dtype (bf16 copy).
  void step(ParamStore& params, const ParamStore& grads, double lr, double grad_scale,
            ParamStore* lowp = nullptr);
  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }
  ParamStore& exp_avg() { return m_; }
  ParamStore& exp_avg_sq() { return v_; }

 private:
  AdamWConfig cfg_;
  ParamStore m_, v_;
  int64_t t_ = 0;
};

// Sum of squares of every gradient (the parallel code adds these across ranks before the sqrt).
double grad_sum_squares(const ParamStore& grads);
// torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)); 1 if max_norm <= 0.
double clip_coefficient(double norm, double max_norm);

}  // namespace ievo
