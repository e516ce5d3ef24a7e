// Causal grouped-query attention over packed sequences, CPU reference (dot products and softmax
// sums in double, results stored in the tensors' type).
// Forward, for query i of sequence [b, e) and head h (kv head g = h / (Hq / Hkv)):
//   s_j = scale * q_i . k_j  (b <= j <= i),  lse_i = log sum_j exp(s_j),
//   out_i = sum_j exp(s_j - lse_i) v_j.
// Backward, with P_ij = exp(s_ij - lse_i) recomputed from the saved lse:
//   D_i = dO_i . O_i,  dS_ij = P_ij (dO_i . v_j - D_i),
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in g, i} dS_ij q_i,  dv_j = sum P_ij dO_i.
// Every [N, H, hd] tensor may have its own row stride (q, k, v as column slices of a joint QKV
// projection's output; dq, dk, dv written into one). The forward runs one task per (sequence,
// query head); the backward one task per (sequence, kv head), which owns dk/dv of that kv head
// and dq of its query heads (no races).
#include "runtime/ops/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/ops/cpu_common.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::ops {
namespace {

std::atomic<AttentionBackend> g_backend{AttentionBackend::Auto};

struct Dims {
  int64_t n, hq, hkv, hd;
};

Dims check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  cpu::expect_float_rows(q, "q", op);
  cpu::expect_float_rows(k, "k", op);
  cpu::expect_float_rows(v, "v", op);
  IEVO_CHECK(q.dim() == 3, op, ": tensor 'q' must be [N, Hq, hd], has shape ",
             shape_str(q.shape()));
  IEVO_CHECK(k.dim() == 3, op, ": tensor 'k' must be [N, Hkv, hd], has shape ",
             shape_str(k.shape()));
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2)};
  check_shape(k, {d.n, d.hkv, d.hd}, "k");
  check_shape(v, {d.n, d.hkv, d.hd}, "v");
  check_dtype(k, q.dtype(), "k");
  check_dtype(v, q.dtype(), "v");
  IEVO_CHECK(d.hkv > 0 && d.hq % d.hkv == 0, op, ": query heads ", d.hq,
             " not a multiple of kv heads ", d.hkv);
  return d;
}

void check_like(const Tensor& t, const Shape& shape, DType dt, const char* name, const char* op) {
  cpu::expect_float_rows(t, name, op);
  check_shape(t, shape, name);
  check_dtype(t, dt, name);
}

// Sequence boundaries: cu[0] = 0, non-decreasing, cu[S] = N, lengths <= max_seqlen.
std::vector<int64_t> read_cu_seqlens(const Tensor& cu, int64_t n, int max_seqlen, const char* op) {
  cpu::expect_cpu(cu, "cu_seqlens", op);
  check_dtype(cu, DType::I32, "cu_seqlens");
  IEVO_CHECK(cu.dim() == 1 && cu.numel() >= 1, op, ": tensor 'cu_seqlens' must be [S+1], has shape ",
             shape_str(cu.shape()));
  const int32_t* p = cu.data<int32_t>();
  std::vector<int64_t> out(p, p + cu.numel());
  IEVO_CHECK(out[0] == 0, op, ": cu_seqlens[0] is ", out[0], ", expected 0");
  for (size_t s = 0; s + 1 < out.size(); ++s) {
    const int64_t len = out[s + 1] - out[s];
    IEVO_CHECK(len >= 0, op, ": cu_seqlens decreases at ", s + 1, " (", out[s], " -> ",
               out[s + 1], ")");
    IEVO_CHECK(len <= max_seqlen, op, ": sequence ", s, " has length ", len,
               " > max_seqlen ", max_seqlen);
  }
  IEVO_CHECK(out.back() == n, op, ": cu_seqlens ends at ", out.back(), " but there are ", n,
             " tokens");
  return out;
}

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace

