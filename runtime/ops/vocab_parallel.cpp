// Vocabulary-parallel embedding and cross-entropy pieces, and the Ulysses block transpose, on the
// CPU (see vocab_parallel.h). Per-row math in double, as ops::cross_entropy_*:
//   local:    m = max_v x_v,  lse_t = m + log sum_v exp(x_v - m)
//   combine:  M = max_t lse_t, lse = M + log sum_t exp(lse_t - M), loss = lse - x_target
//   backward: dlogits_v = grad_scale * (exp(x_v - lse) - [v + begin == target])
#include "runtime/ops/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/targets.h"

namespace ievo::ops {
namespace {

// The table shard [V_local, D] must lie inside the vocabulary.
void check_range(const Tensor& table, int64_t begin, int64_t vocab, const char* name,
                 const char* op) {
  IEVO_CHECK(table.dim() == 2, op, ": tensor '", name, "' must be [V_local, D], has shape ",
             shape_str(table.shape()));
  IEVO_CHECK(begin >= 0 && begin + table.size(0) <= vocab, op, ": rows [", begin, ", ",
             begin + table.size(0), ") of '", name, "' are not inside the vocabulary [0, ", vocab,
             ")");
}

void check_targets(const Tensor& targets, int64_t n, int64_t vocab, const char* op) {
  cpu::expect_cpu(targets, "targets", op);
  check_dtype(targets, DType::I32, "targets");
  check_shape(targets, {n}, "targets");
  check_target_values(targets.data<int32_t>(), n, vocab, op);
}

void check_logits(const Tensor& logits, int64_t begin, int64_t vocab, const char* op) {
  cpu::expect_float(logits, "logits", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V_local], has shape ",
             shape_str(logits.shape()));
  IEVO_CHECK(begin >= 0 && begin + logits.size(1) <= vocab, op, ": logit columns [", begin, ", ",
             begin + logits.size(1), ") are not inside the vocabulary [0, ", vocab, ")");
}

}  // namespace

DType vocab_ce_stat_dtype(DType logits) { return logits == DType::F64 ? DType::F64 : DType::F32; }

void embedding_forward_range(const Tensor& table, const Tensor& ids, int64_t begin, int64_t vocab,
                             Tensor& out, const Tensor& ids_host) {
#ifdef IEVO_CUDA
  if (!out.is_cpu()) return cuda::embedding_forward_range(table, ids, begin, vocab, out, ids_host);
#endif
  (void)ids_host;  // ids are on the host already
  const char* op = "embedding_forward_range";
  cpu::expect_float(table, "table", op);
  cpu::expect_float(out, "out", op);
  check_range(table, begin, vocab, "table", op);
  check_dtype(out, table.dtype(), "out");
  check_token_ids(ids, vocab, op);
  check_shape(out, {ids.numel(), table.size(1)}, "out");
  cpu::embedding_rows_forward(table, ids, begin, out);
}

void embedding_backward_range(const Tensor& dout, const Tensor& ids, int64_t begin, int64_t vocab,
                              Tensor& dtable, const Tensor& ids_host) {
#ifdef IEVO_CUDA
  if (!dtable.is_cpu()) return cuda::embedding_backward_range(dout, ids, begin, vocab, dtable, ids_host);
#endif
  (void)ids_host;  // ids are on the host already
  const char* op = "embedding_backward_range";
  cpu::expect_float(dtable, "dtable", op);
  cpu::expect_float(dout, "dout", op);
  check_range(dtable, begin, vocab, "dtable", op);
  check_dtype(dout, dtable.dtype(), "dout");
  check_token_ids(ids, vocab, op);
  check_shape(dout, {ids.numel(), dtable.size(1)}, "dout");
  cpu::embedding_rows_backward(dout, ids, begin, dtable, op);
}

void vocab_ce_local(const Tensor& logits, const Tensor& targets, int64_t begin, int64_t vocab,
                    Tensor& stats) {
#ifdef IEVO_CUDA
  if (!logits.is_cpu()) return cuda::vocab_ce_local(logits, targets, begin, vocab, stats);
#endif
  const char* op = "vocab_ce_local";
  check_logits(logits, begin, vocab, op);
  const int64_t n = logits.size(0), vl = logits.size(1);
  check_targets(targets, n, vocab, op);
  cpu::expect_float(stats, "stats", op);
  check_shape(stats, {2, n}, "stats");
  check_dtype(stats, vocab_ce_stat_dtype(logits.dtype()), "stats");
  const int32_t* t = targets.data<int32_t>();
  cpu::dispatch_float(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    T* lse = stats.data<T>();  // stats dtype == logits dtype on the CPU (f32 / f64)
    T* tl = lse + n;
#pragma omp parallel for schedule(static) if (n * vl > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = x + i * vl;
      double m = -INFINITY;
      for (int64_t j = 0; j < vl; ++j) m = std::max(m, static_cast<double>(xr[j]));
      double s = 0;
      for (int64_t j = 0; j < vl; ++j) s += std::exp(static_cast<double>(xr[j]) - m);
      lse[i] = static_cast<T>(vl > 0 ? m + std::log(s) : -INFINITY);
      const int64_t local = static_cast<int64_t>(t[i]) - begin;
      tl[i] = t[i] != kIgnoreIndex && local >= 0 && local < vl ? xr[local] : T(0);
    }
  });
}

