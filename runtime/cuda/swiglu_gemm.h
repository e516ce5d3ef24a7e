// GEMMs with SwiGLU in their epilogue (CUTLASS 3 Hopper kernels: TMA, warp-specialised,
// persistent; runtime/cuda/swiglu_gemm.cu, built when the CUTLASS headers are found, see
// runtime/CMakeLists.txt). bf16 in and out, fp32 accumulation; all matrices row-major with the
// given row strides (multiples of 8 elements, 16-byte aligned pointers).
//
//   forward:  up = x W^T, h = silu(gate) * up        x [M, K], W [N, K], gate/up/h [M, N]
//   backward: dh = dy W (never stored), dgate = dh * up * silu'(gate), dup = dh * silu(gate)
//                                                     dy [M, K], W [K, N], gate/up/dgate/dup [M, N]
//             (dgate may be gate's buffer and dup up's: each element is read before it is written)
// The epilogue rounds the accumulator to bf16 first and then applies swiglu_math.cuh, so h, dgate
// and dup are bit-identical to a GEMM's bf16 output followed by the SwiGLU kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ievo::cuda::swiglu_gemm {

// Built with CUTLASS, an sm_90a image in the binary and a Hopper GPU (probed once).
bool available();

struct Rows {  // a row-major bf16 matrix: base pointer and row stride in elements
  const void* p;
  int64_t ld;
};

// The tile configuration: 0 cooperative 128x256, 1 ping-pong 128x128 (both clusters of 2 along
// M); IEVO_SWIGLU_GEMM_CONFIG sets it at start, set_config in benchmarks.
int config();
void set_config(int c);

// Each returns false (and launches nothing) when the kernel cannot take the operands (alignment,
// sizes); the caller then runs the unfused path.
bool forward(Rows x, Rows w, Rows gate, void* up, int64_t ld_up, void* h, int64_t ld_h, int64_t m,
             int64_t n, int64_t k, cudaStream_t stream);
bool backward(Rows dy, Rows w, Rows gate, Rows up, void* dgate, int64_t ld_dgate, void* dup,
              int64_t ld_dup, int64_t m, int64_t n, int64_t k, cudaStream_t stream);

// out = x W^T by the same mainloop as config 0 with CUTLASS's plain epilogue (a benchmark's
// baseline: what the SwiGLU epilogue costs).
bool plain_gemm(Rows x, Rows w, void* out, int64_t ld_out, int64_t m, int64_t n, int64_t k,
                cudaStream_t stream);

}  // namespace ievo::cuda::swiglu_gemm
