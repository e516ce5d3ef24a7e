// Helpers shared by the GPU tests over NCCL (tests/test_gpu_nccl.cpp, test_gpu_zero_overlap.cpp):
// a world of the MPI processes (one, as a singleton, outside mpirun), skipped without a GPU.
#pragma once
#include <gtest/gtest.h>

#include <memory>

#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "runtime/error.h"
#include "util.h"

namespace ievo::test {

// NCCL over MPI_COMM_WORLD.
inline std::unique_ptr<Communicator> nccl_world() {
#ifdef IEVO_CUDA
  return make_nccl_communicator(MPI_COMM_WORLD);
#else
  IEVO_FAIL("a CPU-only build has no NCCL");
#endif
}

// A test that needs a CUDA device: skipped without one (or in a CPU-only build).
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override { IEVO_REQUIRE_GPU(); }
};

// main() of such a test binary: MPI only where a GPU is (every test skips otherwise).
inline int gpu_mpi_main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!gpu_available()) return RUN_ALL_TESTS();
  MpiSession mpi(&argc, &argv, /*force=*/true);  // a singleton world when not under mpirun
  return RUN_ALL_TESTS();
}

}  // namespace ievo::test
