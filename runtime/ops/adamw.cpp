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

}  // namespace

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWHyper& h,
                Tensor* param_lowp) {
#ifdef IEVO_CUDA
  if (!param.is_cpu()) return cuda::adamw_step(param, grad, m, v, h, param_lowp);
#endif
  const char* op = "adamw_step";
  cpu::expect_float(param, "param", op);
  cpu::expect_float(grad, "grad", op);
  cpu::expect_float(m, "m", op);
  cpu::expect_float(v, "v", op);
  check_shape(grad, param.shape(), "grad");
  check_shape(m, param.shape(), "m");
  check_shape(v, param.shape(), "v");
  check_dtype(m, param.dtype(), "m");
  check_dtype(v, param.dtype(), "v");
  IEVO_CHECK(h.step >= 1, op, ": step must be >= 1 (1-based), got ", h.step);
  const bool lowp = param_lowp && param_lowp->defined();
  if (lowp) {
    cpu::expect_cpu(*param_lowp, "param_lowp", op);
    check_shape(*param_lowp, param.shape(), "param_lowp");
    IEVO_CHECK(param_lowp->dtype() == DType::BF16 || param_lowp->dtype() == DType::F16, op,
               ": tensor 'param_lowp' has dtype ", dtype_name(param_lowp->dtype()),
               ", expected bf16 or f16");
  }
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step)));
  const int64_t n = param.numel();
  cpu::dispatch_float(param.dtype(), op, [&](auto ptag) {
    using P = decltype(ptag);
    cpu::dispatch_float(grad.dtype(), op, [&](auto gtag) {
      using G = decltype(gtag);
      const P decay = static_cast<P>(1.0 - h.lr * h.weight_decay);
      const P w1 = static_cast<P>(1.0 - h.beta1), b2 = static_cast<P>(h.beta2);
      const P w2 = static_cast<P>(1.0 - h.beta2), eps = static_cast<P>(h.eps);
      const P c2 = static_cast<P>(bc2_sqrt), neg_step = static_cast<P>(-(h.lr / bc1));
      const G gs = static_cast<G>(h.grad_scale);
      P *p = param.data<P>(), *mp = m.data<P>(), *vp = v.data<P>();
      const G* gp = grad.data<G>();
      uint16_t* lp = lowp ? param_lowp->data<uint16_t>() : nullptr;
      const bool bf16 = lowp && param_lowp->dtype() == DType::BF16;
#pragma omp parallel for schedule(static) if (n > cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) {
        const P g = static_cast<P>(gp[i] * gs);
        P pi = p[i] * decay;
        const P mi = lerp(mp[i], g, w1);
        const P vi = vp[i] * b2 + w2 * g * g;
        const P denom = std::sqrt(vi) / c2 + eps;
        pi = pi + neg_step * mi / denom;
        p[i] = pi;
        mp[i] = mi;
        vp[i] = vi;
        if (lp) {
          const float f = static_cast<float>(pi);
          lp[i] = bf16 ? f32_to_bf16(f) : f32_to_f16(f);
        }
      }
    });
  });
}

}  // namespace ievo::ops
