// How one optimiser step's global batch is split over data-parallel ranks:
//   train.global_batch_size G = micro_batch_size B x accumulation A x dp
// Rank r of dp takes the samples [r*G/dp, (r+1)*G/dp) of the step (in the global sample order),
// in A micro-batches of B; concatenated over ranks this is exactly the one-process order, so the
// same step sees the same samples for any dp.
#pragma once
#include <cstdint>

namespace ievo {

struct BatchSplit {
  int64_t global = 1, micro = 1, dp = 1, dp_rank = 0;
  int64_t accum = 1;  // micro-batches per rank and step
  // Global index of the first sample of micro-batch j (0-based) of this rank at step (1-based).
  int64_t first_sample(int64_t step, int64_t j) const {
    return (step - 1) * global + dp_rank * (global / dp) + j * micro;
  }
};

// Checks the keys against dp (errors name train.global_batch_size, train.micro_batch_size and the
// data-parallel size) and returns the split.
BatchSplit split_batch(int64_t global, int64_t micro, int64_t dp, int64_t dp_rank);

}  // namespace ievo
