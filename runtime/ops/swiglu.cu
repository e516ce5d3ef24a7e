// SwiGLU on the GPU (see swiglu.h), fp32 arithmetic, 16-byte packs when aligned:
//   sig = 1 / (1 + exp(-g)),  out = g * sig * u
//   dgate = dout * u * sig * (1 + g * (1 - sig)),  dup = dout * g * sig
// Every element is read before it is written by the same thread: dgate/dup may alias gate/up.
// Each tensor may have its own row stride (gate and up as the two halves of a joint gate/up
// GEMM's output).
#include <algorithm>
#include <utility>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/row_layout.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The tensors are [rows, cols] with row strides in elements (gs, us, ...; row_layout.h); a
// contiguous call is one row of every element. Blocks: x over a row's packs of N elements, y over
// rows (both grid-stride); a row's last cols % N elements are done one by one.

template <typename T, int N>
__global__ void swiglu_fwd(const T* g, const T* u, T* o, Rows d, int64_t gs, int64_t us, int64_t os) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = d.cols / N;
  for (int64_t r = blockIdx.y; r < d.rows; r += gridDim.y) {
    const T* gr = g + r * gs;
    const T* ur = u + r * us;
    T* orow = o + r * os;
    for (int64_t i = t; i < nvec; i += stride) {
      auto pg = load_pack<T, N>(gr + i * N);
      auto pu = load_pack<T, N>(ur + i * N);
      Pack<T, N> po;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float x = to_f(pg.v[k]);
        po.v[k] = from_f<T>(x * sigmoid(x) * to_f(pu.v[k]));
      }
      store_pack<T, N>(orow + i * N, po);
    }
    for (int64_t j = nvec * N + t; j < d.cols; j += stride) {
      const float x = to_f(gr[j]);
      orow[j] = from_f<T>(x * sigmoid(x) * to_f(ur[j]));
    }
  }
}

struct BwdStrides {
  int64_t dout, g, u, dg, du;
};

template <typename T, int N>
__global__ void swiglu_bwd(const T* dout, const T* g, const T* u, T* dg, T* du, Rows d, BwdStrides s) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = d.cols / N;
  auto one = [](float dv, float x, float y, float& dgv, float& duv) {
    const float sg = sigmoid(x);
    dgv = dv * y * (sg * (1.0f + x * (1.0f - sg)));
    duv = dv * (x * sg);
  };
  for (int64_t r = blockIdx.y; r < d.rows; r += gridDim.y) {
    const T* dr = dout + r * s.dout;
    const T* gr = g + r * s.g;
    const T* ur = u + r * s.u;
    T* dgr = dg + r * s.dg;
    T* dur = du + r * s.du;
    for (int64_t i = t; i < nvec; i += stride) {
      auto pd = load_pack<T, N>(dr + i * N);
      auto pg = load_pack<T, N>(gr + i * N);
      auto pu = load_pack<T, N>(ur + i * N);
      Pack<T, N> rg, ru;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float a, b;
        one(to_f(pd.v[k]), to_f(pg.v[k]), to_f(pu.v[k]), a, b);
        rg.v[k] = from_f<T>(a);
        ru.v[k] = from_f<T>(b);
      }
      store_pack<T, N>(dgr + i * N, rg);
      store_pack<T, N>(dur + i * N, ru);
    }
    for (int64_t j = nvec * N + t; j < d.cols; j += stride) {
      float a, b;
      one(to_f(dr[j]), to_f(gr[j]), to_f(ur[j]), a, b);
      dgr[j] = from_f<T>(a);
      dur[j] = from_f<T>(b);
    }
  }
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* op) {
  expect_cuda_rows(t, name, op);
  check_shape(t, ref.shape(), name);
  check_dtype(t, ref.dtype(), name);
}

// 16-byte packs need every row start 16-byte aligned.
template <typename T>
bool packs_fit(const Rows& d, std::initializer_list<std::pair<const void*, int64_t>> ps) {
  constexpr int N = 16 / sizeof(T);
  for (const auto& [p, st] : ps)
    if (!aligned_to(p, 16) || (d.rows > 1 && st % N != 0)) return false;
  return true;
}

dim3 grid_rows(const Rows& d, int64_t per_thread) {
  const int64_t packs = (d.cols + per_thread - 1) / per_thread;
  const unsigned y = static_cast<unsigned>(std::min<int64_t>(d.rows, 65535));
  const unsigned x = grid_for(packs, 256, std::max<int64_t>(1, 65536 / y));
  return dim3(x, y);
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const char* op = "swiglu_forward";
  expect_cuda_rows(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(out, gate, "out", op);
  if (gate.numel() == 0) return;
  const Rows d = rows_of({&gate, &up, &out});
  const int64_t gs = stride_of(gate, d), us = stride_of(up, d), os = stride_of(out, d);
  cudaStream_t s = current_stream();
  dispatch_fp(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    const T *g = gate.data<T>(), *u = up.data<T>();
    T* o = out.data<T>();
    if (packs_fit<T>(d, {{g, gs}, {u, us}, {o, os}}))
      launch_kernel("swiglu_fwd", swiglu_fwd<T, N>, grid_rows(d, N), 256, 0, s, g, u, o, d, gs, us, os);
    else
      launch_kernel("swiglu_fwd", swiglu_fwd<T, 1>, grid_rows(d, 1), 256, 0, s, g, u, o, d, gs, us, os);
  });
}

void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup) {
  const char* op = "swiglu_backward";
  expect_cuda_rows(gate, "gate", op);
  check_like(up, gate, "up", op);
  check_like(dout, gate, "dout", op);
  check_like(dgate, gate, "dgate", op);
  check_like(dup, gate, "dup", op);
  if (gate.numel() == 0) return;
  const Rows d = rows_of({&dout, &gate, &up, &dgate, &dup});
  const BwdStrides st{stride_of(dout, d), stride_of(gate, d), stride_of(up, d), stride_of(dgate, d),
                      stride_of(dup, d)};
  cudaStream_t s = current_stream();
  dispatch_fp(gate.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    const T *dd = dout.data<T>(), *g = gate.data<T>(), *u = up.data<T>();
    T *dg = dgate.data<T>(), *du = dup.data<T>();
    if (packs_fit<T>(d, {{dd, st.dout}, {g, st.g}, {u, st.u}, {dg, st.dg}, {du, st.du}}))
      launch_kernel("swiglu_bwd", swiglu_bwd<T, N>, grid_rows(d, N), 256, 0, s, dd, g, u, dg, du, d, st);
    else
      launch_kernel("swiglu_bwd", swiglu_bwd<T, 1>, grid_rows(d, 1), 256, 0, s, dd, g, u, dg, du, d, st);
  });
}

}  // namespace ievo::ops::cuda
