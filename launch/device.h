// Device selection for the launcher: initialises the CUDA backend when built with it, and a
// device-wide synchronisation for timing. Without CUDA, asking for it is a clear error.
#pragma once
#include "runtime/dtype.h"

namespace ievo {

// Selects the GPU of this rank; `deterministic` picks kernels that give bit-identical results run
// to run (run.deterministic).
void init_device(int local_rank, bool deterministic = false);
void sync_device(Device d);

}  // namespace ievo
