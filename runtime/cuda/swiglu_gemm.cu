// Dispatch of the SwiGLU GEMMs (swiglu_gemm.h): checks, the Hopper probe, the tile configuration.
#include "runtime/cuda/swiglu_gemm.h"

#include <cstdlib>

#include "runtime/cuda/swiglu_gemm_kernels.cuh"

namespace ievo::cuda::swiglu_gemm {
namespace detail {

int sm_count() {
  static const int n = [] {
    int dev = 0, c = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 0;
    return c;
  }();
  return n;
}

}  // namespace detail

namespace {

bool ok_rows(const void* p, int64_t ld) {
  return p && reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0;
}

int& config_ref() {
  static int c = [] {
    const char* e = std::getenv("IEVO_SWIGLU_GEMM_CONFIG");
    return e && *e ? std::atoi(e) : 0;
  }();
  return c;
}

bool fits(int64_t m, int64_t n, int64_t k) {
  return m > 0 && n > 0 && k > 0 && n % 8 == 0 && k % 8 == 0 && m < (int64_t{1} << 31) &&
         n < (int64_t{1} << 31) && k < (int64_t{1} << 31);
}

}  // namespace

int config() { return config_ref(); }
void set_config(int c) { config_ref() = c; }

bool available() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    return major == 9;
  }();
  return ok;
}

bool forward(Rows x, Rows w, Rows gate, void* up, int64_t ld_up, void* h, int64_t ld_h, int64_t m,
             int64_t n, int64_t k, cudaStream_t stream) {
  if (!available() || !fits(m, n, k) || !ok_rows(x.p, x.ld) || !ok_rows(w.p, w.ld) ||
      !ok_rows(gate.p, gate.ld) || !ok_rows(up, ld_up) || !ok_rows(h, ld_h))
    return false;
  return detail::forward_config(config(), x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
}

bool backward(Rows dy, Rows w, Rows gate, Rows up, void* dgate, int64_t ld_dgate, void* dup,
              int64_t ld_dup, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (!available() || !fits(m, n, k) || !ok_rows(dy.p, dy.ld) || !ok_rows(w.p, w.ld) ||
      !ok_rows(gate.p, gate.ld) || !ok_rows(up.p, up.ld) || !ok_rows(dgate, ld_dgate) ||
      !ok_rows(dup, ld_dup))
    return false;
  return detail::backward_config(config(), dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k,
                                 stream);
}

bool plain_gemm(Rows x, Rows w, void* out, int64_t ld_out, int64_t m, int64_t n, int64_t k,
                cudaStream_t stream) {
  if (!available() || !fits(m, n, k) || !ok_rows(x.p, x.ld) || !ok_rows(w.p, w.ld) || !ok_rows(out, ld_out))
    return false;
  return detail::plain_gemm(x, w, out, ld_out, m, n, k, stream);
}

}  // namespace ievo::cuda::swiglu_gemm
