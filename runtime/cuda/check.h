// Error checks for CUDA runtime / cuBLAS(Lt) calls: each failure throws ievo::Error naming the
// call, the library's error string and the source location.
//   IEVO_CUDA_CHECK(cudaMemcpyAsync(...));
//   kernel<<<g, b, 0, stream>>>(...); IEVO_CUDA_LAUNCH_CHECK("kernel");
// IEVO_CUDA_LAUNCH_CHECK also synchronizes the stream when IEVO_CUDA_SYNC=1 is set in the
// environment, so asynchronous faults are reported at the kernel that caused them.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "runtime/error.h"

namespace ievo::cuda {
const char* cublas_status_name(cublasStatus_t s);
bool sync_after_launch();  // IEVO_CUDA_SYNC=1
// Whether ievo's kernels are launched with programmatic dependent launch (kernels.cuh,
// launch_kernel()):
// on a Hopper or newer device unless IEVO_PDL=0.
bool programmatic_launch();
void check_launch(const char* kernel, const char* file, int line);
}  // namespace ievo::cuda

#define IEVO_CUDA_CHECK(call)                                                                \
  do {                                                                                       \
    cudaError_t ievo_e_ = (call);                                                            \
    if (ievo_e_ != cudaSuccess)                                                              \
      IEVO_FAIL("CUDA error in ", #call, ": ", cudaGetErrorName(ievo_e_), " (",               \
                cudaGetErrorString(ievo_e_), ") [", __FILE__, ":", __LINE__, "]");           \
  } while (0)

#define IEVO_CUBLAS_CHECK(call)                                                              \
  do {                                                                                       \
    cublasStatus_t ievo_s_ = (call);                                                         \
    if (ievo_s_ != CUBLAS_STATUS_SUCCESS)                                                    \
      IEVO_FAIL("cuBLAS error in ", #call, ": ", ::ievo::cuda::cublas_status_name(ievo_s_),   \
                " [", __FILE__, ":", __LINE__, "]");                                         \
  } while (0)

#define IEVO_CUDA_LAUNCH_CHECK(kernel_name) ::ievo::cuda::check_launch(kernel_name, __FILE__, __LINE__)
