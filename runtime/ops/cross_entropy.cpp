// Softmax cross-entropy on the CPU, per row (max-subtracted, sums in double):
//   lse = m + log sum_v exp(x_v - m),  loss = lse - x_target,
//   dlogits_v = grad_scale * (exp(x_v - lse) - [v == target]).
// lm_head_loss is written with the public ops (matmul, cross_entropy_*), so it runs on any
// device: per chunk of tokens, logits = h_c w^T, loss, and when gradients are wanted,
// dlogits in place, dh_c = dlogits w, dw += dlogits^T h_c.
#include "runtime/ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/matmul.h"

namespace ievo::ops {
namespace {

void check_args(const Tensor& logits, const Tensor& targets, const char* op) {
  cpu::expect_float(logits, "logits", op);
  cpu::expect_cpu(targets, "targets", op);
  IEVO_CHECK(logits.dim() == 2, op, ": tensor 'logits' must be [N, V], has shape ",
             shape_str(logits.shape()));
  check_dtype(targets, DType::I32, "targets");
  check_shape(targets, {logits.size(0)}, "targets");
  check_target_values(targets.data<int32_t>(), targets.numel(), logits.size(1), op);
}

// log sum exp of one row, max-subtracted, in double.
template <typename T>
double row_lse(const T* x, int64_t v) {
  double m = -INFINITY;
  for (int64_t j = 0; j < v; ++j) m = std::max(m, static_cast<double>(x[j]));
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(static_cast<double>(x[j]) - m);
  return m + std::log(s);
}

}  // namespace

double cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             int64_t* count) {
#ifdef IEVO_CUDA
  if (!logits.is_cpu()) return cuda::cross_entropy_forward(logits, targets, losses, count);
#endif
  const char* op = "cross_entropy_forward";
  check_args(logits, targets, op);
  cpu::expect_float(losses, "losses", op);
  check_shape(losses, {logits.size(0)}, "losses");
  check_dtype(losses, logits.dtype(), "losses");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const int32_t* t = targets.data<int32_t>();
  std::vector<double> row(static_cast<size_t>(n), 0.0);
  cpu::dispatch_float(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    T* lp = losses.data<T>();
#pragma omp parallel for schedule(static) if (n * vocab > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      if (t[i] == kIgnoreIndex) {
        lp[i] = T(0);
        continue;
      }
      const T* xr = x + i * vocab;
      row[i] = row_lse(xr, vocab) - static_cast<double>(xr[t[i]]);
      lp[i] = static_cast<T>(row[i]);
    }
  });
  return cpu::loss_total(row, t, count);
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                            Tensor& dlogits) {
#ifdef IEVO_CUDA
  if (!logits.is_cpu()) return cuda::cross_entropy_backward(logits, targets, grad_scale, dlogits);
#endif
  const char* op = "cross_entropy_backward";
  check_args(logits, targets, op);
  cpu::expect_float(dlogits, "dlogits", op);
  check_shape(dlogits, logits.shape(), "dlogits");
  check_dtype(dlogits, logits.dtype(), "dlogits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const int32_t* t = targets.data<int32_t>();
  cpu::dispatch_float(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    T* g = dlogits.data<T>();
#pragma omp parallel for schedule(static) if (n * vocab > cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T* xr = x + i * vocab;
      T* gr = g + i * vocab;  // may alias xr: each element is read before it is written
      if (t[i] == kIgnoreIndex) {
        std::fill_n(gr, vocab, T(0));
        continue;
      }
      const double lse = row_lse(xr, vocab);
      for (int64_t j = 0; j < vocab; ++j) {
        const double p = std::exp(static_cast<double>(xr[j]) - lse);
        gr[j] = static_cast<T>(grad_scale * (p - (j == t[i] ? 1.0 : 0.0)));
      }
    }
  });
}

double cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                                      Tensor& losses, int64_t* count, Tensor& dlogits) {
#ifdef IEVO_CUDA
  if (!logits.is_cpu())
    return cuda::cross_entropy_forward_backward(logits, targets, grad_scale, losses, count, dlogits);
#endif
  const double sum = cross_entropy_forward(logits, targets, losses, count);
  cross_entropy_backward(logits, targets, grad_scale, dlogits);
  return sum;
}