void set_attention_backend(AttentionBackend b) { g_backend.store(b); }
AttentionBackend attention_backend() { return g_backend.load(); }

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                       int max_seqlen, Tensor& out, Tensor& lse, const Tensor& cu_seqlens_host) {
#ifdef IEVO_CUDA
  if (!q.is_cpu())
    return cuda::attention_forward(q, k, v, cu_seqlens, max_seqlen, out, lse, cu_seqlens_host);
#else
  (void)cu_seqlens_host;
#endif
  const char* op = "attention_forward";
  const Dims d = check_qkv(q, k, v, op);
  check_like(out, q.shape(), q.dtype(), "out", op);
  check_like(lse, {d.hq, d.n}, q.dtype(), "lse", op);
  cpu::expect_float(lse, "lse", op);
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, d.n, max_seqlen, op);
  const int64_t nseq = static_cast<int64_t>(cu.size()) - 1, rep = d.hq / d.hkv;
  const int64_t qs = q.row_stride(), ks = k.row_stride(), vs = v.row_stride(), os = out.row_stride();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.hd));
  cpu::dispatch_float(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op_ = out.data<T>();
    T* lp = lse.data<T>();
#pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < nseq * d.hq; ++task) {
      const int64_t s = task / d.hq, h = task % d.hq, g = h / rep;
      const int64_t b = cu[s], e = cu[s + 1];
      std::vector<double> sc(static_cast<size_t>(e - b)), o(static_cast<size_t>(d.hd));
      for (int64_t i = b; i < e; ++i) {
        const T* qi = qp + i * qs + h * d.hd;
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t j = b; j <= i; ++j) {
          sc[j - b] = scale * dot(qi, kp + j * ks + g * d.hd, d.hd);
          m = std::max(m, sc[j - b]);
        }
        double l = 0;
        std::fill(o.begin(), o.end(), 0.0);
        for (int64_t j = b; j <= i; ++j) {
          const double p = std::exp(sc[j - b] - m);
          l += p;
          const T* vj = vp + j * vs + g * d.hd;
          for (int64_t c = 0; c < d.hd; ++c) o[c] += p * vj[c];
        }
        T* oi = op_ + i * os + h * d.hd;
        for (int64_t c = 0; c < d.hd; ++c) oi[c] = static_cast<T>(o[c] / l);
        lp[h * d.n + i] = static_cast<T>(m + std::log(l));
      }
    }
  });
}

void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens,
                        int max_seqlen, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor& cu_seqlens_host) {
#ifdef IEVO_CUDA
  if (!q.is_cpu())
    return cuda::attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dq, dk, dv,
                                    cu_seqlens_host);
#else
  (void)cu_seqlens_host;
#endif
  const char* op = "attention_backward";
  const Dims d = check_qkv(q, k, v, op);
  check_like(dout, q.shape(), q.dtype(), "dout", op);
  check_like(out, q.shape(), q.dtype(), "out", op);
  check_like(lse, {d.hq, d.n}, q.dtype(), "lse", op);
  check_like(dq, q.shape(), q.dtype(), "dq", op);
  check_like(dk, k.shape(), q.dtype(), "dk", op);
  check_like(dv, v.shape(), q.dtype(), "dv", op);
  cpu::expect_float(lse, "lse", op);
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, d.n, max_seqlen, op);
  const int64_t nseq = static_cast<int64_t>(cu.size()) - 1, rep = d.hq / d.hkv, hd = d.hd;
  const int64_t qs = q.row_stride(), ks = k.row_stride(), vs = v.row_stride(), os = out.row_stride(),
                gs = dout.row_stride(), dqs = dq.row_stride(), dks = dk.row_stride(),
                dvs = dv.row_stride();
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  cpu::dispatch_float(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    const T *gp = dout.data<T>(), *op_ = out.data<T>(), *lp = lse.data<T>();
    T *dqp = dq.data<T>(), *dkp = dk.data<T>(), *dvp = dv.data<T>();
#pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < nseq * d.hkv; ++task) {
      const int64_t s = task / d.hkv, g = task % d.hkv;
      const int64_t b = cu[s], e = cu[s + 1], len = e - b;
      std::vector<double> dk_acc(static_cast<size_t>(len * hd), 0.0);
      std::vector<double> dv_acc(static_cast<size_t>(len * hd), 0.0);
      std::vector<double> dq_acc(static_cast<size_t>(hd));
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t i = b; i < e; ++i) {
          const T* qi = qp + i * qs + h * hd;
          const T* gi = gp + i * gs + h * hd;
          const double di = dot(gi, op_ + i * os + h * hd, hd);
          const double lse_i = lp[h * d.n + i];
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
          for (int64_t j = b; j <= i; ++j) {
            const T* kj = kp + j * ks + g * hd;
            const T* vj = vp + j * vs + g * hd;
            const double p = std::exp(scale * dot(qi, kj, hd) - lse_i);
            const double ds = p * (dot(gi, vj, hd) - di);
            double* dkj = dk_acc.data() + (j - b) * hd;
            double* dvj = dv_acc.data() + (j - b) * hd;
            for (int64_t c = 0; c < hd; ++c) {
              dq_acc[c] += ds * kj[c];
              dkj[c] += ds * qi[c];
              dvj[c] += p * gi[c];
            }
          }
          T* dqi = dqp + i * dqs + h * hd;
          for (int64_t c = 0; c < hd; ++c) dqi[c] = static_cast<T>(scale * dq_acc[c]);
        }
      }
      for (int64_t j = b; j < e; ++j) {
        T* dkj = dkp + j * dks + g * hd;
        T* dvj = dvp + j * dvs + g * hd;
        for (int64_t c = 0; c < hd; ++c) {
          dkj[c] = static_cast<T>(scale * dk_acc[(j - b) * hd + c]);
          dvj[c] = static_cast<T>(dv_acc[(j - b) * hd + c]);
        }
      }
    }
  });
}

}  // namespace ievo::ops
