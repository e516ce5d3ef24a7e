// Vocabulary-parallel embedding and cross-entropy pieces, and the Ulysses block transpose, on the
// GPU (see vocab_parallel.h). fp32 math for f32/bf16/f16; stats and lse are f32.
//   embedding forward: one block per token copies its row (or writes zeros when another rank
//     holds the id).
//   embedding backward, deterministic without atomics: local row keys (ids of other ranks get the
//     key V_local, skipped) go to embedding.cu's add_rows_by_key, as ops::embedding_backward's ids
//     do (a stable radix sort with their positions, then one block a run of equal keys).
//   ce_local / ce_backward: one block per row, the row functions of softmax_rows.cuh (as
//     cross_entropy.cu: one SFU exp an element, 16-byte packs where the rows allow them).
//   ce_combine: one thread per row over the T parts; the total is summed in double by one block
//     in a fixed order and read back with the count and the first row with a bad target.
//   swap_leading_dims: B strided 2-D copies (cudaMemcpy2DAsync), no kernel; any strides of the two
//     leading dimensions (column slices of wider matrices).
#include <climits>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/softmax_rows.cuh"
#include "runtime/ops/targets.h"
#include "runtime/ops/vocab_parallel.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

// ---------------------------------------------------------------- argument checks

// First position whose value is outside [0, vocab) (ignore index allowed when `ignore`).
__global__ void first_bad(const int32_t* v, int64_t n, int64_t vocab, bool ignore, int* bad) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t x = v[i];
    if ((ignore && x == kIgnoreIndex) || (x >= 0 && x < vocab)) continue;
    atomicMin(bad, static_cast<int>(i));
  }
}

constexpr int kNoBadPos = 0x7f7f7f7f;  // every byte 0x7f: set by a memset

// Throws naming the first id / target outside the vocabulary (one device round trip).
void check_values(const Tensor& v, int64_t vocab, bool targets, const char* op) {
  const int64_t n = v.numel();
  if (n == 0) return;
  IEVO_CHECK(n < kNoBadPos && vocab < INT_MAX, op, ": too many tokens or vocabulary too large");
  cudaStream_t s = current_stream();
  DeviceBuffer buf(sizeof(int));
  IEVO_CUDA_CHECK(cudaMemsetAsync(buf.data(), 0x7f, sizeof(int), s));
  launch_kernel("first_bad", first_bad, grid_for(n, 256, 1024), 256, 0, s, v.data<int32_t>(), n, vocab,
                targets, buf.as<int>());
  int pos = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&pos, buf.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (pos == kNoBadPos) return;
  int32_t x = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&x, v.data<int32_t>() + pos, sizeof(x), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (targets) target_error(op, x, pos, vocab);
  IEVO_FAIL(op, ": token id ", x, " at position ", pos, " is outside the vocabulary [0, ", vocab, ")");
}

void check_i32_1d(const Tensor& v, int64_t n, const char* name, const char* op) {
  expect_cuda(v, name, op);
  check_dtype(v, DType::I32, name);
  check_shape(v, {n}, name);
}

void check_rows(const Tensor& t, int64_t begin, int64_t vocab, const char* name, const char* op) {
  IEVO_CHECK(t.dim() == 2, op, ": tensor '", name, "' must be [V_local, D], has shape ",
             shape_str(t.shape()));
  IEVO_CHECK(begin >= 0 && begin + t.size(0) <= vocab, op, ": rows [", begin, ", ",
             begin + t.size(0), ") of '", name, "' are not inside the vocabulary [0, ", vocab, ")");
}

// ---------------------------------------------------------------- embedding

template <typename T>
__global__ void gather_rows_range(const T* table, const int32_t* ids, T* out, int64_t d,
                                  int64_t begin, int64_t rows) {
  pdl_begin();
  const int64_t n = blockIdx.x;
  const int64_t r = ids[n] - begin;
  T* dst = out + n * d;
  if (r < 0 || r >= rows) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = from_f<T>(0.f);
    return;
  }
  const T* src = table + r * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

// key = local row, or `rows` for ids of other ranks; value = position.
__global__ void local_keys(const int32_t* ids, int64_t n, int64_t begin, int64_t rows,
                           int32_t* keys, int32_t* pos) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = ids[i] - begin;
    keys[i] = static_cast<int32_t>(r >= 0 && r < rows ? r : rows);
    pos[i] = static_cast<int32_t>(i);
  }
}

// ---------------------------------------------------------------- cross-entropy

template <typename T, int N>
__global__ void ce_local(const T* logits, const int32_t* targets, int64_t n, int64_t vl,
                         int64_t begin, float* stats) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vl;
  const float lse = row_lse<T, N>(x, vl);
  if (threadIdx.x == 0) {
    const int32_t t = targets[row];
    const int64_t local = static_cast<int64_t>(t) - begin;
    stats[row] = lse;
    stats[n + row] = t != kIgnoreIndex && local >= 0 && local < vl ? to_f(x[local]) : 0.f;
  }
}

