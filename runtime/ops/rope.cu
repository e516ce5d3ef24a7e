// Rotary position embedding on the GPU (see rope.h), HF convention, angles in fp32 as the CPU op:
//   inv_freq[i] = 1 / theta^(float(2i) / hd), angle = float(pos) * inv_freq[i]
// One thread per (token, i < hd/2) computes cos/sin once and rotates the pair (i, i + hd/2) of
// every head; each pair is read before it is written, so y may alias x.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

template <typename T>
__global__ void rope_kernel(const T* x, const int32_t* pos, float theta, T* y, int64_t n,
                            int heads, int hd, float sign) {
  const int half = hd / 2;
  const int64_t total = n * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t t = idx / half;
    const int i = static_cast<int>(idx % half);
    const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(hd));
    const float angle = static_cast<float>(pos[t]) * inv_freq;
    const float c = cosf(angle), s = sign * sinf(angle);
    for (int h = 0; h < heads; ++h) {
      const int64_t base = (t * heads + h) * hd;
      const float a = to_f(x[base + i]), b = to_f(x[base + i + half]);
      y[base + i] = from_f<T>(a * c - b * s);
      y[base + i + half] = from_f<T>(b * c + a * s);
    }
  }
}

void rope_apply(const Tensor& x, const Tensor& pos, double theta, Tensor& y, float sign,
                const char* op, const char* xn, const char* yn) {
  expect_cuda(x, xn, op);
  expect_cuda(y, yn, op);
  expect_cuda(pos, "pos", op);
  IEVO_CHECK(x.dim() == 3, op, ": tensor '", xn, "' must be [N, H, hd], has shape ",
             shape_str(x.shape()));
  check_shape(y, x.shape(), yn);
  check_dtype(y, x.dtype(), yn);
  check_dtype(pos, DType::I32, "pos");
  check_shape(pos, {x.size(0)}, "pos");
  const int64_t n = x.size(0), heads = x.size(1), hd = x.size(2);
  IEVO_CHECK(hd % 2 == 0, op, ": head dim ", hd, " of tensor '", xn, "' must be even");
  IEVO_CHECK(theta > 0, op, ": rope theta must be positive, got ", theta);
  if (n == 0 || heads == 0 || hd == 0) return;
  cudaStream_t s = current_stream();
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<grid_for(n * hd / 2, 256), 256, 0, s>>>(
        x.data<T>(), pos.data<int32_t>(), static_cast<float>(theta), y.data<T>(), n,
        static_cast<int>(heads), static_cast<int>(hd), sign);
    IEVO_CUDA_LAUNCH_CHECK("rope_kernel");
  });
}

}  // namespace

void rope_forward(const Tensor& x, const Tensor& pos, double theta, Tensor& y) {
  rope_apply(x, pos, theta, y, 1.0f, "rope_forward", "x", "y");
}

void rope_backward(const Tensor& dy, const Tensor& pos, double theta, Tensor& dx) {
  rope_apply(dy, pos, theta, dx, -1.0f, "rope_backward", "dy", "dx");
}

}  // namespace ievo::ops::cuda
