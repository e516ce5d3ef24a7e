#include "launch/device.h"

#include "runtime/error.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace ievo {

void init_device(int local_rank, bool deterministic) {
#ifdef IEVO_CUDA
  IEVO_CHECK(cuda::available(), "run.device: cuda, but no CUDA device is visible");
  cuda::init(local_rank);
  cuda::set_deterministic(deterministic);
#else
  (void)local_rank;
  (void)deterministic;
  IEVO_FAIL("run.device: cuda, but this ievo was built without CUDA (rebuild with nvcc present)");
#endif
}

void sync_device(Device d) {
#ifdef IEVO_CUDA
  if (d == Device::CUDA) cuda::synchronize();
#else
  (void)d;
#endif
}

}  // namespace ievo
