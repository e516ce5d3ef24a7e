#include "launch/device.h"

#include "runtime/error.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda_runtime.h"
#endif

namespace ievo {

void init_device(int local_rank) {
#ifdef IEVO_CUDA
  IEVO_CHECK(cuda::available(), "run.device: cuda, but no CUDA device is visible");
  cuda::init(local_rank);
#else
  (void)local_rank;
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
