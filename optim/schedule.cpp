#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "runtime/error.h"

namespace ievo {

double LrSchedule::at(int64_t s) const {
  if (warmup_steps > 0 && s <= warmup_steps)
    return lr * static_cast<double>(s) / static_cast<double>(warmup_steps);
  const double p = static_cast<double>(s - warmup_steps) /
                   static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  if (kind == "constant") return lr;
  if (kind == "cosine") return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * std::min(p, 1.0)));
  if (kind == "linear") return lr - (lr - min_lr) * std::min(p, 1.0);
  if (kind == "wsd") {
    const int64_t D = std::max<int64_t>(1, std::llround(decay_fraction * static_cast<double>(total_steps)));
    const int64_t start = total_steps - D;
    if (s <= start) return lr;
    return lr - (lr - min_lr) * std::min(1.0, static_cast<double>(s - start) / static_cast<double>(D));
  }
  IEVO_FAIL("unknown schedule.kind '", kind, "' (expected constant, cosine, linear or wsd)");
}

}  // namespace ievo
