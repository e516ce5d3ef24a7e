// Device selection for the launcher: initialises the CUDA backend when built with it, and a
// device-wide synchronisation for timing. Without CUDA, asking for it is a clear error.
#pragma once
#include "runtime/dtype.h"

namespace ievo {

void init_device(int local_rank);
void sync_device(Device d);

}  // namespace ievo
