// Global <-> per-rank parameter state under tensor and pipeline parallelism (models/shard.h).
// Training starts from global tensors (init or HF weights, identical on every rank) and
// checkpoints hold global tensors under their global names and shapes, whatever the layout that
// wrote them; a rank keeps only its slices (ParamSpec::global_shape / split_dim / split_offset).
// So any checkpoint resumes on any tp / pp / dp / ZeRO layout: each rank reads the whole tensors
// and keeps its slices.
#pragma once
#include <functional>
#include <vector>

#include "models/params.h"
#include "parallel/communicator.h"

namespace ievo {

// This rank's slices of global host tensors (any dtype), as a new host store of `local` specs.
ParamStore local_slices(const ParamStore& global, const std::vector<ParamSpec>& local);

// Collective over the model-parallel group `mp` (host tensors, MPI): every rank passes its local
// host stores (same specs in each, e.g. master weights and the two Adam moments); on `root`,
// `global` (stores of the global specs, same count) receive every rank's slices. specs_of(r) is
// model-parallel rank r's local spec list. A tensor several ranks hold (replicated norms, the
// tied embedding's copy) is taken from the lowest rank that holds it.
void gather_global(Communicator& mp, const std::vector<const ParamStore*>& local,
                   const std::function<std::vector<ParamSpec>(int)>& specs_of,
                   const std::vector<ParamStore*>& global, int root);

}  // namespace ievo