__global__ void ce_combine(const float* g, const int32_t* targets, int64_t parts, int64_t n,
                           float* lse, double* row_loss) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float m = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) m = fmaxf(m, g[p * 2 * n + i]);
    float s = 0.f, tl = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      s += expf(g[p * 2 * n + i] - m);
      tl += g[p * 2 * n + n + i];
    }
    const float l = m + logf(s);
    lse[i] = l;
    row_loss[i] = targets[i] == kIgnoreIndex ? 0.0 : static_cast<double>(l) - static_cast<double>(tl);
  }
}

__global__ void ce_total(const double* row_loss, const int32_t* targets, int64_t n, Totals* out) {
  pdl_begin();
  const Totals t = block_totals(row_loss, targets, n);
  if (threadIdx.x == 0) *out = t;
}

template <typename T, int N>
__global__ void ce_backward(const T* logits, const int32_t* targets, int64_t vl, int64_t begin,
                            const float* lse, float gs, T* dlogits) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const T* x = logits + row * vl;
  T* g = dlogits + row * vl;  // may alias x: element j is read and written by one thread
  if (t == kIgnoreIndex) {
    for (int64_t j = threadIdx.x; j < vl; j += blockDim.x) g[j] = from_f<T>(0.f);
    return;
  }
  row_grad<T, N>(x, vl, static_cast<int64_t>(t) - begin, lse[row], gs, g);
}

}  // namespace

void check_token_ids(const Tensor& ids, int64_t vocab, const char* op, const Tensor& ids_host) {
  if (!ids_host.defined()) return check_values(ids, vocab, false, op);
  IEVO_CHECK(ids_host.numel() == ids.numel(), op, ": tensor 'ids_host' must be the host copy of ids (",
             ids.numel(), " ids), has shape ", shape_str(ids_host.shape()));
  ops::check_token_ids(ids_host, vocab, op);
}

void embedding_forward_range(const Tensor& table, const Tensor& ids, int64_t begin, int64_t vocab,
                             Tensor& out, const Tensor& ids_host) {
  const char* op = "embedding_forward_range";
  expect_cuda(table, "table", op);
  expect_cuda(out, "out", op);
  check_rows(table, begin, vocab, "table", op);
  check_dtype(out, table.dtype(), "out");
  IEVO_CHECK(ids.dim() == 1, op, ": tensor 'ids' must be 1-D, has shape ", shape_str(ids.shape()));
  const int64_t n = ids.numel(), d = table.size(1);
  check_i32_1d(ids, n, "ids", op);
  check_shape(out, {n, d}, "out");
  check_token_ids(ids, vocab, op, ids_host);
  if (n == 0 || d == 0) return;
  cudaStream_t s = current_stream();
  dispatch_fp(table.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel("gather_rows_range", gather_rows_range<T>, n, 128, 0, s, table.data<T>(),
                  ids.data<int32_t>(), out.data<T>(), d, begin, table.size(0));
  });
}

void embedding_backward_range(const Tensor& dout, const Tensor& ids, int64_t begin, int64_t vocab,
                              Tensor& dtable, const Tensor& ids_host) {
  const char* op = "embedding_backward_range";
  expect_cuda(dout, "dout", op);
  expect_cuda(dtable, "dtable", op);
  check_rows(dtable, begin, vocab, "dtable", op);
  IEVO_CHECK(ids.dim() == 1, op, ": tensor 'ids' must be 1-D, has shape ", shape_str(ids.shape()));
  const int64_t n = ids.numel(), d = dtable.size(1), rows = dtable.size(0);
  check_i32_1d(ids, n, "ids", op);
  check_shape(dout, {n, d}, "dout");
  check_token_ids(ids, vocab, op, ids_host);
  if (n == 0 || d == 0) return;
  IEVO_CHECK(rows < INT_MAX, op, ": too many rows");
  DeviceBuffer keys(n * sizeof(int32_t)), positions(n * sizeof(int32_t));
  launch_kernel("local_keys", local_keys, grid_for(n, 256, 1024), 256, 0, current_stream(), ids.data<int32_t>(),
                n, begin, rows, keys.as<int32_t>(), positions.as<int32_t>());
  add_rows_by_key(keys.as<int32_t>(), positions.as<int32_t>(), n, static_cast<int32_t>(rows), rows + 1, dout,
                  dtable, op);
}

