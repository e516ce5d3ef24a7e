#include "parallel/batch_split.h"

#include "runtime/error.h"

namespace ievo {

BatchSplit split_batch(int64_t global, int64_t micro, int64_t dp, int64_t dp_rank) {
  IEVO_CHECK(global > 0 && micro > 0 && dp > 0 && dp_rank >= 0 && dp_rank < dp,
             "split_batch: global ", global, ", micro ", micro, ", dp ", dp, ", rank ", dp_rank);
  if (dp > global)
    IEVO_FAIL("more data-parallel ranks (dp = ", dp, ") than samples per step (train.global_batch_size = ",
              global, "): every rank needs at least one sample; use fewer ranks or a larger batch");
  if (global % (micro * dp) != 0)
    IEVO_FAIL("train.global_batch_size (", global, ") must be divisible by train.micro_batch_size x "
              "data-parallel size (", micro, " x ", dp, " = ", micro * dp,
              "): global_batch_size = micro_batch_size x accumulation x dp");
  BatchSplit s;
  s.global = global;
  s.micro = micro;
  s.dp = dp;
  s.dp_rank = dp_rank;
  s.accum = global / (micro * dp);
  return s;
}

}  // namespace ievo
