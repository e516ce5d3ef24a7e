// Device-side helpers shared by the CUDA op kernels (runtime/ops/*.cu, runtime/cuda/*.cu):
// element types, packed 16-byte loads, warp/block reductions with a fixed order (so results are
// bit-identical run to run), argument checks and launch sizes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"
#include "runtime/tensor.h"

namespace ievo::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

// ---- element conversions (arithmetic is fp32) ----
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

// N elements of T loaded/stored as one aligned vector (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ---- reductions (fixed shuffle/tree order: deterministic) ----
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` holds >= 32 values. Contains __syncthreads: call from all threads.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may be in use by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(r);
}
__device__ inline float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(r);
}

// ---- programmatic dependent launch (Hopper and newer) ----
// launch_kernel() below lets a kernel launch before the work ahead of it on its stream has
// finished, so its launch and its blocks' start overlap that work's end instead of following it
// (~1-2 us at each kernel boundary otherwise). Every kernel launched that way must call pdl_wait()
// before its first access to global memory: it returns once the previous grid has completed and
// its writes are visible. pdl_trigger() then lets the next such kernel launch while this one
// still runs (its blocks wait in their own pdl_wait()). Both are no-ops in a normal launch and
// before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The first statement of a kernel that launch_kernel() starts.
__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  pdl_trigger();
}

// ---- host-side helpers ----
// kernel<<<grid, block, smem, stream>>>(args...), checked, with programmatic dependent launch when
// programmatic_launch() (the kernel must begin with pdl_begin()); errors name the kernel.
template <typename... P, typename... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch() ? 1 : 0;
  (void)cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);  // its error: cudaGetLastError
  check_launch(name, __FILE__, __LINE__);
}

// A defined, contiguous tensor on the GPU.
inline void expect_cuda(const Tensor& t, const char* name, const char* op) {
  IEVO_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  IEVO_CHECK(t.device() == Device::CUDA, op, ": tensor '", name, "' is on ",
             device_name(t.device()), " while the other arguments are on cuda");
  IEVO_CHECK(t.is_contiguous(), op, ": tensor '", name, "' (", t.describe(),
             ") must be contiguous");
}
// As expect_cuda, but the rows (first dimension) may be strided: Tensor::rows_contiguous().
inline void expect_cuda_rows(const Tensor& t, const char* name, const char* op) {
  IEVO_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  IEVO_CHECK(t.device() == Device::CUDA, op, ": tensor '", name, "' is on ",
             device_name(t.device()), " while the other arguments are on cuda");
  IEVO_CHECK(t.rows_contiguous(), op, ": tensor '", name, "' (", t.describe(), ", strides ",
             shape_str(t.strides()), ") must be contiguous but for its row stride");
}
inline void expect_dtype_in(const Tensor& t, const char* name, const char* op,
                            std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype() == d) return;
  IEVO_FAIL(op, ": tensor '", name, "' has dtype ", dtype_name(t.dtype()),
            ", not supported by the CUDA kernel");
}

// Grid for a grid-stride loop over n items with `threads` per block.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65536) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<unsigned>(b);
}

// Calls f(T{}) with T = float, bf16 or f16 by dtype.
template <typename F>
decltype(auto) dispatch_fp(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::BF16: return f(bf16{});
    case DType::F16: return f(f16{});
    default: IEVO_FAIL(op, ": dtype ", dtype_name(dt), " is not supported on cuda (f32, bf16, f16)");
  }
}

}  // namespace ievo::cuda
