// SwiGLU on the GPU (see swiglu.h), fp32 arithmetic, 16-byte packs when aligned:
//   sig = 1 / (1 + exp(-g)),  out = g * sig * u
//   dgate = dout * u * sig * (1 + g * (1 - sig)),  dup = dout * g * sig
// Every element is read before it is written by the same thread: dgate/dup may alias gate/up.
#include <cstdlib>
#include <string>

#include "runtime/cuda/kernels.cuh"
#include "runtime/cuda/swiglu_math.cuh"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/matmul.h"
#ifdef IEVO_HAVE_CUTLASS
#include "runtime/cuda/swiglu_gemm.h"
#endif

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

template <typename T, int N>
__global__ void swiglu_fwd(const T* g, const T* u, T* o, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t i = t; i < nvec; i += stride) {
    auto pg = load_pack<T, N>(g + i * N);
    auto pu = load_pack<T, N>(u + i * N);
    Pack<T, N> po;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      po.v[k] = from_f<T>(swiglu_fwd_one(to_f(pg.v[k]), to_f(pu.v[k])));
    }
    store_pack<T, N>(o + i * N, po);
  }
  for (int64_t j = nvec * N + t; j < n; j += stride) {
    o[j] = from_f<T>(swiglu_fwd_one(to_f(g[j]), to_f(u[j])));
  }
}

template <typename T, int N>
__global__ void swiglu_bwd(const T* dout, const T* g, const T* u, T* dg, T* du, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t i = t; i < nvec; i += stride) {
    auto pd = load_pack<T, N>(dout + i * N);
    auto pg = load_pack<T, N>(g + i * N);
    auto pu = load_pack<T, N>(u + i * N);
    Pack<T, N> rg, ru;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float a, b;
      swiglu_bwd_one(to_f(pd.v[k]), to_f(pg.v[k]), to_f(pu.v[k]), a, b);
      rg.v[k] = from_f<T>(a);
      ru.v[k] = from_f<T>(b);
    }
    store_pack<T, N>(dg + i * N, rg);
    store_pack<T, N>(du + i * N, ru);
  }
  for (int64_t j = nvec * N + t; j < n; j += stride) {
    float a, b;
    swiglu_bwd_one(to_f(dout[j]), to_f(g[j]), to_f(u[j]), a, b);
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
    if (all_aligned({g, u, o})) swiglu_fwd<T, N><<<grid_for(n / N + 1, 256), 256, 0, s>>>(g, u, o, n);
    else swiglu_fwd<T, 1><<<grid_for(n, 256), 256, 0, s>>>(g, u, o, n);
    IEVO_CUDA_LAUNCH_CHECK("swiglu_fwd");
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
      swiglu_bwd<T, N><<<grid_for(n / N + 1, 256), 256, 0, s>>>(d, g, u, dg, du, n);
    else
      swiglu_bwd<T, 1><<<grid_for(n, 256), 256, 0, s>>>(d, g, u, dg, du, n);
    IEVO_CUDA_LAUNCH_CHECK("swiglu_bwd");
  });
}

// ---- GEMM + SwiGLU (runtime/cuda/swiglu_gemm.h) ----
namespace {

bool& fused_on() {
  static bool on = [] {
    const char* e = std::getenv("IEVO_FUSED_SWIGLU");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// The [N, F] operands of a fused call: same shape and dtype as `ref`, on the GPU.
void check_mn(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  check_like(t, ref, name, op);
  IEVO_CHECK(t.dim() == 2 && t.strides()[1] == 1, op, ": tensor '", name, "' must be 2-D with unit column stride");
}

}  // namespace

bool fused_swiglu_available() {
#ifdef IEVO_HAVE_CUTLASS
  return ievo::cuda::swiglu_gemm::available();
#else
  return false;
#endif
}

void set_fused_swiglu(bool on) { fused_on() = on; }

void set_fused_swiglu_config([[maybe_unused]] int config) {
#ifdef IEVO_HAVE_CUTLASS
  ievo::cuda::swiglu_gemm::set_config(config);
#endif
}

bool fused_swiglu_baseline_gemm([[maybe_unused]] const Tensor& x, [[maybe_unused]] const Tensor& w,
                                [[maybe_unused]] Tensor& out) {
#ifdef IEVO_HAVE_CUTLASS
  if (x.dtype() != DType::BF16) return false;
  const MatmulDims d = matmul_dims(x, false, w, true, out);
  const bool ran = ievo::cuda::swiglu_gemm::plain_gemm({x.raw(), d.lda}, {w.raw(), d.ldb}, out.raw(),
                                                       d.ldc, d.m, d.n, d.k, current_stream());
  if (ran) IEVO_CUDA_LAUNCH_CHECK("swiglu_gemm plain");
  return ran;
#else
  return false;
#endif
}

bool linear_swiglu_forward(const Tensor& x, const Tensor& w_up, const Tensor& gate, Tensor& up,
                           Tensor& out) {
  const char* op = "linear_swiglu_forward";
  if (!fused_on() || x.dtype() != DType::BF16 || !fused_swiglu_available()) return false;
  const MatmulDims d = matmul_dims(x, false, w_up, true, up);
  check_mn(up, up, "up", op);
  check_mn(gate, up, "gate", op);
  check_mn(out, up, "out", op);
  if (d.m == 0 || d.n == 0) return false;
#ifdef IEVO_HAVE_CUTLASS
  namespace sg = ievo::cuda::swiglu_gemm;
  const bool ran = sg::forward({x.raw(), d.lda}, {w_up.raw(), d.ldb}, {gate.raw(), gate.strides()[0]},
                               up.raw(), d.ldc, out.raw(), out.strides()[0], d.m, d.n, d.k,
                               current_stream());
  if (ran) IEVO_CUDA_LAUNCH_CHECK("swiglu_gemm forward");
  return ran;
#else
  return false;
#endif
}

bool linear_swiglu_backward(const Tensor& dy, const Tensor& w_down, const Tensor& gate,
                            const Tensor& up, Tensor& dgate, Tensor& dup) {
  const char* op = "linear_swiglu_backward";
  if (!fused_on() || dy.dtype() != DType::BF16 || !fused_swiglu_available()) return false;
  const MatmulDims d = matmul_dims(dy, false, w_down, false, dgate);
  check_mn(dgate, dgate, "dgate", op);
  check_mn(gate, dgate, "gate", op);
  check_mn(up, dgate, "up", op);
  check_mn(dup, dgate, "dup", op);
  if (d.m == 0 || d.n == 0) return false;
#ifdef IEVO_HAVE_CUTLASS
  namespace sg = ievo::cuda::swiglu_gemm;
  const bool ran = sg::backward({dy.raw(), d.lda}, {w_down.raw(), d.ldb},
                                {gate.raw(), gate.strides()[0]}, {up.raw(), up.strides()[0]},
                                dgate.raw(), d.ldc, dup.raw(), dup.strides()[0], d.m, d.n, d.k,
                                current_stream());
  if (ran) IEVO_CUDA_LAUNCH_CHECK("swiglu_gemm backward");
  return ran;
#else
  return false;
#endif
}

}  // namespace ievo::ops::cuda
