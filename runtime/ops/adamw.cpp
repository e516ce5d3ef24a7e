// AdamW on the CPU, element by element in the parameter's type, in the order of
// torch.optim.AdamW's single-tensor path (scalars rounded to that type as torch does):
//   g = grad * grad_scale
//   p = p * (1 - lr * wd)
//   m = lerp(m, g, 1 - beta1)          (torch's lerp: m + w (g - m) for w < 0.5)
//   v = v * beta2 + (1 - beta2) * g * g
//   denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//   p = p + (-lr / (1 - beta1^t)) * m / denom
#include "runtime/ops/adamw.h"

#include <cmath>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

// torch.lerp(a, b, w) as computed by ATen's CPU kernel.
template <typename T>
T lerp(T a, T b, T w) {
  return std::abs(w) < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

// The step's scalars in the parameter's type, and one element's update.
template <typename P>
struct Update {
  P decay, w1, b2, w2, eps, c2, neg_step;
  explicit Update(const AdamWHyper& h)
      : decay(static_cast<P>(1.0 - h.lr * h.weight_decay)), w1(static_cast<P>(1.0 - h.beta1)),
        b2(static_cast<P>(h.beta2)), w2(static_cast<P>(1.0 - h.beta2)), eps(static_cast<P>(h.eps)),
        c2(static_cast<P>(std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step))))),
        neg_step(static_cast<P>(-(h.lr / (1.0 - std::pow(h.beta1, static_cast<double>(h.step)))))) {}
  void operator()(P& p, P& m, P& v, P g) const {
    p = p * decay;
    m = lerp(m, g, w1);
    v = v * b2 + w2 * g * g;
    const P denom = std::sqrt(v) / c2 + eps;
    p = p + neg_step * m / denom;
  }
};

void check_moments(const Tensor& grad, const Tensor& m, const Tensor& v, const Shape& shape, DType dt,
                   const AdamWHyper& h, const char* op) {
  cpu::expect_cpu(grad, "grad", op);
  cpu::expect_float(m, "m", op);
  cpu::expect_float(v, "v", op);
  check_shape(grad, shape, "grad");
  check_shape(m, shape, "m");
  check_shape(v, shape, "v");
  check_dtype(m, dt, "m");
  check_dtype(v, dt, "v");
  IEVO_CHECK(h.step >= 1, op, ": step must be >= 1 (1-based), got ", h.step);
}

void check_split(const Tensor& weight, const Tensor& remainder, const Shape& shape, const char* op) {
  cpu::expect_cpu(weight, "weight", op);
  cpu::expect_cpu(remainder, "remainder", op);
  check_dtype(weight, DType::BF16, "weight");
  check_dtype(remainder, DType::I16, "remainder");
  check_shape(weight, shape, "weight");
  check_shape(remainder, shape, "remainder");
}

}  // namespace

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWHyper& h,
                Tensor* param_lowp) {
#ifdef IEVO_CUDA
  if (!param.is_cpu()) return cuda::adamw_step(param, grad, m, v, h, param_lowp);
#endif
  const char* op = "adamw_step";
  cpu::expect_float(param, "param", op);
  cpu::expect_float(grad, "grad", op);
  check_moments(grad, m, v, param.shape(), param.dtype(), h, op);
  const bool lowp = param_lowp && param_lowp->defined();
  if (lowp) {
    cpu::expect_cpu(*param_lowp, "param_lowp", op);
    check_shape(*param_lowp, param.shape(), "param_lowp");
    IEVO_CHECK(param_lowp->dtype() == DType::BF16 || param_lowp->dtype() == DType::F16, op,
               ": tensor 'param_lowp' has dtype ", dtype_name(param_lowp->dtype()),
               ", expected bf16 or f16");
  }
  const int64_t n = param.numel();
  cpu::dispatch_float(param.dtype(), op, [&](auto ptag) {
    using P = decltype(ptag);
    cpu::dispatch_float(grad.dtype(), op, [&](auto gtag) {
      using G = decltype(gtag);
      const Update<P> update(h);
      const G gs = static_cast<G>(h.grad_scale);
      P *p = param.data<P>(), *mp = m.data<P>(), *vp = v.data<P>();
      const G* gp = grad.data<G>();
      uint16_t* lp = lowp ? param_lowp->data<uint16_t>() : nullptr;
      const bool bf16 = lowp && param_lowp->dtype() == DType::BF16;
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) {
        update(p[i], mp[i], vp[i], static_cast<P>(gp[i] * gs));
        if (lp) {
          const float f = static_cast<float>(p[i]);
          lp[i] = bf16 ? f32_to_bf16(f) : f32_to_f16(f);
        }
      }
    });
  });
}

void split_master(const Tensor& master, Tensor& weight, Tensor& remainder) {
#ifdef IEVO_CUDA
  if (!master.is_cpu()) return cuda::split_master(master, weight, remainder);
#endif
  const char* op = "split_master";
  cpu::expect_cpu(master, "master", op);
  check_dtype(master, DType::F32, "master");
  check_split(weight, remainder, master.shape(), op);
  const float* x = master.data<float>();
  uint16_t* w = weight.data<uint16_t>();
  int16_t* r = remainder.data<int16_t>();
  for (int64_t i = 0, n = master.numel(); i < n; ++i) f32_split_bf16(x[i], w[i], r[i]);
}

void join_master(const Tensor& weight, const Tensor& remainder, Tensor& master) {
#ifdef IEVO_CUDA
  if (!master.is_cpu()) return cuda::join_master(weight, remainder, master);
#endif
  const char* op = "join_master";
  cpu::expect_cpu(master, "master", op);
  check_dtype(master, DType::F32, "master");
  check_split(weight, remainder, master.shape(), op);
  const uint16_t* w = weight.data<uint16_t>();
  const int16_t* r = remainder.data<int16_t>();
  float* x = master.data<float>();
  for (int64_t i = 0, n = master.numel(); i < n; ++i) x[i] = f32_join_bf16(w[i], r[i]);
}

void adamw_step_remainder(Tensor& weight, Tensor& remainder, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWHyper& h) {
#ifdef IEVO_CUDA
  if (!weight.is_cpu()) return cuda::adamw_step_remainder(weight, remainder, grad, m, v, h);
#endif
  const char* op = "adamw_step_remainder";
  check_split(weight, remainder, weight.shape(), op);
  check_moments(grad, m, v, weight.shape(), DType::F32, h, op);
  const int64_t n = weight.numel();
  cpu::dispatch_storage(grad.dtype(), op, [&](auto gtag) {
    using G = decltype(gtag);
    const Update<float> update(h);
    const float gs = static_cast<float>(h.grad_scale);
    uint16_t* w = weight.data<uint16_t>();
    int16_t* r = remainder.data<int16_t>();
    float *mp = m.data<float>(), *vp = v.data<float>();
    const G* gp = grad.data<G>();
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      float p = f32_join_bf16(w[i], r[i]);
      update(p, mp[i], vp[i], static_cast<float>(cpu::to_double(gp[i])) * gs);
      f32_split_bf16(p, w[i], r[i]);
    }
  });
}

}  // namespace ievo::ops
