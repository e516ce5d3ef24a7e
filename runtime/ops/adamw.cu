// AdamW on the GPU (see adamw.h): fp32 param, m, v; grad f32, bf16 or f16; optional bf16/f16 copy
// of the updated param. Element order and scalar rounding follow the CPU op (torch's
// single-tensor path): p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = v b2 + (1 - b2) g^2;
// p += (-lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps).
#include <cmath>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

struct Scalars {
  float decay, w1, b2, w2, eps, c2, neg_step, gs;
};

__device__ __forceinline__ float lerp_torch(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

// One element's update (torch.optim.AdamW's arithmetic, in fp32).
__device__ __forceinline__ void adamw_one(float& pi, float& mi, float& vi, float graw, const Scalars& k) {
  const float g = graw * k.gs;
  pi = pi * k.decay;
  mi = lerp_torch(mi, g, k.w1);
  vi = vi * k.b2 + k.w2 * g * g;
  const float denom = sqrtf(vi) / k.c2 + k.eps;
  pi = pi + k.neg_step * mi / denom;
}

// V elements per thread and iteration (V = 4: 16-byte loads of p, m, v; the tail element by
// element), the same arithmetic per element as V = 1.
template <typename G, typename L, int V>
__global__ void adamw_kernel(float* p, const G* grad, float* m, float* v, L* lowp, int64_t n,
                             Scalars k) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t np = n / V;
  for (int64_t i = first; i < np; i += stride) {
    auto pp = load_pack<float, V>(p + i * V), pm = load_pack<float, V>(m + i * V),
         pv = load_pack<float, V>(v + i * V);
    const auto pg = load_pack<G, V>(grad + i * V);
    Pack<L, V> pl;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      adamw_one(pp.v[e], pm.v[e], pv.v[e], to_f(pg.v[e]), k);
      pl.v[e] = from_f<L>(pp.v[e]);
    }
    store_pack<float, V>(p + i * V, pp);
    store_pack<float, V>(m + i * V, pm);
    store_pack<float, V>(v + i * V, pv);
    if (lowp) store_pack<L, V>(lowp + i * V, pl);
  }
  for (int64_t i = np * V + first; i < n; i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_one(pi, mi, vi, to_f(grad[i]), k);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (lowp) lowp[i] = from_f<L>(pi);
  }
}

// adamw_kernel on a master kept as (weight, remainder), split and joined by runtime/dtype.h's
// f32_split_bf16 / f32_join_bf16: V = 4 loads 8 bytes of each.
template <typename G, int V>
__global__ void adamw_remainder_kernel(uint16_t* w, int16_t* r, const G* grad, float* m, float* v, int64_t n,
                                       Scalars k) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t np = n / V;
  for (int64_t i = first; i < np; i += stride) {
    auto pw = load_pack<uint16_t, V>(w + i * V);
    auto pr = load_pack<int16_t, V>(r + i * V);
    auto pm = load_pack<float, V>(m + i * V), pv = load_pack<float, V>(v + i * V);
    const auto pg = load_pack<G, V>(grad + i * V);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float p = f32_join_bf16(pw.v[e], pr.v[e]);
      adamw_one(p, pm.v[e], pv.v[e], to_f(pg.v[e]), k);
      f32_split_bf16(p, pw.v[e], pr.v[e]);
    }
    store_pack<uint16_t, V>(w + i * V, pw);
    store_pack<int16_t, V>(r + i * V, pr);
    store_pack<float, V>(m + i * V, pm);
    store_pack<float, V>(v + i * V, pv);
  }
  for (int64_t i = np * V + first; i < n; i += stride) {
    float p = f32_join_bf16(w[i], r[i]), mi = m[i], vi = v[i];
    adamw_one(p, mi, vi, to_f(grad[i]), k);
    f32_split_bf16(p, w[i], r[i]);
    m[i] = mi;
    v[i] = vi;
  }
}

__global__ void split_kernel(const float* x, uint16_t* w, int16_t* r, int64_t n) {
  pdl_begin();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f32_split_bf16(x[i], w[i], r[i]);
}

__global__ void join_kernel(const uint16_t* w, const int16_t* r, float* x, int64_t n) {
  pdl_begin();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = f32_join_bf16(w[i], r[i]);
}

Scalars scalars(const AdamWHyper& h) {
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step)));
  return Scalars{static_cast<float>(1.0 - h.lr * h.weight_decay), static_cast<float>(1.0 - h.beta1),
                 static_cast<float>(h.beta2),  static_cast<float>(1.0 - h.beta2),
                 static_cast<float>(h.eps),    static_cast<float>(bc2_sqrt),
                 static_cast<float>(-(h.lr / bc1)), static_cast<float>(h.grad_scale)};
}

void check_moments(const Tensor& grad, const Tensor& m, const Tensor& v, const Shape& shape,
                   const AdamWHyper& h, const char* op) {
  expect_cuda(grad, "grad", op);
  expect_cuda(m, "m", op);
  expect_cuda(v, "v", op);
  check_dtype(m, DType::F32, "m");
  check_dtype(v, DType::F32, "v");
  check_shape(grad, shape, "grad");
  check_shape(m, shape, "m");
  check_shape(v, shape, "v");
  IEVO_CHECK(h.step >= 1, op, ": step must be >= 1 (1-based), got ", h.step);
}

