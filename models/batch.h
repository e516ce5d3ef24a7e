// A micro-batch in packed form: N tokens, split into sequences by cu_seqlens (a batch of B rows of
// length T is cu_seqlens = [0, T, ..., B*T]; packed documents add boundaries inside rows).
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace ievo {

struct Batch {
  Tensor inputs;      // [N] i32 token ids
  Tensor targets;     // [N] i32 next-token ids, -100 = ignored
  Tensor positions;   // [N] i32 position of each token within its sequence
  Tensor cu_seqlens;  // [S+1] i32
  int max_seqlen = 0;

  int64_t num_tokens() const { return inputs.numel(); }
  int64_t num_targets() const;  // targets that are not -100
  Batch to(Device d) const;
};

// B rows of T+1 tokens each ([B*(T+1)], row-major) -> inputs = row[0..T), targets = row[1..T].
Batch make_batch(const std::vector<int32_t>& rows, int64_t B, int64_t T);

}  // namespace ievo
