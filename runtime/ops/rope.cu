// Rotary position embedding on the GPU (see rope.h), HF convention, angles in fp32 as the CPU op:
//   inv_freq[i] = 1 / theta^(float(2i) / hd), angle = float(pos) * inv_freq[i]
// bf16/f16 with hd a multiple of 16 (the models' case): rope_rows_kernel, a block of threads a
// token, 8 pairs a thread with 16-byte loads, the token's cos/sin shared. Otherwise one thread per
// (token, i < hd/2) computes cos/sin once and rotates the pair (i, i + hd/2) of every head
// (bf16/f16: 4 consecutive pairs per thread, 8-byte loads, 4 heads' loads in flight). Each pair is
// read before it is written by the same thread, so y may alias x. Rows (tokens) of x and y are xs
// and ys elements apart (a joint QKV output's q or k columns).
#include <algorithm>

#include "runtime/cuda/kernels.cuh"
#include "runtime/env.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

// cos and sign * sin of pair i's angle at position pos (the formula at the top of the file), the
// same in every kernel so that they all rotate alike.
__device__ __forceinline__ void rope_cos_sin(float pos, int i, int hd, float theta, float sign, float& c,
                                             float& s) {
  const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(hd));
  const float angle = pos * inv_freq;
  c = cosf(angle);
  s = sign * sinf(angle);
}

template <typename T>
__global__ void rope_kernel(const T* x, const int32_t* pos, float theta, T* y, int64_t n,
                            int heads, int hd, float sign, int64_t xs, int64_t ys) {
  pdl_begin();
  const int half = hd / 2;
  const int64_t total = n * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t t = idx / half;
    const int i = static_cast<int>(idx % half);
    float c, s;
    rope_cos_sin(static_cast<float>(pos[t]), i, hd, theta, sign, c, s);
    for (int h = 0; h < heads; ++h) {
      const T* xr = x + t * xs + h * hd;
      T* yr = y + t * ys + h * hd;
      const float a = to_f(xr[i]), b = to_f(xr[i + half]);
      yr[i] = from_f<T>(a * c - b * s);
      yr[i + half] = from_f<T>(b * c + a * s);
    }
  }
}

// The same with K consecutive pairs per thread (8-byte loads for 2-byte types): idx runs over
// (token, i / K); the angles are computed as above, element by element.
template <typename T, int K>
__global__ void rope_kernel_vec(const T* x, const int32_t* pos, float theta, T* y, int64_t n,
                                int heads, int hd, float sign, int64_t xs, int64_t ys) {
  pdl_begin();
  const int half = hd / 2, groups = half / K;
  const int64_t total = n * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t t = idx / groups;
    const int i0 = static_cast<int>(idx % groups) * K;
    float c[K], sn[K];
    const float p = static_cast<float>(pos[t]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      rope_cos_sin(p, i0 + k, hd, theta, sign, c[k], sn[k]);
    }
    // kHeads heads at a time, all their loads before any store: y may alias x, so the compiler
    // cannot move a head's loads above the previous head's stores itself, and one head's two
    // loads a thread in flight left the kernel latency-bound (2.2 TB/s; 4 heads: see
    // docs/performance.md).
    constexpr int kHeads = 4;
    const T* xt = x + t * xs + i0;
    T* yt = y + t * ys + i0;
    auto rotate = [&](const Pack<T, K>& pa, const Pack<T, K>& pb, T* yr) {
      Pack<T, K> ra, rb;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float a = to_f(pa.v[k]), b = to_f(pb.v[k]);
        ra.v[k] = from_f<T>(a * c[k] - b * sn[k]);
        rb.v[k] = from_f<T>(b * c[k] + a * sn[k]);
      }
      store_pack<T, K>(yr, ra);
      store_pack<T, K>(yr + half, rb);
    };
    int h = 0;
    for (; h + kHeads <= heads; h += kHeads) {
      Pack<T, K> pa[kHeads], pb[kHeads];
#pragma unroll
      for (int u = 0; u < kHeads; ++u) {
        pa[u] = load_pack<T, K>(xt + (h + u) * hd);
        pb[u] = load_pack<T, K>(xt + (h + u) * hd + half);
      }
#pragma unroll
      for (int u = 0; u < kHeads; ++u) rotate(pa[u], pb[u], yt + (h + u) * hd);
    }
    for (; h < heads; ++h) {
      const Pack<T, K> pa = load_pack<T, K>(xt + h * hd), pb = load_pack<T, K>(xt + h * hd + half);
      rotate(pa, pb, yt + h * hd);
    }
  }
}

