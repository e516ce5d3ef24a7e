// Softmax cross-entropy on the GPU (see cross_entropy.h), fp32 math for f32/bf16/f16 logits.
// One block per row: each thread keeps a running max and sum of exp over its packs; the block
// takes the row's max, rescales the threads' sums to it and adds them; lse = max + log(sum). The
// exponentials are the SFU's ex2 (one instruction an element: with expf the kernels were bound
// by instruction issue, not DRAM). The forward's total is summed in double by one block in a
// fixed order (deterministic), and read back with the count and the first row whose target is
// out of range (reported as an error, as on the CPU).
// losses: f32 (or the logits' type); dlogits: the logits' type and may alias them.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/softmax_rows.cuh"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

__device__ __forceinline__ bool bad_target(int32_t t, int64_t v) {
  return t != kIgnoreIndex && (t < 0 || t >= v);
}

template <typename T, typename L, int N>
__global__ void ce_fwd(const T* logits, const int32_t* targets, int64_t v, L* losses,
                       float* row_loss, int* bad_row) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  if (t == kIgnoreIndex || bad_target(t, v)) {
    if (threadIdx.x == 0) {
      if (t != kIgnoreIndex) atomicMin(bad_row, static_cast<int>(row));
      losses[row] = from_f<L>(0.f);
      row_loss[row] = 0.f;
    }
    return;
  }
  const T* x = logits + row * v;
  const float lse = row_lse<T, N>(x, v);
  if (threadIdx.x == 0) {
    const float loss = lse - to_f(x[t]);
    losses[row] = from_f<L>(loss);
    row_loss[row] = loss;
  }
}

// The first bad row's "none": every byte 0x7f (set by a memset, no host copy), above any row.
constexpr int kNoBadRowByte = 0x7f;
constexpr int kNoBadRow = 0x7f7f7f7f;

// The rows' loss sum and count: written to *out, or with acc added to acc's running totals (i64
// [3]: the sum's f64 bits, the count, the first bad row of the whole head + 1; one block, launched
// in stream order, so no atomics) with the call's first bad row, offset by row0.
__global__ void ce_total(const float* row_loss, const int32_t* targets, int64_t n, Totals* out,
                         long long* acc, const int* bad_row, long long row0) {
  pdl_begin();
  const Totals t = block_totals(row_loss, targets, n);
  if (threadIdx.x != 0) return;
  if (!acc) {
    *out = t;
    return;
  }
  acc[0] = __double_as_longlong(__longlong_as_double(acc[0]) + t.sum);
  acc[1] += t.count;
  // acc[2]: the first bad row + 1 (0: none yet), so that all-zero bytes are the initial totals
  if (*bad_row != kNoBadRow && (acc[2] == 0 || row0 + *bad_row + 1 < acc[2])) acc[2] = row0 + *bad_row + 1;
}

template <typename T, int N>
__global__ void ce_bwd(const T* logits, const int32_t* targets, int64_t v, float gs, T* dlogits,
                       int* bad_row) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const T* x = logits + row * v;
  T* g = dlogits + row * v;
  if (t == kIgnoreIndex || bad_target(t, v)) {
    if (t != kIgnoreIndex && threadIdx.x == 0) atomicMin(bad_row, static_cast<int>(row));
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = from_f<T>(0.f);
    return;
  }
  const float lse = row_lse<T, N>(x, v);
  row_grad<T, N>(x, v, t, lse, gs, g);
}

void check_args(const Tensor& logits, const Tensor& targets, const char* op) {
  expect_cuda(logits, "logits", op);
  expect_cuda(targets, "targets", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V], has shape ",
             shape_str(logits.shape()));
  check_dtype(targets, DType::I32, "targets");
  check_shape(targets, {logits.size(0)}, "targets");
  IEVO_CHECK(logits.size(0) < kNoBadRow, op, ": too many rows");
  IEVO_CHECK(logits.size(1) < INT_MAX, op, ": vocabulary too large");
}

[[noreturn]] void fail_target(const Tensor& targets, int row, int64_t vocab, const char* op) {
  int32_t t = 0;
  cudaStream_t s = current_stream();
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&t, targets.data<int32_t>() + row, sizeof(t),
                                  cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  target_error(op, t, row, vocab);
}

// Forward and backward in one launch (the LM head's chunks): the loss as ce_fwd, then the gradient
// as ce_bwd. dlogits may alias logits: thread 0 reads the target's logit before the barriers in
// row_lse, and every write comes after them.
template <typename T, typename L, int N>
__global__ void ce_fwd_bwd(const T* logits, const int32_t* targets, int64_t v, float gs, L* losses,
                           float* row_loss, T* dlogits, int* bad_row) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const T* x = logits + row * v;
  T* g = dlogits + row * v;
  if (t == kIgnoreIndex || bad_target(t, v)) {
    if (threadIdx.x == 0) {
      if (t != kIgnoreIndex) atomicMin(bad_row, static_cast<int>(row));
      losses[row] = from_f<L>(0.f);
      row_loss[row] = 0.f;
    }
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = from_f<T>(0.f);
    return;
  }
  const float xt = threadIdx.x == 0 ? to_f(x[t]) : 0.f;
  const float lse = row_lse<T, N>(x, v);
  if (threadIdx.x == 0) {
    losses[row] = from_f<L>(lse - xt);
    row_loss[row] = lse - xt;
  }
  row_grad<T, N>(x, v, t, lse, gs, g);
}

}  // namespace

