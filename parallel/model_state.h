// Global <-> per-rank parameter state under tensor and pipeline parallelism (models/shard.h).
// Training starts from global tensors (init or HF weights, identical on every rank) and
// checkpoints hold global tensors under their global names and shapes, whatever the layout that
// wrote them; a rank keeps only its slices (ParamSpec::global_shape / split_dim / split_offset).
// So any checkpoint resumes on any tp / pp / dp / ZeRO layout: each rank reads the whole tensors
// and keeps its slices. (Writing: every rank writes its own pieces, launch/checkpoint_shards.h.)
#pragma once
#include <vector>

#include "models/params.h"

namespace ievo {

// This rank's slices of global host tensors (any dtype), as a new host store of `local` specs.
ParamStore local_slices(const ParamStore& global, const std::vector<ParamSpec>& local);

}  // namespace ievo