double vocab_ce_combine(const Tensor& gathered, const Tensor& targets, int64_t vocab, Tensor& lse,
                        int64_t* count) {
#ifdef IEVO_CUDA
  if (!gathered.is_cpu()) return cuda::vocab_ce_combine(gathered, targets, vocab, lse, count);
#endif
  const char* op = "vocab_ce_combine";
  cpu::expect_float(gathered, "gathered", op);
  IEVO_CHECK(gathered.dim() == 3 && gathered.size(1) == 2, op,
             ": tensor 'gathered' must be [T, 2, N], has shape ", shape_str(gathered.shape()));
  const int64_t parts = gathered.size(0), n = gathered.size(2);
  check_targets(targets, n, vocab, op);
  cpu::expect_float(lse, "lse", op);
  check_shape(lse, {n}, "lse");
  check_dtype(lse, gathered.dtype(), "lse");
  const int32_t* t = targets.data<int32_t>();
  std::vector<double> row(static_cast<size_t>(n), 0.0);
  cpu::dispatch_float(gathered.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* g = gathered.data<T>();
    T* out = lse.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      double m = -INFINITY, tl = 0;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, static_cast<double>(g[p * 2 * n + i]));
      double s = 0;
      for (int64_t p = 0; p < parts; ++p) {
        s += std::exp(static_cast<double>(g[p * 2 * n + i]) - m);
        tl += static_cast<double>(g[p * 2 * n + n + i]);  // one rank holds the target, others 0
      }
      const double l = m + std::log(s);
      out[i] = static_cast<T>(l);
      if (t[i] != kIgnoreIndex) row[i] = l - tl;
    }
  });
  return cpu::loss_total(row, t, count);
}

void vocab_ce_backward(const Tensor& logits, const Tensor& targets, int64_t begin,
                       const Tensor& lse, double grad_scale, Tensor& dlogits) {
#ifdef IEVO_CUDA
  if (!logits.is_cpu())
    return cuda::vocab_ce_backward(logits, targets, begin, lse, grad_scale, dlogits);
#endif
  const char* op = "vocab_ce_backward";
  const int64_t n = logits.dim() == 2 ? logits.size(0) : 0, vl = logits.dim() == 2 ? logits.size(1) : 0;
  cpu::expect_float(logits, "logits", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V_local], has shape ",
             shape_str(logits.shape()));
  IEVO_CHECK(begin >= 0, op, ": negative vocabulary offset ", begin);
  cpu::expect_cpu(targets, "targets", op);
  check_dtype(targets, DType::I32, "targets");
  check_shape(targets, {n}, "targets");
  cpu::expect_float(lse, "lse", op);
  check_shape(lse, {n}, "lse");
  check_dtype(lse, vocab_ce_stat_dtype(logits.dtype()), "lse");
  cpu::expect_float(dlogits, "dlogits", op);
  check_shape(dlogits, logits.shape(), "dlogits");
  check_dtype(dlogits, logits.dtype(), "dlogits");
  const int32_t* t = targets.data<int32_t>();
  cpu::dispatch_float(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    const T* l = lse.data<T>();
    T* g = dlogits.data<T>();
#pragma omp parallel for schedule(static) if (n * vl > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = x + i * vl;
      T* gr = g + i * vl;  // may alias xr: each element is read before it is written
      if (t[i] == kIgnoreIndex) {
        std::fill_n(gr, vl, T(0));
        continue;
      }
      const double li = static_cast<double>(l[i]);
      const int64_t local = static_cast<int64_t>(t[i]) - begin;
      for (int64_t j = 0; j < vl; ++j) {
        const double p = std::exp(static_cast<double>(xr[j]) - li);
        gr[j] = static_cast<T>(grad_scale * (p - (j == local ? 1.0 : 0.0)));
      }
    }
  });
}

void swap_leading_dims(const Tensor& x, Tensor& out) {
  const char* op = "swap_leading_dims";
  IEVO_CHECK(x.defined() && out.defined(), op, ": undefined tensor");
  IEVO_CHECK(x.dim() >= 2, op, ": tensor 'x' needs at least 2 dimensions, has shape ",
             shape_str(x.shape()));
  Shape want = x.shape();
  std::swap(want[0], want[1]);
  check_shape(out, want, "out");
  check_dtype(out, x.dtype(), "out");
  const int64_t a = x.size(0), b = x.size(1);
  const int64_t block = x.numel() / std::max<int64_t>(1, a * b);  // elements of one [a, b] block
  // Each [a, b] block contiguous; the two leading dimensions may have any strides that keep the
  // blocks apart (column slices of wider matrices, viewed).
  auto blocks_apart = [&](const Tensor& t, int rows_dim) {
    int64_t expect = 1;
    for (int d = t.dim() - 1; d >= 2; --d) {
      if (t.size(d) > 1 && t.strides()[d] != expect) return false;
      expect *= t.size(d);
    }
    return t.size(rows_dim) <= 1 || t.strides()[rows_dim] >= block;
  };
  IEVO_CHECK(blocks_apart(x, 0) && blocks_apart(out, 1), op,
             ": each block of the trailing dimensions must be contiguous and the blocks apart (",
             x.describe(), " strides ", shape_str(x.strides()), ", ", out.describe(), " strides ",
             shape_str(out.strides()), ")");
  IEVO_CHECK(x.device() == out.device(), op, ": tensors on different devices (", x.describe(),
             ", ", out.describe(), ")");
  IEVO_CHECK(x.raw() != out.raw() || x.numel() == 0, op, ": out must not alias x");
#ifdef IEVO_CUDA
  if (!x.is_cpu()) return cuda::swap_leading_dims(x, out);
#endif
  const size_t es = dtype_size(x.dtype());
  const int64_t xa = x.strides()[0], xb = x.strides()[1], ob = out.strides()[0], oa = out.strides()[1];
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
#pragma omp parallel for schedule(static) if (x.numel() > cpu::kParallelMin)
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      std::memcpy(dst + static_cast<size_t>(j * ob + i * oa) * es, src + static_cast<size_t>(i * xa + j * xb) * es,
                  static_cast<size_t>(block) * es);
}

}  // namespace ievo::ops
