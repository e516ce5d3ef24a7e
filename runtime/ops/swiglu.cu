// SwiGLU on the GPU (see swiglu.h), fp32 arithmetic, 16-byte packs when aligned:
//   sig = 1 / (1 + exp(-g)),  out = g * sig * u
//   dgate = dout * u * sig * (1 + g * (1 - sig)),  dup = dout * g * sig
// Every element is read before it is written by the same thread: dgate/dup may alias gate/up.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T, int N>
__global__ void swiglu_fwd(const T* g, const T* u, T* o, int64_t n) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t i = t; i < nvec; i += stride) {
    auto pg = load_pack<T, N>(g + i * N);
    auto pu = load_pack<T, N>(u + i * N);
    Pack<T, N> po;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float x = to_f(pg.v[k]);
      po.v[k] = from_f<T>(x * sigmoid(x) * to_f(pu.v[k]));
    }
    store_pack<T, N>(o + i * N, po);
  }
  for (int64_t j = nvec * N + t; j < n; j += stride) {
    const float x = to_f(g[j]);
    o[j] = from_f<T>(x * sigmoid(x) * to_f(u[j]));
  }
}

template <typename T, int N>
__global__ void swiglu_bwd(const T* dout, const T* g, const T* u, T* dg, T* du, int64_t n) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  auto one = [](float d, float x, float y, float& dgv, float& duv) {
    const float s = sigmoid(x);
    dgv = d * y * (s * (1.0f + x * (1.0f - s)));
    duv = d * (x * s);
  };
  for (int64_t i = t; i < nvec; i += stride) {
    auto pd = load_pack<T, N>(dout + i * N);
    auto pg = load_pack<T, N>(g + i * N);
    auto pu = load_pack<T, N>(u + i * N);
    Pack<T, N> rg, ru;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float a, b;
      one(to_f(pd.v[k]), to_f(pg.v[k]), to_f(pu.v[k]), a, b);
      rg.v[k] = from_f<T>(a);
      ru.v[k] = from_f<T>(b);
    }
    store_pack<T, N>(dg + i * N, rg);
    store_pack<T, N>(du + i * N, ru);
  }
  for (int64_t j = nvec * N + t; j < n; j += stride) {
    float a, b;
    one(to_f(dout[j]), to_f(g[j]), to_f(u[j]), a, b);
    dg[j] = from_f<T>(a);
    du[j] = from_f<T>(b);
  }
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  expect_cuda(t, name, op);
  check_shape(t, ref.shape(), name);
  check_dtype(t, ref.dtype(), name);
}

bool all_aligned(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (!aligned_to(p, 16)) return false;
  return true;
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const char* op = "swiglu_forward";
  expect_cuda(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(out, gate, "out", op);
  const int64_t n = gate.numel();
  if (n == 0) return;
  cudaStream_t s = current_stream();
  dispatch_fp(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    const T *g = gate.data<T>(), *u = up.data<T>();
    T* o = out.data<T>();
    if (all_aligned({g, u, o}))
      launch_kernel("swiglu_fwd", swiglu_fwd<T, N>, grid_for(n / N + 1, 256), 256, 0, s, g, u, o, n);
    else
      launch_kernel("swiglu_fwd", swiglu_fwd<T, 1>, grid_for(n, 256), 256, 0, s, g, u, o, n);
  });
}

void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup) {
  const char* op = "swiglu_backward";
  expect_cuda(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(dout, gate, "dout", op);
  check_like(dgate, gate, "dgate", op);
  check_like(dup, gate, "dup", op);
  const int64_t n = gate.numel();
  if (n == 0) return;
  cudaStream_t s = current_stream();
  dispatch_fp(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    const T *d = dout.data<T>(), *g = gate.data<T>(), *u = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
    if (all_aligned({d, g, u, dg, du}))
      launch_kernel("swiglu_bwd", swiglu_bwd<T, N>, grid_for(n / N + 1, 256), 256, 0, s, d, g, u, dg, du, n);
    else
      launch_kernel("swiglu_bwd", swiglu_bwd<T, 1>, grid_for(n, 256), 256, 0, s, d, g, u, dg, du, n);
  });
}

}  // namespace ievo::ops::cuda
