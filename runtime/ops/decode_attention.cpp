#include "runtime/ops/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/ops/attention.h"
#include "runtime/ops/cpu_common.h"

namespace ievo::ops {

void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out) {
  const char* op = "attention_decode";
  IEVO_CHECK(q.dim() == 3 && k.dim() == 3, op, ": q must be [n, Hq, hd] and k [past + n, Hkv, hd], got ",
             shape_str(q.shape()), " and ", shape_str(k.shape()));
  const int64_t n = q.size(0), hq = q.size(1), hd = q.size(2), total = k.size(0), hkv = k.size(1);
  check_shape(k, {total, hkv, hd}, "k");
  check_shape(v, {total, hkv, hd}, "v");
  check_shape(out, q.shape(), "out");
  check_dtype(k, q.dtype(), "k");
  check_dtype(v, q.dtype(), "v");
  check_dtype(out, q.dtype(), "out");
  IEVO_CHECK(total >= n, op, ": ", n, " queries but only ", total, " keys (the new tokens' keys must be in k)");
  IEVO_CHECK(hkv > 0 && hq % hkv == 0, op, ": query heads ", hq, " not a multiple of kv heads ", hkv);
  const int64_t past = total - n;
  if (!q.is_cpu()) {
    // Rows past.. of causal attention over [zeros(past) ; q] are exactly what we want.
    Tensor qf = Tensor::zeros({total, hq, hd}, q.dtype(), q.device());
    Tensor tail = qf.slice(0, past, total);
    tail.copy_from(q);
    Tensor of = Tensor::empty({total, hq, hd}, q.dtype(), q.device());
    Tensor lse = Tensor::empty({hq, total}, q.dtype() == DType::F64 ? DType::F64 : DType::F32,
                               q.device());
    const Tensor cu = Tensor::from_vector(std::vector<int32_t>{0, static_cast<int32_t>(total)}, {2});
    attention_forward(qf, k, v, cu, static_cast<int>(total), of, lse);
    out.copy_from(of.slice(0, past, total));
    return;
  }
  cpu::expect_float_rows(q, "q", op);
  cpu::expect_float(k, "k", op);
  cpu::expect_float(v, "v", op);
  cpu::expect_float(out, "out", op);
  const int64_t rep = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  cpu::dispatch_float(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op_ = out.data<T>();
#pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < n * hq; ++task) {
      const int64_t i = task / hq, h = task % hq, g = h / rep, last = past + i;
      const T* qi = qp + i * q.row_stride() + h * hd;
      std::vector<double> sc(static_cast<size_t>(last + 1)), o(static_cast<size_t>(hd), 0.0);
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= last; ++j) {
        const T* kj = kp + (j * hkv + g) * hd;
        double s = 0;
        for (int64_t c = 0; c < hd; ++c) s += static_cast<double>(qi[c]) * kj[c];
        sc[j] = scale * s;
        m = std::max(m, sc[j]);
      }
      double l = 0;
      for (int64_t j = 0; j <= last; ++j) {
        const double p = std::exp(sc[j] - m);
        l += p;
        const T* vj = vp + (j * hkv + g) * hd;
        for (int64_t c = 0; c < hd; ++c) o[c] += p * vj[c];
      }
      T* oi = op_ + (i * hq + h) * hd;
      for (int64_t c = 0; c < hd; ++c) oi[c] = static_cast<T>(o[c] / l);
    }
  });
}

}  // namespace ievo::ops