// Whole rows at a time (2-byte types, hd a multiple of 16; the default where it applies): a block
// of R x TPB threads takes TPB tokens, R = heads * hd / 16 threads a token, so that a warp's two
// 16-byte loads cover a contiguous stretch of the row (lane c: head c / J, pairs 8j..8j+7 with
// j = c % J, J = hd / 16; elements i and i + hd/2). The token's angles, computed as above, are
// shared through shared memory. 2.79 TB/s on 134M's q|k (a copy's rate) against 2.40 with
// rope_kernel_vec, whose warps touch 4 tokens' rows 64 bytes at a time (docs/performance.md,
// fifteenth round).
template <typename T>
__global__ void rope_rows_kernel(const T* x, const int32_t* pos, float theta, T* y, int64_t n, int hd,
                                 float sign, int64_t xs, int64_t ys) {
  pdl_begin();
  extern __shared__ float angles[];  // [TPB][half] cos, then [TPB][half] sin
  const int half = hd / 2, J = hd / 16, R = blockDim.x, tpb = blockDim.y;
  float* cs = angles;
  float* sn = angles + tpb * half;
  const int r = threadIdx.y, c = threadIdx.x, h = c / J, j = c % J;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * tpb + r;
  const int64_t off = h * hd + 8 * j;
  Pack<T, 8> pa, pb;
  if (t < n) {
    pa = load_pack<T, 8>(x + t * xs + off);
    pb = load_pack<T, 8>(x + t * xs + off + half);
  }
  for (int e = r * R + c; e < tpb * half; e += R * tpb) {
    const int64_t te = static_cast<int64_t>(blockIdx.x) * tpb + e / half;
    const int i = e % half;
    rope_cos_sin(te < n ? static_cast<float>(pos[te]) : 0.0f, i, hd, theta, sign, cs[e], sn[e]);
  }
  __syncthreads();
  if (t >= n) return;
  const float* ct = cs + r * half + 8 * j;
  const float* st = sn + r * half + 8 * j;
  Pack<T, 8> ra, rb;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a = to_f(pa.v[k]), b = to_f(pb.v[k]);
    ra.v[k] = from_f<T>(a * ct[k] - b * st[k]);
    rb.v[k] = from_f<T>(b * ct[k] + a * st[k]);
  }
  store_pack<T, 8>(y + t * ys + off, ra);
  store_pack<T, 8>(y + t * ys + off + half, rb);
}

// IEVO_ROPE_ROWS=0: rope_kernel_vec instead of rope_rows_kernel (A/B).
bool rope_rows() {
  static const bool on = env_switch_on("IEVO_ROPE_ROWS");
  return on;
}

void rope_apply(const Tensor& x, const Tensor& pos, double theta, Tensor& y, float sign,
                const char* op, const char* xn, const char* yn) {
  expect_cuda_rows(x, xn, op);
  expect_cuda_rows(y, yn, op);
  expect_cuda(pos, "pos", op);
  IEVO_CHECK(x.dim() == 3, op, ": tensor '", xn, "' must be [N, H, hd], has shape ",
             shape_str(x.shape()));
  check_shape(y, x.shape(), yn);
  check_dtype(y, x.dtype(), yn);
  check_dtype(pos, DType::I32, "pos");
  check_shape(pos, {x.size(0)}, "pos");
  const int64_t n = x.size(0), heads = x.size(1), hd = x.size(2);
  const int64_t xs = x.row_stride(), ys = y.row_stride();
  IEVO_CHECK(hd % 2 == 0, op, ": head dim ", hd, " of tensor '", xn, "' must be even");
  IEVO_CHECK(theta > 0, op, ": rope theta must be positive, got ", theta);
  if (n == 0 || heads == 0 || hd == 0) return;
  cudaStream_t s = current_stream();
  dispatch_fp(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t row_threads = heads * hd / 16;
    if (sizeof(T) == 2 && rope_rows() && hd % 16 == 0 && row_threads <= 1024 && xs % 8 == 0 && ys % 8 == 0 &&
        aligned_to(x.raw(), 16) && aligned_to(y.raw(), 16)) {
      const int tpb = static_cast<int>(std::max<int64_t>(1, 256 / row_threads));
      const dim3 block(static_cast<unsigned>(row_threads), static_cast<unsigned>(tpb));
      const unsigned grid = static_cast<unsigned>((n + tpb - 1) / tpb);
      launch_kernel("rope_rows_kernel", rope_rows_kernel<T>, grid, block, 2 * tpb * (hd / 2) * sizeof(float), s,
                    x.data<T>(), pos.data<int32_t>(), static_cast<float>(theta), y.data<T>(), n,
                    static_cast<int>(hd), sign, xs, ys);
      return;
    }
    constexpr int K = 8 / sizeof(T);  // 8-byte packs
    if (sizeof(T) == 2 && (hd / 2) % K == 0 && xs % K == 0 && ys % K == 0 && aligned_to(x.raw(), 8) &&
        aligned_to(y.raw(), 8)) {
      launch_kernel("rope_kernel_vec", rope_kernel_vec<T, K>, grid_for(n * hd / 2 / K, 256), 256, 0, s,
                    x.data<T>(), pos.data<int32_t>(), static_cast<float>(theta), y.data<T>(), n,
                    static_cast<int>(heads), static_cast<int>(hd), sign, xs, ys);
      return;
    }
    launch_kernel("rope_kernel", rope_kernel<T>, grid_for(n * hd / 2, 256), 256, 0, s, x.data<T>(),
                  pos.data<int32_t>(), static_cast<float>(theta), y.data<T>(), n, static_cast<int>(heads),
                  static_cast<int>(hd), sign, xs, ys);
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