void vocab_ce_local(const Tensor& logits, const Tensor& targets, int64_t begin, int64_t vocab,
                    Tensor& stats) {
  const char* op = "vocab_ce_local";
  expect_cuda(logits, "logits", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V_local], has shape ",
             shape_str(logits.shape()));
  const int64_t n = logits.size(0), vl = logits.size(1);
  IEVO_CHECK(begin >= 0 && begin + vl <= vocab, op, ": logit columns [", begin, ", ", begin + vl,
             ") are not inside the vocabulary [0, ", vocab, ")");
  check_i32_1d(targets, n, "targets", op);
  expect_cuda(stats, "stats", op);
  check_shape(stats, {2, n}, "stats");
  check_dtype(stats, DType::F32, "stats");
  check_values(targets, vocab, true, op);
  if (n == 0) return;
  IEVO_CHECK(n < INT_MAX, op, ": too many rows");
  cudaStream_t s = current_stream();
  dispatch_fp(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    with_row_pack<T>(logits, logits, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      launch_kernel("ce_local", ce_local<T, N>, n, row_threads(vl / N), 0, s, logits.data<T>(),
                    targets.data<int32_t>(), n, vl, begin, stats.data<float>());
    });
  });
}

double vocab_ce_combine(const Tensor& gathered, const Tensor& targets, int64_t vocab, Tensor& lse,
                        int64_t* count) {
  const char* op = "vocab_ce_combine";
  expect_cuda(gathered, "gathered", op);
  check_dtype(gathered, DType::F32, "gathered");
  IEVO_CHECK(gathered.dim() == 3 && gathered.size(1) == 2, op,
             ": tensor 'gathered' must be [T, 2, N], has shape ", shape_str(gathered.shape()));
  const int64_t parts = gathered.size(0), n = gathered.size(2);
  check_i32_1d(targets, n, "targets", op);
  expect_cuda(lse, "lse", op);
  check_shape(lse, {n}, "lse");
  check_dtype(lse, DType::F32, "lse");
  check_values(targets, vocab, true, op);
  if (n == 0) {
    if (count) *count = 0;
    return 0.0;
  }
  cudaStream_t s = current_stream();
  DeviceBuffer buf(n * sizeof(double) + sizeof(Totals));
  double* row_loss = buf.as<double>();
  auto* totals = reinterpret_cast<Totals*>(row_loss + n);
  launch_kernel("ce_combine", ce_combine, grid_for(n, 256), 256, 0, s, gathered.data<float>(),
                targets.data<int32_t>(), parts, n, lse.data<float>(), row_loss);
  launch_kernel("ce_total", ce_total, 1, 1024, 0, s, row_loss, targets.data<int32_t>(), n, totals);
  Totals host{};
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&host, totals, sizeof(Totals), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (count) *count = host.count;
  return host.sum;
}

void vocab_ce_backward(const Tensor& logits, const Tensor& targets, int64_t begin,
                       const Tensor& lse, double grad_scale, Tensor& dlogits) {
  const char* op = "vocab_ce_backward";
  expect_cuda(logits, "logits", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V_local], has shape ",
             shape_str(logits.shape()));
  const int64_t n = logits.size(0), vl = logits.size(1);
  IEVO_CHECK(begin >= 0, op, ": negative vocabulary offset ", begin);
  check_i32_1d(targets, n, "targets", op);
  expect_cuda(lse, "lse", op);
  check_shape(lse, {n}, "lse");
  check_dtype(lse, DType::F32, "lse");
  expect_cuda(dlogits, "dlogits", op);
  check_shape(dlogits, logits.shape(), "dlogits");
  check_dtype(dlogits, logits.dtype(), "dlogits");
  if (n == 0 || vl == 0) return;
  IEVO_CHECK(n < INT_MAX, op, ": too many rows");
  cudaStream_t s = current_stream();
  dispatch_fp(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    with_row_pack<T>(logits, dlogits, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      launch_kernel("ce_backward", ce_backward<T, N>, n, row_threads(vl / N), 0, s, logits.data<T>(),
                    targets.data<int32_t>(), vl, begin, lse.data<float>(), static_cast<float>(grad_scale),
                    dlogits.data<T>());
    });
  });
}

void swap_leading_dims(const Tensor& x, Tensor& out) {
  // Checked by the dispatcher (shapes, dtype, contiguous blocks, device, no aliasing).
  const int64_t a = x.size(0), b = x.size(1);
  if (x.numel() == 0) return;
  const size_t es = dtype_size(x.dtype());
  const size_t block = static_cast<size_t>(x.numel() / (a * b)) * es;
  cudaStream_t s = current_stream();
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  // The pitches (the row strides of the copies) are at least a block where a > 1; with one row
  // any pitch will do, and cudaMemcpy2DAsync wants one >= the width.
  const size_t spitch = a > 1 ? static_cast<size_t>(x.strides()[0]) * es : block;
  const size_t dpitch = a > 1 ? static_cast<size_t>(out.strides()[1]) * es : block;
  // out[j] (a blocks, dpitch apart) <- x[:, j] (a blocks, spitch apart).
  for (int64_t j = 0; j < b; ++j)
    IEVO_CUDA_CHECK(cudaMemcpy2DAsync(dst + static_cast<size_t>(j * out.strides()[0]) * es, dpitch,
                                      src + static_cast<size_t>(j * x.strides()[1]) * es, spitch, block, a,
                                      cudaMemcpyDeviceToDevice, s));
}

}  // namespace ievo::ops::cuda
