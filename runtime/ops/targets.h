// The loss's targets, shared by every cross-entropy op on every device: the ignore index, and the
// error for a target outside the vocabulary (one wording, naming the op, the target and its row).
#pragma once
#include <cstdint>

#include "runtime/error.h"

namespace ievo::ops {

constexpr int32_t kIgnoreIndex = -100;  // a target that counts for nothing (loss 0, gradient 0)

[[noreturn]] inline void target_error(const char* op, int64_t target, int64_t row, int64_t vocab) {
  IEVO_FAIL(op, ": target ", target, " at row ", row, " is outside the vocabulary [0, ", vocab,
            ") and is not the ignore index ", kIgnoreIndex);
}

// Host targets t[0, n): throws target_error for the first one outside [0, vocab) that is not
// kIgnoreIndex.
inline void check_target_values(const int32_t* t, int64_t n, int64_t vocab, const char* op) {
  for (int64_t i = 0; i < n; ++i)
    if (t[i] != kIgnoreIndex && (t[i] < 0 || t[i] >= vocab)) target_error(op, t[i], i, vocab);
}

}  // namespace ievo::ops
