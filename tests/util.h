// Helpers shared by the tests: paths, temporary directories, running the ievo binary, comparing
// tensors with relative L2 error.
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace ievo::test {

std::string source_dir();   // $IEVO_SOURCE_DIR (set by ctest) or the configured source dir
std::string ievo_binary();  // $IEVO_BINARY or <build>/ievo
// "OMP_NUM_THREADS=1 timeout -k 5 120 mpirun ... -np N <ievo>": the start of a shell command that
// runs the ievo binary on N ranks (as CI does: as root, oversubscribed), bounded to 2 minutes.
std::string mpirun_ievo(int np);
std::string fixture_dir(const std::string& name);  // tests/fixtures/<name>
// A fresh, empty directory under the system temp dir, removed at exit.
std::string temp_dir(const std::string& tag);
// Runs a shell command; returns its exit status and fills *output with stdout+stderr.
int run_command(const std::string& cmd, std::string* output = nullptr);
// ||a - b|| / max(||b||, tiny), any dtypes/devices.
double rel_l2(const Tensor& a, const Tensor& b);
double max_abs_diff(const Tensor& a, const Tensor& b);
// Random tensor (uniform in [lo, hi)), deterministic from seed, f32 or f64, on the CPU.
Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo = -1, double hi = 1);
std::string read_file(const std::string& path);
// True when this build has CUDA and a device is visible (GPU tests skip otherwise).
bool gpu_available();

#define IEVO_REQUIRE_GPU()                                                                      \
  do {                                                                                          \
    if (!::ievo::test::gpu_available()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)"; \
  } while (0)

}  // namespace ievo::test
