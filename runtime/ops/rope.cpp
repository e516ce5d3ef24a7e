// Rotary position embedding on the CPU, matching HF LlamaRotaryEmbedding: inv_freq, the angles
// and cos/sin are computed in fp32 for every input dtype,
//   inv_freq[i] = 1 / theta^(float(2i) / hd),  angle = float(pos) * inv_freq[i],
// and the rotation of each (i, i + hd/2) pair is applied in the tensor's type:
//   y_i = x_i cos - x_{i+h} sin,   y_{i+h} = x_{i+h} cos + x_i sin        (h = hd/2)
// The backward is the same rotation with sin negated (the transpose).
#include "runtime/ops/rope.h"

#include <cmath>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

// y = R(sign * angle) x, y may alias x (with the same strides). Rows (tokens) may be strided.
// xn / yn name x and y in messages.
void rope_apply(const Tensor& x, const Tensor& pos, double theta, Tensor& y, int sign,
                const char* op, const char* xn, const char* yn) {
  cpu::expect_float_rows(x, xn, op);
  cpu::expect_float_rows(y, yn, op);
  cpu::expect_cpu(pos, "pos", op);
  IEVO_CHECK(x.dim() == 3, op, ": tensor '", xn, "' must be [N, H, hd], has shape ",
             shape_str(x.shape()));
  check_shape(y, x.shape(), yn);
  check_dtype(y, x.dtype(), yn);
  check_dtype(pos, DType::I32, "pos");
  check_shape(pos, {x.size(0)}, "pos");
  const int64_t n = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  const int64_t xs = x.row_stride(), ys = y.row_stride();
  IEVO_CHECK(hd % 2 == 0, op, ": head dim ", hd, " of tensor '", xn, "' must be even");
  IEVO_CHECK(theta > 0, op, ": rope theta must be positive, got ", theta);
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const float base = static_cast<float>(theta);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow(base, static_cast<float>(2 * i) / static_cast<float>(hd));
  const int32_t* pp = pos.data<int32_t>();
  cpu::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
#pragma omp parallel for schedule(static) if (x.numel() > cpu::kParallelMin)
    for (int64_t t = 0; t < n; ++t) {
      std::vector<T> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(pp[t]) * inv_freq[i];
        c[i] = static_cast<T>(std::cos(angle));
        s[i] = static_cast<T>(sign) * static_cast<T>(std::sin(angle));
      }
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = xp + t * xs + h * hd;
        T* yr = yp + t * ys + h * hd;
        for (int64_t i = 0; i < half; ++i) {
          const T a = xr[i], b = xr[i + half];
          yr[i] = a * c[i] - b * s[i];
          yr[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

}  // namespace

void rope_forward(const Tensor& x, const Tensor& pos, double theta, Tensor& y) {
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::rope_forward(x, pos, theta, y);
#endif
  rope_apply(x, pos, theta, y, +1, "rope_forward", "x", "y");
}

void rope_backward(const Tensor& dy, const Tensor& pos, double theta, Tensor& dx) {
#ifdef IEVO_CUDA
  if (!dy.is_cpu()) return cuda::rope_backward(dy, pos, theta, dx);
#endif
  rope_apply(dy, pos, theta, dx, -1, "rope_backward", "dy", "dx");
}

}  // namespace ievo::ops
