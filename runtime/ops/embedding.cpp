// Token embedding on the CPU: a row gather, and its backward (a scatter-add into the table).
// The backward splits the table's columns among threads and walks the tokens in order, so
// repeated ids accumulate in a fixed order (deterministic, no atomics).
#include "runtime/ops/embedding.h"

#include <algorithm>
#include <cstring>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {

void check_token_ids(const Tensor& ids, int64_t vocab, const char* op) {
  cpu::expect_cpu(ids, "ids", op);
  check_dtype(ids, DType::I32, "ids");
  IEVO_CHECK(ids.dim() == 1, op, ": tensor 'ids' must be 1-D, has shape ", shape_str(ids.shape()));
  const int32_t* p = ids.data<int32_t>();
  for (int64_t n = 0; n < ids.numel(); ++n)
    if (p[n] < 0 || p[n] >= vocab)
      IEVO_FAIL(op, ": token id ", p[n], " at position ", n, " is outside the vocabulary [0, ",
                vocab, ")");
}

void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host) {
#ifdef IEVO_CUDA
  if (!out.is_cpu()) return cuda::embedding_forward(table, ids, out, ids_host);
#endif
  (void)ids_host;  // ids are on the host already
  const char* op = "embedding_forward";
  cpu::expect_float(table, "table", op);
  cpu::expect_float(out, "out", op);
  IEVO_CHECK(table.dim() == 2, op, ": tensor 'table' must be [V, D], has shape ",
             shape_str(table.shape()));
  check_dtype(out, table.dtype(), "out");
  check_token_ids(ids, table.size(0), op);
  check_shape(out, {ids.numel(), table.size(1)}, "out");
  cpu::embedding_rows_forward(table, ids, 0, out);
}

void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable, const Tensor& ids_host) {
#ifdef IEVO_CUDA
  if (!dtable.is_cpu()) return cuda::embedding_backward(dout, ids, dtable, ids_host);
#endif
  (void)ids_host;
  const char* op = "embedding_backward";
  cpu::expect_float(dtable, "dtable", op);
  cpu::expect_float(dout, "dout", op);
  IEVO_CHECK(dtable.dim() == 2, op, ": tensor 'dtable' must be [V, D], has shape ",
             shape_str(dtable.shape()));
  check_dtype(dout, dtable.dtype(), "dout");
  check_token_ids(ids, dtable.size(0), op);
  check_shape(dout, {ids.numel(), dtable.size(1)}, "dout");
  cpu::embedding_rows_backward(dout, ids, 0, dtable, op);
}

namespace cpu {

void embedding_rows_forward(const Tensor& table, const Tensor& ids, int64_t begin, Tensor& out) {
  const int64_t n_tok = ids.numel(), d = table.size(1), rows = table.size(0);
  const size_t row_bytes = static_cast<size_t>(d) * dtype_size(table.dtype());
  const char* src = static_cast<const char*>(table.raw());
  char* dst = static_cast<char*>(out.raw());
  const int32_t* id = ids.data<int32_t>();
#pragma omp parallel for schedule(static) if (n_tok * d > kParallelMin)
  for (int64_t n = 0; n < n_tok; ++n) {
    const int64_t r = id[n] - begin;
    if (r >= 0 && r < rows) std::memcpy(dst + n * row_bytes, src + r * row_bytes, row_bytes);
    else std::memset(dst + n * row_bytes, 0, row_bytes);  // all-zero bits are +0.0
  }
}

void embedding_rows_backward(const Tensor& dout, const Tensor& ids, int64_t begin, Tensor& dtable, const char* op) {
  const int64_t n_tok = ids.numel(), d = dtable.size(1), rows = dtable.size(0);
  dispatch_float(dtable.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* g = dout.data<T>();
    T* t = dtable.data<T>();
    const int32_t* id = ids.data<int32_t>();
    // Column blocks per thread, tokens in order: repeated ids accumulate deterministically.
    constexpr int64_t kCols = 64;
    const int64_t blocks = (d + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n_tok * d > kParallelMin)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kCols, c1 = std::min(d, c0 + kCols);
      for (int64_t n = 0; n < n_tok; ++n) {
        const int64_t r = id[n] - begin;
        if (r < 0 || r >= rows) continue;
        T* row = t + r * d;
        const T* grow = g + n * d;
        for (int64_t c = c0; c < c1; ++c) row[c] += grow[c];
      }
    }
  });
}

}  // namespace cpu

}  // namespace ievo::ops