namespace {

// The forward, or with dlogits the fused forward + backward: one launch, the totals summed on the
// device and read back with the first bad row (one synchronisation); with acc (i64 [3] on the
// device) added to acc's running totals instead, without a synchronisation (returns 0).
double ce_forward_impl(const Tensor& logits, const Tensor& targets, Tensor& losses, int64_t* count,
                       double grad_scale, Tensor* dlogits, const char* op, Tensor* acc = nullptr,
                       int64_t row0 = 0) {
  check_args(logits, targets, op);
  expect_cuda(losses, "losses", op);
  check_shape(losses, {logits.size(0)}, "losses");
  IEVO_CHECK(losses.dtype() == DType::F32 || losses.dtype() == logits.dtype(), op,
             ": tensor 'losses' has dtype ", dtype_name(losses.dtype()), ", expected f32 or ",
             dtype_name(logits.dtype()));
  if (dlogits) {
    expect_cuda(*dlogits, "dlogits", op);
    check_shape(*dlogits, logits.shape(), "dlogits");
    check_dtype(*dlogits, logits.dtype(), "dlogits");
  }
  if (acc) {
    expect_cuda(*acc, "totals", op);
    check_dtype(*acc, DType::I64, "totals");
    check_shape(*acc, {3}, "totals");
  }
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0) {
    if (count) *count = 0;
    return 0.0;
  }
  IEVO_CHECK(v > 0, op, ": empty vocabulary");
  cudaStream_t s = current_stream();
  // Scratch: per-row fp32 losses, the totals and the first bad row.
  DeviceBuffer buf(n * sizeof(float) + sizeof(Totals) + 16);
  float* row_loss = buf.as<float>();
  auto* totals = reinterpret_cast<Totals*>(buf.as<char>() + (n * sizeof(float) + 15) / 16 * 16);
  DeviceBuffer bad(sizeof(int));
  IEVO_CUDA_CHECK(cudaMemsetAsync(bad.data(), kNoBadRowByte, sizeof(int), s));
  dispatch_fp(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      auto run = [&](auto* loss_out) {
        using L = std::remove_pointer_t<decltype(loss_out)>;
        if (dlogits)
          launch_kernel("ce_fwd_bwd", ce_fwd_bwd<T, L, N>, n, row_threads(v / N), 0, s, logits.data<T>(),
                        targets.data<int32_t>(), v, static_cast<float>(grad_scale), loss_out, row_loss,
                        dlogits->data<T>(), bad.as<int>());
        else
          launch_kernel("ce_fwd", ce_fwd<T, L, N>, n, row_threads(v / N), 0, s, logits.data<T>(),
                        targets.data<int32_t>(), v, loss_out, row_loss, bad.as<int>());
      };
      if (losses.dtype() == DType::F32) run(losses.data<float>());
      else run(losses.data<T>());
    };
    with_row_pack<T>(logits, dlogits ? *dlogits : logits, launch);
  });
  launch_kernel("ce_total", ce_total, 1, 1024, 0, s, row_loss, targets.data<int32_t>(), n, totals,
                acc ? acc->data<long long>() : nullptr, bad.as<int>(), row0);
  if (acc) return 0.0;  // the scratch is freed in stream order
  Totals host{};
  int bad_row = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&host, totals, sizeof(Totals), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&bad_row, bad.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad_row != kNoBadRow) fail_target(targets, bad_row, v, op);
  if (count) *count = host.count;
  return host.sum;
}

}  // namespace

double cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             int64_t* count) {
  return ce_forward_impl(logits, targets, losses, count, 0.0, nullptr, "cross_entropy_forward");
}

double cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                                      Tensor& losses, int64_t* count, Tensor& dlogits) {
  return ce_forward_impl(logits, targets, losses, count, grad_scale, &dlogits,
                         "cross_entropy_forward_backward");
}

void cross_entropy_accumulate(const Tensor& logits, const Tensor& targets, double grad_scale,
                              Tensor& losses, Tensor* dlogits, int64_t row0, Tensor& totals) {
  ce_forward_impl(logits, targets, losses, nullptr, grad_scale, dlogits,
                  dlogits ? "cross_entropy_forward_backward" : "cross_entropy_forward", &totals, row0);
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                            Tensor& dlogits) {
  const char* op = "cross_entropy_backward";
  check_args(logits, targets, op);
  expect_cuda(dlogits, "dlogits", op);
  check_shape(dlogits, logits.shape(), "dlogits");
  check_dtype(dlogits, logits.dtype(), "dlogits");
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0 || v == 0) return;
  cudaStream_t s = current_stream();
  DeviceBuffer bad(sizeof(int));
  IEVO_CUDA_CHECK(cudaMemsetAsync(bad.data(), kNoBadRowByte, sizeof(int), s));
  dispatch_fp(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    with_row_pack<T>(logits, dlogits, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      launch_kernel("ce_bwd", ce_bwd<T, N>, n, row_threads(v / N), 0, s, logits.data<T>(),
                    targets.data<int32_t>(), v, static_cast<float>(grad_scale), dlogits.data<T>(), bad.as<int>());
    });
  });
  int bad_row = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&bad_row, bad.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad_row != kNoBadRow) fail_target(targets, bad_row, v, op);
}

}  // namespace ievo::ops::cuda