void check_split(const Tensor& weight, const Tensor& remainder, const Shape& shape, const char* op) {
  expect_cuda(weight, "weight", op);
  expect_cuda(remainder, "remainder", op);
  check_dtype(weight, DType::BF16, "weight");
  check_dtype(remainder, DType::I16, "remainder");
  check_shape(weight, shape, "weight");
  check_shape(remainder, shape, "remainder");
}

}  // namespace

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWHyper& h,
                Tensor* param_lowp) {
  const char* op = "adamw_step";
  expect_cuda(param, "param", op);
  check_dtype(param, DType::F32, "param");
  check_moments(grad, m, v, param.shape(), h, op);
  const bool lowp = param_lowp && param_lowp->defined();
  if (lowp) {
    expect_cuda(*param_lowp, "param_lowp", op);
    check_shape(*param_lowp, param.shape(), "param_lowp");
    IEVO_CHECK(param_lowp->dtype() == DType::BF16 || param_lowp->dtype() == DType::F16, op,
               ": tensor 'param_lowp' has dtype ", dtype_name(param_lowp->dtype()),
               ", expected bf16 or f16");
  }
  const int64_t n = param.numel();
  if (n == 0) return;
  const Scalars k = scalars(h);
  cudaStream_t s = current_stream();
  const unsigned grid = grid_for(n, 256, 8192);
  dispatch_fp(grad.dtype(), op, [&](auto gtag) {
    using G = decltype(gtag);
    auto launch = [&](auto ltag, void* lp) {
      using L = decltype(ltag);
      L* low = static_cast<L*>(lp);
      const bool vec = aligned_to(param.raw(), 16) && aligned_to(m.raw(), 16) && aligned_to(v.raw(), 16) &&
                       aligned_to(grad.raw(), 4 * sizeof(G)) && (!low || aligned_to(low, 4 * sizeof(L)));
      if (vec)
        launch_kernel("adamw_kernel", adamw_kernel<G, L, 4>, grid_for(n / 4 + 1, 256, 8192), 256, 0, s,
                      param.data<float>(), grad.data<G>(), m.data<float>(), v.data<float>(), low, n, k);
      else
        launch_kernel("adamw_kernel", adamw_kernel<G, L, 1>, grid, 256, 0, s, param.data<float>(),
                      grad.data<G>(), m.data<float>(), v.data<float>(), low, n, k);
    };
    if (!lowp) launch(bf16{}, nullptr);
    else if (param_lowp->dtype() == DType::BF16) launch(bf16{}, param_lowp->raw());
    else
      launch(f16{}, param_lowp->raw());
  });
}

// The checks of split_master / join_master; the element count.
int64_t check_master_split(const Tensor& master, const Tensor& weight, const Tensor& remainder,
                           const char* op) {
  expect_cuda(master, "master", op);
  check_dtype(master, DType::F32, "master");
  check_split(weight, remainder, master.shape(), op);
  return master.numel();
}

void split_master(const Tensor& master, Tensor& weight, Tensor& remainder) {
  const int64_t n = check_master_split(master, weight, remainder, "split_master");
  if (n == 0) return;
  launch_kernel("split_kernel", split_kernel, grid_for(n, 256, 8192), 256, 0, current_stream(),
                master.data<float>(), weight.data<uint16_t>(), remainder.data<int16_t>(), n);
}

void join_master(const Tensor& weight, const Tensor& remainder, Tensor& master) {
  const int64_t n = check_master_split(master, weight, remainder, "join_master");
  if (n == 0) return;
  launch_kernel("join_kernel", join_kernel, grid_for(n, 256, 8192), 256, 0, current_stream(),
                weight.data<uint16_t>(), remainder.data<int16_t>(), master.data<float>(), n);
}

void adamw_step_remainder(Tensor& weight, Tensor& remainder, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWHyper& h) {
  const char* op = "adamw_step_remainder";
  check_split(weight, remainder, weight.shape(), op);
  check_moments(grad, m, v, weight.shape(), h, op);
  const int64_t n = weight.numel();
  if (n == 0) return;
  const Scalars k = scalars(h);
  cudaStream_t s = current_stream();
  dispatch_fp(grad.dtype(), op, [&](auto gtag) {
    using G = decltype(gtag);
    uint16_t* w = weight.data<uint16_t>();
    int16_t* r = remainder.data<int16_t>();
    const bool vec = aligned_to(w, 8) && aligned_to(r, 8) && aligned_to(m.raw(), 16) &&
                     aligned_to(v.raw(), 16) && aligned_to(grad.raw(), 4 * sizeof(G));
    if (vec)
      launch_kernel("adamw_remainder_kernel", adamw_remainder_kernel<G, 4>, grid_for(n / 4 + 1, 256, 8192),
                    256, 0, s, w, r, grad.data<G>(), m.data<float>(), v.data<float>(), n, k);
    else
      launch_kernel("adamw_remainder_kernel", adamw_remainder_kernel<G, 1>, grid_for(n, 256, 8192), 256, 0, s,
                    w, r, grad.data<G>(), m.data<float>(), v.data<float>(), n, k);
  });
}

}  // namespace ievo::ops::cuda