namespace {

// The loss sum and count over an LM head's chunks. On the CPU each chunk's call returns them (and
// fails at once for a bad target); on CUDA they stay on the device (cuda::cross_entropy_accumulate)
// and read() fetches them once: one synchronisation per head instead of one per chunk, so the
// device never waits for the host between chunks. A target outside the vocabulary then fails in
// read(), naming it and its row of the head, before the loss or the gradients are used.
class ChunkTotals {
 public:
  explicit ChunkTotals(Device d) {
#ifdef IEVO_CUDA
    if (d == Device::CUDA) dev_ = Tensor::zeros({3}, DType::I64, d);  // a memset: no host copy
#else
    (void)d;
#endif
  }
  // Rows [row0, row0 + n) of the head: the forward, or with dlogits also the backward.
  void add(const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& losses,
           Tensor* dlogits, int64_t row0) {
#ifdef IEVO_CUDA
    if (dev_.defined()) {
      cuda::cross_entropy_accumulate(logits, targets, grad_scale, losses, dlogits, row0, dev_);
      return;
    }
#endif
    (void)row0;
    int64_t cnt = 0;
    sum_ += dlogits ? cross_entropy_forward_backward(logits, targets, grad_scale, losses, &cnt, *dlogits)
                    : cross_entropy_forward(logits, targets, losses, &cnt);
    count_ += cnt;
  }
  // targets: the head's [N]; vocab: V (for the error).
  double read(const Tensor& targets, int64_t vocab, int64_t* count) {
    if (dev_.defined()) {
      const Tensor host = dev_.to(Device::CPU);
      const int64_t* v = host.data<int64_t>();
      std::memcpy(&sum_, &v[0], sizeof(double));
      count_ = v[1];
      if (v[2] != 0) {
        const int64_t row = v[2] - 1;
        const int32_t t = targets.slice(0, row, row + 1).to(Device::CPU).data<int32_t>()[0];
        target_error("lm_head_loss", t, row, vocab);
      }
    }
    *count = count_;
    return sum_;
  }

 private:
  Tensor dev_;  // CUDA: i64 [3]: the sum's f64 bits, the count, the first bad row + 1 (0: none)
  double sum_ = 0;
  int64_t count_ = 0;
};

}  // namespace

double lm_head_loss(const Tensor& h, const Tensor& w, const Tensor& targets, double grad_scale,
                    int64_t chunk_tokens, int64_t* count, Tensor* dh, Tensor* dw, float dw_beta) {
  const char* op = "lm_head_loss";
  IEVO_CHECK(h.defined() && h.dim() == 2, op, ": tensor 'h' must be [N, D]");
  IEVO_CHECK(w.defined() && w.dim() == 2, op, ": tensor 'w' must be [V, D]");
  IEVO_CHECK(h.is_contiguous(), op, ": tensor 'h' must be contiguous");
  const int64_t n = h.size(0), dim = h.size(1), vocab = w.size(0);
  check_shape(w, {vocab, dim}, "w");
  check_shape(targets, {n}, "targets");
  IEVO_CHECK(chunk_tokens > 0, op, ": chunk_tokens must be positive, got ", chunk_tokens);
  const bool grad = dh && dh->defined();
  if (grad) check_shape(*dh, h.shape(), "dh");
  if (dw && dw->defined()) check_shape(*dw, w.shape(), "dw");
  const int64_t rows = std::min(chunk_tokens, n);
  Tensor logits = Tensor::empty({rows, vocab}, h.dtype(), h.device());
  Tensor losses = Tensor::empty({rows}, h.dtype(), h.device());
  ChunkTotals totals(h.device());
  for (int64_t s = 0; s < n; s += chunk_tokens) {
    const int64_t e = std::min(n, s + chunk_tokens);
    const Tensor hc = h.slice(0, s, e), tc = targets.slice(0, s, e);
    Tensor lc = logits.slice(0, 0, e - s), lossc = losses.slice(0, 0, e - s);
    matmul(hc, false, w, true, lc);
    totals.add(lc, tc, grad_scale, lossc, grad ? &lc : nullptr, s);
    if (!grad) continue;
    if (dw && dw->defined()) matmul(lc, true, hc, false, *dw, 1.0f, std::exchange(dw_beta, 1.0f));
    Tensor dhc = dh->slice(0, s, e);  // after dw: dh may alias h
    matmul(lc, false, w, false, dhc);
  }
  if (dw && dw->defined() && dw_beta == 0.0f) dw->zero_();  // no chunk: still to be written
  int64_t cnt = 0;
  const double total = totals.read(targets, vocab, &cnt);
  if (count) *count += cnt;
  return total;
}

}  // namespace ievo::ops
