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
  Tensor cu_seqlens_host;  // the same on the host once the batch is on a device (to(): attention
                           // reads the boundaries there, without a device round trip)
  Tensor inputs_host;      // likewise the ids (the embedding checks them there) and the targets
  Tensor targets_host;     // (num_targets counts them there)
  int max_seqlen = 0;

  int64_t num_tokens() const { return inputs.numel(); }
  int64_t num_targets() const;  // targets that are not -100
  Batch to(Device d) const;
};

// B rows of T+1 tokens each ([B*(T+1)], row-major) -> inputs = row[0..T), targets = row[1..T].
Batch make_batch(const std::vector<int32_t>& rows, int64_t B, int64_t T);

// Packed rows (data.packing): the same B rows of T+1 tokens plus, per row, the ascending offsets
// t in [1, T] at which token t begins a new document (data/packed_dataset.h). Following
// Megatron's reset_position_ids + reset_attention_mask + eod_mask_loss and InternEvo's packed
// samples:
//   - each row is cut at its document starts t < T: cu_seqlens gets a boundary there, so a
//     document attends only to itself (max_seqlen = the longest piece);
//   - positions restart at 0 in every piece (RoPE is relative, so a piece that continues a
//     document from the previous row is unaffected by where it starts);
//   - input t whose next token t+1 starts a document (the EOD that preprocess appends) gets
//     target -100: the next document's first token is never predicted from the previous
//     document. Every other target is the next token, as in make_batch, so the loss counts the
//     real next-token predictions only and equals the sum of the documents' losses one by one.
Batch make_packed_batch(const std::vector<int32_t>& rows,
                        const std::vector<std::vector<int32_t>>& doc_starts, int64_t B, int64_t T);

}  // namespace ievo
