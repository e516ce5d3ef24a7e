// Learning-rate schedules. Step s is the 1-based index of the optimiser update.
//   warm-up (s <= W):  lr * s / W
//   then, with p = (s - W) / (steps - W) in (0, 1]:
//     constant: lr
//     cosine:   min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
//     linear:   lr - (lr - min_lr) * p
//     wsd:      lr until the last D = round(decay_fraction * steps) steps, then linear to min_lr:
//               lr - (lr - min_lr) * (s - (steps - D)) / D
#pragma once
#include <cstdint>
#include <string>

namespace ievo {

struct LrSchedule {
  std::string kind = "cosine";
  double lr = 3e-4, min_lr = 0;
  int64_t warmup_steps = 0, total_steps = 1;
  double decay_fraction = 0.1;

  double at(int64_t step) const;
};

}  // namespace ievo
