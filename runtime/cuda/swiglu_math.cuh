// SwiGLU's elementwise maths on one element, fp32, shared by the SwiGLU kernels (ops/swiglu.cu)
// and the GEMM epilogues that fuse it (cuda/swiglu_gemm.cu), so both give the same bits:
//   sig = 1 / (1 + exp(-g)),  h = g * sig * u
//   dgate = dh * u * sig * (1 + g * (1 - sig)),  dup = dh * g * sig
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ievo::cuda {

__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float swiglu_fwd_one(float g, float u) {
  return g * swiglu_sigmoid(g) * u;
}

__device__ __forceinline__ void swiglu_bwd_one(float dh, float g, float u, float& dg, float& du) {
  const float s = swiglu_sigmoid(g);
  dg = dh * u * (s * (1.0f + g * (1.0f - s)));
  du = dh * (g * s);
}

// x rounded to bf16 and back: a GEMM's bf16 output as the SwiGLU kernels would read it.
__device__ __forceinline__ float round_to_bf16(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

}  // namespace ievo::cuda
