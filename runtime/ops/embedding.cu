// Token embedding on the GPU (see embedding.h).
// forward: one block per token copies its table row (16-byte packs when aligned).
// backward, deterministic without atomics: the token positions are sorted by id with a stable
// radix sort (cub), so equal ids form runs ordered by position; the block at the start of each
// run sums dout over the run in that order (fp32) and adds the sum to the table row once.
// Ids are validated first (the first bad position and its id are reported).
#include <cub/device/device_radix_sort.cuh>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

template <typename T, int N>
__global__ void gather_rows(const T* table, const int32_t* ids, T* out, int64_t d) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const T* src = table + static_cast<int64_t>(ids[row]) * d;
  T* dst = out + row * d;
  for (int64_t c = threadIdx.x; c < d / N; c += blockDim.x)
    store_pack<T, N>(dst + c * N, load_pack<T, N>(src + c * N));
}

__global__ void iota_kernel(int32_t* v, int64_t n) {
  pdl_begin();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    v[i] = static_cast<int32_t>(i);
}

// Block i handles the run of equal sorted keys starting at i (if one starts there); the run of
// `skip` (rows held elsewhere) is dropped.
template <typename G, typename T>
__global__ void scatter_runs(const int32_t* sorted, const int32_t* perm, int64_t n, int32_t skip,
                             const G* dout, T* dtable, int64_t d) {
  pdl_begin();
  const int64_t i = blockIdx.x;
  const int32_t key = sorted[i];
  if (key == skip || (i > 0 && sorted[i - 1] == key)) return;
  int64_t end = i + 1;
  while (end < n && sorted[end] == key) ++end;
  T* row = dtable + static_cast<int64_t>(key) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t r = i; r < end; ++r) acc += to_f(dout[static_cast<int64_t>(perm[r]) * d + c]);
    row[c] = from_f<T>(to_f(row[c]) + acc);
  }
}

int bits_for(int64_t bound) {
  int b = 1;
  while ((int64_t{1} << b) < bound) ++b;
  return b;
}

}  // namespace

void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host) {
  const char* op = "embedding_forward";
  expect_cuda(table, "table", op);
  expect_cuda(ids, "ids", op);
  expect_cuda(out, "out", op);
  IEVO_CHECK(table.dim() == 2, op, ": tensor 'table' must be [V, D], has shape ",
             shape_str(table.shape()));
  check_dtype(ids, DType::I32, "ids");
  check_dtype(out, table.dtype(), "out");
  IEVO_CHECK(ids.dim() == 1, op, ": tensor 'ids' must be 1-D, has shape ", shape_str(ids.shape()));
  const int64_t n = ids.numel(), d = table.size(1);
  check_shape(out, {n, d}, "out");
  check_token_ids(ids, table.size(0), op, ids_host);
  if (n == 0 || d == 0) return;
  const size_t es = dtype_size(table.dtype());
  cudaStream_t s = current_stream();
  const int threads = 128;
  // Rows as 16-byte packs when the row size and pointers allow, else as elements.
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    if ((d * es) % 16 == 0 && aligned_to(table.raw(), 16) && aligned_to(out.raw(), 16))
      launch_kernel("gather_rows", gather_rows<T, N>, n, threads, 0, s, table.data<T>(), ids.data<int32_t>(),
                    out.data<T>(), d);
    else
      launch_kernel("gather_rows", gather_rows<T, 1>, n, threads, 0, s, table.data<T>(), ids.data<int32_t>(),
                    out.data<T>(), d);
  };
  dispatch_fp(table.dtype(), op, launch);
}

void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable, const Tensor& ids_host) {
  const char* op = "embedding_backward";
  expect_cuda(dout, "dout", op);
  expect_cuda(ids, "ids", op);
  expect_cuda(dtable, "dtable", op);
  IEVO_CHECK(dtable.dim() == 2, op, ": tensor 'dtable' must be [V, D], has shape ",
             shape_str(dtable.shape()));
  check_dtype(ids, DType::I32, "ids");
  IEVO_CHECK(ids.dim() == 1, op, ": tensor 'ids' must be 1-D, has shape ", shape_str(ids.shape()));
  const int64_t n = ids.numel(), d = dtable.size(1), vocab = dtable.size(0);
  check_shape(dout, {n, d}, "dout");
  check_token_ids(ids, vocab, op, ids_host);
  if (n == 0 || d == 0) return;
  cudaStream_t s = current_stream();
  DeviceBuffer positions(n * sizeof(int32_t));
  launch_kernel("iota_kernel", iota_kernel, grid_for(n, 256, 1024), 256, 0, s, positions.as<int32_t>(), n);
  add_rows_by_key(ids.data<int32_t>(), positions.as<int32_t>(), n, -1, vocab, dout, dtable, op);
}

void add_rows_by_key(const int32_t* keys, const int32_t* positions, int64_t n, int32_t skip,
                     int64_t key_bound, const Tensor& dout, Tensor& dtable, const char* op) {
  cudaStream_t s = current_stream();
  const int64_t d = dtable.size(1);
  // Stable sort of the (key, position) pairs by key: equal keys form runs in position order.
  DeviceBuffer keys_out(n * sizeof(int32_t)), vals_out(n * sizeof(int32_t));
  const int nn = static_cast<int>(n), end_bit = bits_for(key_bound);
  size_t temp_bytes = 0;
  IEVO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, keys_out.as<int32_t>(),
                                                  positions, vals_out.as<int32_t>(), nn, 0, end_bit, s));
  DeviceBuffer temp(temp_bytes);
  IEVO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, keys, keys_out.as<int32_t>(),
                                                  positions, vals_out.as<int32_t>(), nn, 0, end_bit, s));
  dispatch_fp(dout.dtype(), op, [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_fp(dtable.dtype(), op, [&](auto ttag) {
      using T = decltype(ttag);
      launch_kernel("scatter_runs", scatter_runs<G, T>, n, 128, 0, s, keys_out.as<int32_t>(),
                    vals_out.as<int32_t>(), n, skip, dout.data<G>(), dtable.data<T>(), d);
    });
  });
}

}  // namespace ievo::ops::cuda
