// ZeroOptimizer::state_pieces (parallel/zero.h): this rank's segments of the master weights and
// Adam moments as (parameter, element range, views), for the sharded checkpoint writer. No
// communication: every rank describes what it alone owns.
#include "parallel/zero.h"

namespace ievo {

std::vector<ZeroOptimizer::StatePiece> ZeroOptimizer::state_pieces() {
  wait_weight_gathers();  // the master may be the weights (fp32), still being gathered
  std::vector<StatePiece> out;
  out.reserve(segments_.size());
  for (const Segment& s : segments_) {
    const ZeroBucket& B = layout_.buckets[static_cast<size_t>(s.bucket)];
    // The piece starts at element shard_rank_ * piece of the bucket; the tensor at its offset
    // in the ParamStore layout minus the bucket's start.
    const int64_t tensor_start = weights_.offset(s.param) - B.lo;
    const int64_t begin = shard_rank_ * B.piece + s.start - tensor_start;
    auto part = [&](Tensor piece) { return piece.slice(0, s.start, s.start + s.len); };
    // With remainders the master is joined on the host (the writer copies every piece there).
    out.push_back({s.param, begin, begin + s.len, master_copy(s.bucket, s.start, s.len, Device::CPU),
                   part(shard_piece(m_, s.bucket)), part(shard_piece(v_, s.bucket))});
  }
  return out;
}

}  // namespace ievo
