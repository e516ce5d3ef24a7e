// CPU reference ops: forwards against naive formulas written here (f32 and f64), backwards
// against central finite differences in f64 of a random linear functional L = sum(r * out),
// AdamW against a scalar transcription of torch's formula, error messages of bad inputs,
// casts and reductions.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "runtime/ops/adamw.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/rmsnorm.h"
#include "runtime/ops/rope.h"
#include "runtime/ops/swiglu.h"
#include "runtime/ops/vocab_parallel.h"
#include "util.h"

using namespace ievo;
using ievo::test::max_abs_diff;
using ievo::test::random_tensor;
using ievo::test::rel_l2;

namespace {

constexpr double kFdEps = 1e-6;
constexpr double kFdTol = 1e-6;  // rel L2 of analytic vs finite-difference gradients

// sum_i r_i * x_i in double.
double dot_all(const Tensor& r, const Tensor& x) {
  auto a = r.to_double_vector(), b = x.to_double_vector();
  EXPECT_EQ(a.size(), b.size());
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of f with respect to every element of x (f64, CPU; perturbed in place).
Tensor numeric_grad(Tensor x, const std::function<double()>& f, double eps = kFdEps) {
  Tensor g = Tensor::zeros(x.shape(), DType::F64);
  double* p = x.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double save = p[i];
    p[i] = save + eps;
    const double fp = f();
    p[i] = save - eps;
    const double fm = f();
    p[i] = save;
    g.data<double>()[i] = (fp - fm) / (2 * eps);
  }
  return g;
}

Tensor ids_tensor(const std::vector<int32_t>& v) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
}

Tensor sub(const Tensor& a, const Tensor& b) {  // a - b, f64
  Tensor out = a.to(DType::F64);
  auto vb = b.to_double_vector();
  for (int64_t i = 0; i < out.numel(); ++i) out.data<double>()[i] -= vb[i];
  return out;
}

const DType kFloatTypes[] = {DType::F32, DType::F64};
double fwd_tol(DType dt) { return dt == DType::F32 ? 1e-6 : 1e-13; }

template <typename Fn>
std::string error_message(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no ievo::Error thrown)";
}

}  // namespace

// ---------------------------------------------------------------------------------------- matmul

TEST(Matmul, ForwardAllTransposesAlphaBeta) {
  const int64_t M = 5, K = 4, N = 3;
  for (DType dt : kFloatTypes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        Tensor a = random_tensor(ta ? Shape{K, M} : Shape{M, K}, dt, 1);
        Tensor b = random_tensor(tb ? Shape{N, K} : Shape{K, N}, dt, 2);
        Tensor c = random_tensor({M, N}, dt, 3);
        Tensor c0 = c.to(DType::F64);
        ops::matmul(a, ta, b, tb, c, 0.5f, 2.0f);
        Tensor ref = Tensor::empty({M, N}, DType::F64);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            double s = 0;
            for (int64_t k = 0; k < K; ++k)
              s += a.item(ta ? k * M + i : i * K + k) * b.item(tb ? j * K + k : k * N + j);
            ref.data<double>()[i * N + j] = 0.5 * s + 2.0 * c0.item(i * N + j);
          }
        EXPECT_LT(rel_l2(c, ref), fwd_tol(dt)) << dtype_name(dt) << " ta=" << ta << " tb=" << tb;
      }
}

TEST(Matmul, AddFoldsResidual) {
  // D = A B^T + C equals matmul then add; C is left as it was; C = D works in place.
  for (DType dt : kFloatTypes) {
    Tensor a = random_tensor({5, 4}, dt, 7), b = random_tensor({3, 4}, dt, 8), c = random_tensor({5, 3}, dt, 9);
    Tensor c0 = c.clone(), ref = Tensor::empty({5, 3}, dt), d = Tensor::empty({5, 3}, dt);
    ops::matmul(a, false, b, true, ref);
    ops::add(ref, c, ref);
    ops::matmul_add(a, false, b, true, c, d);
    EXPECT_LT(rel_l2(d, ref), fwd_tol(dt)) << dtype_name(dt);
    EXPECT_EQ(max_abs_diff(c, c0), 0.0);
    ops::matmul_add(a, false, b, true, c, c);
    EXPECT_EQ(max_abs_diff(c, d), 0.0);
  }
  Tensor a = random_tensor({5, 4}, DType::F32, 7), b = random_tensor({3, 4}, DType::F32, 8);
  Tensor c = random_tensor({5, 2}, DType::F32, 9), d = Tensor::empty({5, 3}, DType::F32);
  try {
    ops::matmul_add(a, false, b, true, c, d);
    FAIL() << "a residual of the wrong shape was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'c'"), std::string::npos) << e.what();
  }
}

TEST(Matmul, ColumnSlicesUseRowStride) {
  // A = columns [2, 6) of a [5, 9] matrix, C = columns [1, 4) of a [5, 7] matrix.
  for (DType dt : kFloatTypes) {
    Tensor abig = random_tensor({5, 9}, dt, 4), b = random_tensor({4, 3}, dt, 5);
    Tensor cbig = random_tensor({5, 7}, dt, 6);
    Tensor cbig0 = cbig.clone();
    Tensor a = abig.slice(1, 2, 6), c = cbig.slice(1, 1, 4);
    ops::matmul(a, false, b, false, c);
    Tensor ac = a.clone();
    Tensor ref = Tensor::empty({5, 3}, dt);
    ops::matmul(ac, false, b, false, ref);
    EXPECT_LT(rel_l2(c.clone(), ref), fwd_tol(dt));
    // Columns outside the slice are untouched.
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j : {0, 4, 5, 6}) EXPECT_EQ(cbig.item(i * 7 + j), cbig0.item(i * 7 + j));
  }
}

TEST(Matmul, BackwardAllTransposesFiniteDifferences) {
  const int64_t M = 4, K = 3, N = 5;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = random_tensor(ta ? Shape{K, M} : Shape{M, K}, DType::F64, 10);
      Tensor b = random_tensor(tb ? Shape{N, K} : Shape{K, N}, DType::F64, 11);
      Tensor r = random_tensor({M, N}, DType::F64, 12);
      Tensor c = Tensor::empty({M, N}, DType::F64);
      auto loss = [&] {
        ops::matmul(a, ta, b, tb, c);
        return dot_all(r, c);
      };
      // C = op(A) op(B): d op(A) = dC op(B)^T, d op(B) = op(A)^T dC.
      Tensor da = Tensor::empty(a.shape(), DType::F64), db = Tensor::empty(b.shape(), DType::F64);
      if (!ta) ops::matmul(r, false, b, !tb, da);  // dA = dC op(B)^T
      else ops::matmul(b, tb, r, true, da);        // dA = op(B) dC^T
      if (!tb) ops::matmul(a, !ta, r, false, db);  // dB = op(A)^T dC
      else ops::matmul(r, true, a, ta, db);        // dB = dC^T op(A)
      EXPECT_LT(rel_l2(da, numeric_grad(a, loss)), kFdTol) << "ta=" << ta << " tb=" << tb;
      EXPECT_LT(rel_l2(db, numeric_grad(b, loss)), kFdTol) << "ta=" << ta << " tb=" << tb;
    }
}

TEST(Matmul, ShapeMismatchNamesTensor) {
  Tensor a = Tensor::zeros({2, 3}, DType::F32), b = Tensor::zeros({4, 2}, DType::F32);
  Tensor c = Tensor::zeros({2, 2}, DType::F32);
  EXPECT_NE(error_message([&] { ops::matmul(a, false, b, false, c); }).find("inner dimensions"),
            std::string::npos);
  Tensor b2 = Tensor::zeros({3, 5}, DType::F32);
  EXPECT_NE(error_message([&] { ops::matmul(a, false, b2, false, c); }).find("'c'"),
            std::string::npos);
}

// ------------------------------------------------------------------------------------ embedding

TEST(Embedding, ForwardGathersAndBackwardAccumulates) {
  const int64_t V = 7, D = 5;
  Tensor ids = ids_tensor({3, 0, 3, 6, 1, 3});
  for (DType dt : kFloatTypes) {
    Tensor table = random_tensor({V, D}, dt, 20), out = Tensor::empty({6, D}, dt);
    ops::embedding_forward(table, ids, out);
    for (int64_t n = 0; n < 6; ++n)
      for (int64_t d = 0; d < D; ++d)
        EXPECT_EQ(out.item(n * D + d), table.item(ids.item(n) * D + d));
  }
  Tensor table = random_tensor({V, D}, DType::F64, 21), out = Tensor::empty({6, D}, DType::F64);
  Tensor r = random_tensor({6, D}, DType::F64, 22);
  Tensor dtable = random_tensor({V, D}, DType::F64, 23), dtable0 = dtable.clone();
  ops::embedding_backward(r, ids, dtable);  // accumulates
  Tensor fd = numeric_grad(table, [&] {
    ops::embedding_forward(table, ids, out);
    return dot_all(r, out);
  });
  EXPECT_LT(rel_l2(sub(dtable, dtable0), fd), kFdTol);
}

TEST(Embedding, IdOutOfRangeNamesIt) {
  Tensor table = Tensor::zeros({7, 3}, DType::F32), out = Tensor::empty({3, 3}, DType::F32);
  const std::string msg = error_message([&] { ops::embedding_forward(table, ids_tensor({1, 2, 7}), out); });
  EXPECT_NE(msg.find("token id 7"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 2"), std::string::npos) << msg;
  Tensor dtable = Tensor::zeros({7, 3}, DType::F32);
  const std::string msg2 = error_message([&] { ops::embedding_backward(out, ids_tensor({-1, 2, 3}), dtable); });
  EXPECT_NE(msg2.find("token id -1"), std::string::npos) << msg2;
}

// -------------------------------------------------------------------------------------- rmsnorm

TEST(RMSNorm, ForwardMatchesFormula) {
  const int64_t N = 4, D = 6;
  const double eps = 1e-5;
  for (DType dt : kFloatTypes) {
    Tensor x = random_tensor({N, D}, dt, 30, -2, 2), w = random_tensor({D}, dt, 31);
    Tensor y = Tensor::empty({N, D}, dt), rstd = Tensor::empty({N}, dt);
    ops::rmsnorm_forward(x, w, eps, y, rstd);
    Tensor yref = Tensor::empty({N, D}, DType::F64), rref = Tensor::empty({N}, DType::F64);
    for (int64_t i = 0; i < N; ++i) {
      double ms = 0;
      for (int64_t j = 0; j < D; ++j) ms += x.item(i * D + j) * x.item(i * D + j) / D;
      const double r = 1 / std::sqrt(ms + eps);
      rref.data<double>()[i] = r;
      for (int64_t j = 0; j < D; ++j) yref.data<double>()[i * D + j] = w.item(j) * x.item(i * D + j) * r;
    }
    EXPECT_LT(rel_l2(y, yref), fwd_tol(dt)) << dtype_name(dt);
    EXPECT_LT(rel_l2(rstd, rref), fwd_tol(dt)) << dtype_name(dt);
  }
}

TEST(RMSNorm, BackwardFiniteDifferences) {
  const int64_t N = 5, D = 7;
  const double eps = 1e-6;
  Tensor x = random_tensor({N, D}, DType::F64, 32, -2, 2), w = random_tensor({D}, DType::F64, 33);
  Tensor r = random_tensor({N, D}, DType::F64, 34);
  Tensor y = Tensor::empty({N, D}, DType::F64), rstd = Tensor::empty({N}, DType::F64);
  auto loss = [&] {
    ops::rmsnorm_forward(x, w, eps, y, rstd);
    return dot_all(r, y);
  };
  loss();
  Tensor dx = Tensor::empty({N, D}, DType::F64);
  Tensor dw = random_tensor({D}, DType::F64, 35), dw0 = dw.clone();
  ops::rmsnorm_backward(r, x, w, rstd, dx, dw);
  EXPECT_LT(rel_l2(dx, numeric_grad(x, loss)), kFdTol);
  EXPECT_LT(rel_l2(sub(dw, dw0), numeric_grad(w, loss)), kFdTol);
  // With a residual gradient added in the same pass (and written in place over it).
  Tensor res = random_tensor({N, D}, DType::F64, 36), dx2 = res.clone(), dw2 = dw0.clone();
  ops::rmsnorm_backward(r, x, w, rstd, dx2, dw2, dx2);
  ops::add(dx, res, dx);
  EXPECT_LT(max_abs_diff(dx2, dx), 1e-14);
  EXPECT_LT(max_abs_diff(dw2, dw), 1e-14);
  // dw_beta 0 (a lazily zeroed gradient's first write): dw is overwritten, its NaNs never read,
  // and equals the sum accumulated into zeros.
  Tensor dx3 = Tensor::empty({N, D}, DType::F64), dw3 = Tensor::from_vector(std::vector<double>(D, NAN), {D});
  Tensor dx4 = Tensor::empty({N, D}, DType::F64), dw4 = Tensor::zeros({D}, DType::F64);
  ops::rmsnorm_backward(r, x, w, rstd, dx3, dw3, Tensor(), 0.0f);
  ops::rmsnorm_backward(r, x, w, rstd, dx4, dw4);
  EXPECT_EQ(max_abs_diff(dw3, dw4), 0.0);
  EXPECT_EQ(max_abs_diff(dx3, dx4), 0.0);
  const std::string msg = error_message([&] { ops::rmsnorm_backward(r, x, w, rstd, dx3, dw3, Tensor(), 0.5f); });
  EXPECT_NE(msg.find("dw_beta"), std::string::npos) << msg;
}

TEST(RMSNorm, WrongWeightShapeNamesTensor) {
  Tensor x = Tensor::zeros({2, 4}, DType::F32), w = Tensor::zeros({3}, DType::F32);
  Tensor y = Tensor::empty({2, 4}, DType::F32), rstd = Tensor::empty({2}, DType::F32);
  const std::string msg = error_message([&] { ops::rmsnorm_forward(x, w, 1e-5, y, rstd); });
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
}

// ----------------------------------------------------------------------------------------- rope

TEST(RoPE, KnownAngle) {
  // hd = 2: inv_freq = 1, so the angle is the position itself.
  for (DType dt : kFloatTypes) {
    Tensor x = Tensor::from_vector(std::vector<double>{1, 0, 0.5, 2}, {2, 1, 2}).to(dt);
    Tensor y = Tensor::empty({2, 1, 2}, dt);
    ops::rope_forward(x, ids_tensor({1, 0}), 10000.0, y);
    EXPECT_NEAR(y.item(0), std::cos(1.0), 1e-7);
    EXPECT_NEAR(y.item(1), std::sin(1.0), 1e-7);
    EXPECT_EQ(y.item(2), 0.5);  // position 0: identity
    EXPECT_EQ(y.item(3), 2.0);
  }
}

TEST(RoPE, ForwardMatchesFormula) {
  const int64_t N = 3, H = 2, hd = 8, half = hd / 2;
  const double theta = 10000.0;
  const std::vector<int32_t> pos = {0, 5, 17};
  for (DType dt : kFloatTypes) {
    Tensor x = random_tensor({N, H, hd}, dt, 40), y = Tensor::empty({N, H, hd}, dt);
    ops::rope_forward(x, ids_tensor(pos), theta, y);
    Tensor ref = Tensor::empty({N, H, hd}, DType::F64);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double angle = pos[n] * std::pow(theta, -2.0 * i / hd);
          const int64_t o = (n * H + h) * hd;
          const double a = x.item(o + i), b = x.item(o + i + half);
          ref.data<double>()[o + i] = a * std::cos(angle) - b * std::sin(angle);
          ref.data<double>()[o + i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    // Angles are fp32 (as in HF): |angle error| <= ~17 * 2^-24 per unit of |x|.
    EXPECT_LT(max_abs_diff(y, ref), 5e-6) << dtype_name(dt);
    // In place gives the same result.
    Tensor xi = x.clone();
    ops::rope_forward(xi, ids_tensor(pos), theta, xi);
    EXPECT_EQ(max_abs_diff(xi, y), 0.0);
    // So does x as columns of a wider matrix (the model's q in its joint QKV output), in place.
    Tensor wide = Tensor::zeros({N, H * hd + 5}, dt);
    Tensor xs = wide.slice(1, 3, 3 + H * hd).view({N, H, hd});
    xs.copy_from(x);
    ops::rope_forward(xs, ids_tensor(pos), theta, xs);
    EXPECT_EQ(max_abs_diff(xs.clone(), y), 0.0);
    EXPECT_EQ(max_abs_diff(wide.slice(1, 0, 3).clone(), Tensor::zeros({N, 3}, dt)), 0.0);
    ops::rope_backward(xs, ids_tensor(pos), theta, xs);  // and back, to x up to rounding
    EXPECT_LT(max_abs_diff(xs.clone(), x), 1e-5) << dtype_name(dt);
  }
}

TEST(RoPE, BackwardFiniteDifferences) {
  const int64_t N = 4, H = 3, hd = 6;
  Tensor x = random_tensor({N, H, hd}, DType::F64, 41), r = random_tensor({N, H, hd}, DType::F64, 42);
  Tensor pos = ids_tensor({0, 1, 7, 300}), y = Tensor::empty({N, H, hd}, DType::F64);
  Tensor dx = Tensor::empty({N, H, hd}, DType::F64);
  ops::rope_backward(r, pos, 500000.0, dx);
  Tensor fd = numeric_grad(x, [&] {
    ops::rope_forward(x, pos, 500000.0, y);
    return dot_all(r, y);
  });
  EXPECT_LT(rel_l2(dx, fd), kFdTol);
}

// ------------------------------------------------------------------------------------ attention

namespace {

// Naive causal GQA attention with explicit masks, in double.
void naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int32_t>& cu,
                     Tensor& out, Tensor& lse) {
  const int64_t N = q.size(0), Hq = q.size(1), Hkv = k.size(1), hd = q.size(2);
  auto Q = q.to_double_vector(), K = k.to_double_vector(), V = v.to_double_vector();
  out = Tensor::zeros({N, Hq, hd}, DType::F64);
  lse = Tensor::zeros({Hq, N}, DType::F64);
  std::vector<int> seq(N);
  for (size_t s = 0; s + 1 < cu.size(); ++s)
    for (int i = cu[s]; i < cu[s + 1]; ++i) seq[i] = static_cast<int>(s);
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t g = h / (Hq / Hkv);
    for (int64_t i = 0; i < N; ++i) {
      std::vector<double> p(N, 0.0);
      double z = 0;
      for (int64_t j = 0; j < N; ++j) {
        if (seq[j] != seq[i] || j > i) continue;  // other document or future token
        double s = 0;
        for (int64_t c = 0; c < hd; ++c) s += Q[(i * Hq + h) * hd + c] * K[(j * Hkv + g) * hd + c];
        p[j] = std::exp(s / std::sqrt(static_cast<double>(hd)));
        z += p[j];
      }
      lse.data<double>()[h * N + i] = std::log(z);
      for (int64_t j = 0; j < N; ++j)
        for (int64_t c = 0; c < hd; ++c)
          out.data<double>()[(i * Hq + h) * hd + c] += p[j] / z * V[(j * Hkv + g) * hd + c];
    }
  }
}

}  // namespace

TEST(Attention, ForwardMatchesNaiveGQA) {
  const int64_t Hq = 4, Hkv = 2, hd = 8;
  const std::vector<int32_t> cu = {0, 5, 6, 13};  // lengths 5, 1, 7
  const int64_t N = 13;
  for (DType dt : kFloatTypes) {
    Tensor q = random_tensor({N, Hq, hd}, dt, 50, -2, 2), k = random_tensor({N, Hkv, hd}, dt, 51, -2, 2);
    Tensor v = random_tensor({N, Hkv, hd}, dt, 52);
    Tensor out = Tensor::empty({N, Hq, hd}, dt), lse = Tensor::empty({Hq, N}, dt);
    ops::attention_forward(q, k, v, ids_tensor(cu), 7, out, lse);
    Tensor ref, lref;
    naive_attention(q, k, v, cu, ref, lref);
    const double tol = dt == DType::F32 ? 1e-6 : 1e-13;
    EXPECT_LT(rel_l2(out, ref), tol) << dtype_name(dt);
    EXPECT_LT(rel_l2(lse, lref), tol) << dtype_name(dt);
  }
}

TEST(Attention, BackwardFiniteDifferencesGQA) {
  const int64_t Hq = 4, Hkv = 2, hd = 8, N = 13;
  const Tensor cu = ids_tensor({0, 5, 6, 13});
  Tensor q = random_tensor({N, Hq, hd}, DType::F64, 53, -2, 2);
  Tensor k = random_tensor({N, Hkv, hd}, DType::F64, 54, -2, 2);
  Tensor v = random_tensor({N, Hkv, hd}, DType::F64, 55);
  Tensor r = random_tensor({N, Hq, hd}, DType::F64, 56);
  Tensor out = Tensor::empty({N, Hq, hd}, DType::F64), lse = Tensor::empty({Hq, N}, DType::F64);
  auto loss = [&] {
    ops::attention_forward(q, k, v, cu, 7, out, lse);
    return dot_all(r, out);
  };
  loss();
  Tensor dq = Tensor::empty(q.shape(), DType::F64), dk = Tensor::empty(k.shape(), DType::F64);
  Tensor dv = Tensor::empty(v.shape(), DType::F64);
  ops::attention_backward(r, q, k, v, out, lse, cu, 7, dq, dk, dv);
  EXPECT_LT(rel_l2(dq, numeric_grad(q, loss)), kFdTol);
  EXPECT_LT(rel_l2(dk, numeric_grad(k, loss)), kFdTol);
  EXPECT_LT(rel_l2(dv, numeric_grad(v, loss)), kFdTol);
}

// Every [N, H, hd] tensor may be a column slice of a wider matrix (the model's joint QKV output
// and its gradient buffer): the same values as packed tensors, exactly, and nothing written
// outside the slices.
TEST(Attention, RowStridedTensorsGiveThePackedResults) {
  const int64_t Hq = 4, Hkv = 2, hd = 8, N = 13, qd = Hq * hd, kd = Hkv * hd, w = qd + 2 * kd + 3;
  const Tensor cu = ids_tensor({0, 5, 6, 13});
  for (DType dt : kFloatTypes) {
    Tensor q = random_tensor({N, Hq, hd}, dt, 57, -2, 2), k = random_tensor({N, Hkv, hd}, dt, 58, -2, 2);
    Tensor v = random_tensor({N, Hkv, hd}, dt, 59), r = random_tensor({N, Hq, hd}, dt, 60);
    Tensor out = Tensor::empty(q.shape(), dt), lse = Tensor::empty({Hq, N}, dt);
    ops::attention_forward(q, k, v, cu, 7, out, lse);
    Tensor dq = Tensor::empty(q.shape(), dt), dk = Tensor::empty(k.shape(), dt), dv = Tensor::empty(v.shape(), dt);
    ops::attention_backward(r, q, k, v, out, lse, cu, 7, dq, dk, dv);

    Tensor joint = Tensor::zeros({N, w}, dt), djoint = Tensor::zeros({N, w}, dt);
    auto part = [&](const Tensor& m, int64_t c0, int64_t h) { return m.slice(1, c0, c0 + h * hd).view({N, h, hd}); };
    Tensor sq = part(joint, 0, Hq), sk = part(joint, qd, Hkv), sv = part(joint, qd + kd, Hkv);
    sq.copy_from(q);
    sk.copy_from(k);
    sv.copy_from(v);
    Tensor so = part(Tensor::zeros({N, qd + 5}, dt), 0, Hq), sl = Tensor::empty({Hq, N}, dt);
    ops::attention_forward(sq, sk, sv, cu, 7, so, sl);
    EXPECT_EQ(max_abs_diff(so.clone(), out), 0.0) << dtype_name(dt);
    EXPECT_EQ(max_abs_diff(sl, lse), 0.0) << dtype_name(dt);
    Tensor sdq = part(djoint, 0, Hq), sdk = part(djoint, qd, Hkv), sdv = part(djoint, qd + kd, Hkv);
    ops::attention_backward(r, sq, sk, sv, so, sl, cu, 7, sdq, sdk, sdv);
    EXPECT_EQ(max_abs_diff(sdq.clone(), dq), 0.0) << dtype_name(dt);
    EXPECT_EQ(max_abs_diff(sdk.clone(), dk), 0.0) << dtype_name(dt);
    EXPECT_EQ(max_abs_diff(sdv.clone(), dv), 0.0) << dtype_name(dt);
    EXPECT_EQ(max_abs_diff(djoint.slice(1, w - 3, w).clone(), Tensor::zeros({N, 3}, dt)), 0.0)
        << "wrote outside the slices";
  }
}

TEST(Attention, RejectsBadSeqlens) {
  Tensor q = Tensor::zeros({4, 2, 4}, DType::F32), k = Tensor::zeros({4, 1, 4}, DType::F32);
  Tensor out = Tensor::empty({4, 2, 4}, DType::F32), lse = Tensor::empty({2, 4}, DType::F32);
  EXPECT_NE(error_message([&] { ops::attention_forward(q, k, k, ids_tensor({0, 4}), 3, out, lse); })
                .find("max_seqlen"),
            std::string::npos);
  EXPECT_NE(error_message([&] { ops::attention_forward(q, k, k, ids_tensor({0, 3}), 4, out, lse); })
                .find("cu_seqlens ends at 3"),
            std::string::npos);
}

TEST(Attention, BackendSetting) {
  ops::set_attention_backend(ops::AttentionBackend::Cudnn);
  EXPECT_EQ(ops::attention_backend(), ops::AttentionBackend::Cudnn);
  ops::set_attention_backend(ops::AttentionBackend::Auto);
  EXPECT_EQ(ops::attention_backend(), ops::AttentionBackend::Auto);
}

// --------------------------------------------------------------------------------------- swiglu

TEST(SwiGLU, ForwardAndBackward) {
  const int64_t N = 3, F = 5;
  for (DType dt : kFloatTypes) {
    Tensor g = random_tensor({N, F}, dt, 60, -4, 4), u = random_tensor({N, F}, dt, 61);
    Tensor out = Tensor::empty({N, F}, dt), ref = Tensor::empty({N, F}, DType::F64);
    ops::swiglu_forward(g, u, out);
    for (int64_t i = 0; i < N * F; ++i)
      ref.data<double>()[i] = g.item(i) / (1 + std::exp(-g.item(i))) * u.item(i);
    EXPECT_LT(rel_l2(out, ref), fwd_tol(dt)) << dtype_name(dt);
  }
  Tensor g = random_tensor({N, F}, DType::F64, 62, -4, 4), u = random_tensor({N, F}, DType::F64, 63);
  Tensor r = random_tensor({N, F}, DType::F64, 64), out = Tensor::empty({N, F}, DType::F64);
  auto loss = [&] {
    ops::swiglu_forward(g, u, out);
    return dot_all(r, out);
  };
  Tensor dg = Tensor::empty({N, F}, DType::F64), du = Tensor::empty({N, F}, DType::F64);
  ops::swiglu_backward(r, g, u, dg, du);
  EXPECT_LT(rel_l2(dg, numeric_grad(g, loss)), kFdTol);
  EXPECT_LT(rel_l2(du, numeric_grad(u, loss)), kFdTol);
  // In place (dgate aliases gate, dup aliases up) gives the same values.
  Tensor g2 = g.clone(), u2 = u.clone();
  ops::swiglu_backward(r, g2, u2, g2, u2);
  EXPECT_EQ(max_abs_diff(g2, dg), 0.0);
  EXPECT_EQ(max_abs_diff(u2, du), 0.0);
  // Gate and up as the halves of one [N, 2F] matrix (a joint gate/up GEMM's output), in place.
  Tensor gu = Tensor::empty({N, 2 * F}, DType::F64);
  Tensor sg = gu.slice(1, 0, F), su = gu.slice(1, F, 2 * F);
  sg.copy_from(g);
  su.copy_from(u);
  Tensor out2 = Tensor::empty({N, F}, DType::F64);
  ops::swiglu_forward(sg, su, out2);
  ops::swiglu_forward(g, u, out);
  EXPECT_EQ(max_abs_diff(out2, out), 0.0);
  ops::swiglu_backward(r, sg, su, sg, su);
  EXPECT_EQ(max_abs_diff(sg.clone(), dg), 0.0);
  EXPECT_EQ(max_abs_diff(su.clone(), du), 0.0);
}

// -------------------------------------------------------------------------------- cross entropy

TEST(CrossEntropy, ForwardMatchesNaiveWithIgnoredRows) {
  const int64_t N = 6, V = 7;
  const std::vector<int32_t> tv = {2, -100, 0, 6, -100, 3};
  for (DType dt : kFloatTypes) {
    Tensor logits = random_tensor({N, V}, dt, 70, -3, 3), losses = Tensor::empty({N}, dt);
    int64_t count = -1;
    const double total = ops::cross_entropy_forward(logits, ids_tensor(tv), losses, &count);
    EXPECT_EQ(count, 4);
    double ref_total = 0;
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0;
      if (tv[n] != -100) {
        double z = 0;
        for (int64_t j = 0; j < V; ++j) z += std::exp(logits.item(n * V + j));
        ref = -std::log(std::exp(logits.item(n * V + tv[n])) / z);
      }
      EXPECT_NEAR(losses.item(n), ref, dt == DType::F32 ? 1e-6 : 1e-13) << n;
      ref_total += ref;
    }
    EXPECT_NEAR(total, ref_total, dt == DType::F32 ? 1e-5 : 1e-12);
  }
  // Max-subtraction: huge logits stay finite.
  Tensor big = Tensor::from_vector(std::vector<float>{1000.f, 0.f}, {1, 2}), l = Tensor::empty({1}, DType::F32);
  EXPECT_NEAR(ops::cross_entropy_forward(big, ids_tensor({1}), l, nullptr), 1000.0, 1e-3);
}

TEST(CrossEntropy, BackwardFiniteDifferences) {
  const int64_t N = 6, V = 7;
  const double scale = 0.7;
  Tensor t = ids_tensor({2, -100, 0, 6, -100, 3});
  Tensor logits = random_tensor({N, V}, DType::F64, 71, -3, 3), losses = Tensor::empty({N}, DType::F64);
  Tensor dl = Tensor::empty({N, V}, DType::F64);
  ops::cross_entropy_backward(logits, t, scale, dl);
  Tensor fd = numeric_grad(logits, [&] { return scale * ops::cross_entropy_forward(logits, t, losses, nullptr); });
  EXPECT_LT(rel_l2(dl, fd), kFdTol);
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(dl.item(1 * V + j), 0.0);  // ignored row
  // In place.
  Tensor inplace = logits.clone();
  ops::cross_entropy_backward(inplace, t, scale, inplace);
  EXPECT_EQ(max_abs_diff(inplace, dl), 0.0);
  // Both at once (in place): the forward's sum and count, the backward's gradient.
  Tensor both = logits.clone(), losses2 = Tensor::empty({N}, DType::F64);
  int64_t count = 0, count2 = 0;
  const double sum = ops::cross_entropy_forward(logits, t, losses, &count);
  const double sum2 = ops::cross_entropy_forward_backward(both, t, scale, losses2, &count2, both);
  EXPECT_EQ(sum2, sum);
  EXPECT_EQ(count2, count);
  EXPECT_EQ(max_abs_diff(losses2, losses), 0.0);
  EXPECT_EQ(max_abs_diff(both, dl), 0.0);
}

TEST(CrossEntropy, TargetOutOfRangeNamesIt) {
  Tensor logits = Tensor::zeros({3, 7}, DType::F32), losses = Tensor::empty({3}, DType::F32);
  const std::string msg = error_message([&] { ops::cross_entropy_forward(logits, ids_tensor({0, -100, 9}), losses, nullptr); });
  EXPECT_NE(msg.find("target 9"), std::string::npos) << msg;
  EXPECT_NE(msg.find("row 2"), std::string::npos) << msg;
  const std::string msg2 = error_message([&] { ops::cross_entropy_backward(logits, ids_tensor({-5, 0, 0}), 1.0, logits); });
  EXPECT_NE(msg2.find("target -5"), std::string::npos) << msg2;
}

TEST(LMHeadLoss, ChunkedMatchesFullAndGradients) {
  const int64_t N = 7, D = 5, V = 11, chunk = 3;  // 3 does not divide 7
  const double scale = 0.37;
  Tensor t = ids_tensor({1, 10, -100, 0, 5, -100, 7});
  Tensor h = random_tensor({N, D}, DType::F64, 80), w = random_tensor({V, D}, DType::F64, 81);
  // Reference: full logits, then cross entropy.
  Tensor logits = Tensor::empty({N, V}, DType::F64), losses = Tensor::empty({N}, DType::F64);
  ops::matmul(h, false, w, true, logits);
  int64_t ref_count = 0;
  const double ref = ops::cross_entropy_forward(logits, t, losses, &ref_count);

  int64_t count = 10;  // added to
  Tensor dh = Tensor::empty({N, D}, DType::F64);
  Tensor dw = random_tensor({V, D}, DType::F64, 82), dw0 = dw.clone();
  const double loss = ops::lm_head_loss(h, w, t, scale, chunk, &count, &dh, &dw);
  EXPECT_NEAR(loss, ref, 1e-12 * std::fabs(ref));
  EXPECT_EQ(count, 10 + ref_count);
  EXPECT_EQ(ref_count, 5);

  auto f = [&] { return scale * ops::lm_head_loss(h, w, t, 1.0, chunk, nullptr, nullptr, nullptr); };
  EXPECT_LT(rel_l2(dh, numeric_grad(h, f)), kFdTol);
  EXPECT_LT(rel_l2(sub(dw, dw0), numeric_grad(w, f)), kFdTol);
  // dh written over h: the same gradients.
  Tensor h2 = h.clone(), dw2 = dw0.clone();
  ops::lm_head_loss(h2, w, t, scale, chunk, nullptr, &h2, &dw2);
  EXPECT_EQ(max_abs_diff(h2, dh), 0.0);
  EXPECT_EQ(max_abs_diff(dw2, dw), 0.0);  // dw_beta 0 (a lazily zeroed gradient): dw overwritten, its NaNs never read.
  Tensor dw3 = dw0.clone(), dh3 = Tensor::empty({N, D}, DType::F64);
  double* p3 = dw3.data<double>();
  for (int64_t i = 0; i < dw3.numel(); ++i) p3[i] = std::nan("");
  ops::lm_head_loss(h, w, t, scale, chunk, nullptr, &dh3, &dw3, 0.0f);
  EXPECT_LT(max_abs_diff(dw3, sub(dw, dw0)), 1e-14);
}

// ---------------------------------------------------------------------------------------- adamw

namespace {

// torch.optim.AdamW for one scalar, in double.
struct NaiveAdamW {
  double p, m = 0, v = 0;
  void step(double grad, const ops::AdamWHyper& h) {
    const double g = grad * h.grad_scale;
    p *= 1 - h.lr * h.weight_decay;
    m = h.beta1 * m + (1 - h.beta1) * g;
    v = h.beta2 * v + (1 - h.beta2) * g * g;
    const double mhat = m / (1 - std::pow(h.beta1, h.step));
    const double vhat = v / (1 - std::pow(h.beta2, h.step));
    p -= h.lr * mhat / (std::sqrt(vhat) + h.eps);
  }
};

}  // namespace

TEST(AdamW, StepOneHandComputed) {
  // p = 1, grad 0.25 * grad_scale 2 = 0.5, lr 0.1, wd 0.01, betas (0.9, 0.999):
  // p = 1 * (1 - 0.001) - (0.1 / 0.1) * 0.05 / (sqrt(0.00025) / sqrt(0.001) + 1e-8)
  //   = 0.999 - 0.1 / (1 + 2e-8) = 0.899000002 (to 4e-17).
  Tensor p = Tensor::from_vector(std::vector<double>{1.0}, {1});
  Tensor g = Tensor::from_vector(std::vector<double>{0.25}, {1});
  Tensor m = Tensor::zeros({1}, DType::F64), v = Tensor::zeros({1}, DType::F64);
  ops::AdamWHyper h;
  h.lr = 0.1;
  h.weight_decay = 0.01;
  h.grad_scale = 2.0;
  h.step = 1;
  ops::adamw_step(p, g, m, v, h);
  EXPECT_NEAR(p.item(0), 0.899000002, 1e-15);
  EXPECT_NEAR(m.item(0), 0.05, 1e-16);
  EXPECT_NEAR(v.item(0), 0.00025, 1e-18);
}

TEST(AdamW, SeveralStepsMatchTorchFormula) {
  const int64_t n = 9;
  ops::AdamWHyper h;
  h.lr = 3e-3;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  h.grad_scale = 0.5;
  for (DType dt : kFloatTypes) {
    Tensor p = random_tensor({n}, dt, 90), m = Tensor::zeros({n}, dt), v = Tensor::zeros({n}, dt);
    Tensor lowp = Tensor::empty({n}, DType::BF16);
    std::vector<NaiveAdamW> ref;
    for (int64_t i = 0; i < n; ++i) ref.push_back({p.item(i)});
    for (int64_t step = 1; step <= 5; ++step) {
      Tensor g = random_tensor({n}, dt, 100 + step, -2, 2);
      h.step = step;
      ops::adamw_step(p, g, m, v, h, dt == DType::F32 ? &lowp : nullptr);
      for (int64_t i = 0; i < n; ++i) ref[i].step(g.item(i), h);
    }
    const double tol = dt == DType::F32 ? 1e-6 : 1e-13;
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(p.item(i), ref[i].p, tol * (1 + std::fabs(ref[i].p))) << dtype_name(dt) << " " << i;
      EXPECT_NEAR(m.item(i), ref[i].m, tol) << dtype_name(dt) << " " << i;
      EXPECT_NEAR(v.item(i), ref[i].v, tol) << dtype_name(dt) << " " << i;
      if (dt == DType::F32) {
        EXPECT_EQ(lowp.data<uint16_t>()[i], f32_to_bf16(p.data<float>()[i])) << i;
      }
    }
  }
}

// An f32 master kept as a bf16 weight and a 16-bit remainder (ops::split_master): every f32 bit
// pattern comes back, the weight is f32_to_bf16's except on exact ties, where it rounds away from
// zero. Edge cases, then 2^20 patterns spread over the whole range (the low 16 bits of each
// exhaustively for a few upper halves).
TEST(MasterRemainders, SplitJoinIsExactAndRoundsToNearest) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x00000001u, 0x00008000u, 0x00017fffu,
                                0x3f800000u, 0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f7fffffu,
                                0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u, 0x7f7f8000u,
                                0x807fffffu, 0x3effff80u, 0x0000ffffu, 0xffff7fffu};
  for (uint32_t hi : {0x3f80u, 0xbf80u, 0x0000u, 0x8000u, 0x7f7fu, 0x0080u, 0x4b12u})
    for (uint32_t lo = 0; lo < 0x10000u; lo += 1) bits.push_back(hi << 16 | lo);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < (1 << 20); ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    bits.push_back(static_cast<uint32_t>(x >> 32));
  }
  const int64_t n = static_cast<int64_t>(bits.size());
  Tensor master = Tensor::empty({n}, DType::F32);
  std::memcpy(master.raw(), bits.data(), bits.size() * 4);
  Tensor w = Tensor::empty({n}, DType::BF16), r = Tensor::empty({n}, DType::I16), back = Tensor::empty({n}, DType::F32);
  ops::split_master(master, w, r);
  ops::join_master(w, r, back);
  int64_t ties = 0, wrong = 0, lost = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits[static_cast<size_t>(i)];
    uint32_t b;
    std::memcpy(&b, back.data<float>() + i, 4);
    lost += b != u;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    if (nan) continue;
    float f;
    std::memcpy(&f, &u, 4);
    const uint16_t h = w.data<uint16_t>()[i];
    if ((u & 0xffffu) == 0x8000u) {  // a tie: away from zero (the magnitude's bits round up)
      ++ties;
      wrong += h != static_cast<uint16_t>((u >> 16) + 1);
    } else {
      wrong += h != f32_to_bf16(f);
    }
  }
  EXPECT_EQ(lost, 0) << "f32 patterns not restored";
  EXPECT_EQ(wrong, 0) << "weights not rounded to nearest";
  EXPECT_GE(ties, 7);
}

// AdamW on (weight, remainder) is adamw_step on the joined f32 master, bit for bit, over several
// steps, with f32 and bf16 gradients; the weight is the split of the updated master.
TEST(MasterRemainders, AdamWEqualsTheF32MasterStep) {
  const int64_t n = 1003;
  ops::AdamWHyper h;
  h.lr = 3e-3;
  h.weight_decay = 0.1;
  h.grad_scale = 0.5;
  for (DType gdt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(gdt));
    Tensor p = random_tensor({n}, DType::F32, 91), m = Tensor::zeros({n}, DType::F32), v = Tensor::zeros({n}, DType::F32);
    Tensor w = Tensor::empty({n}, DType::BF16), r = Tensor::empty({n}, DType::I16);
    ops::split_master(p, w, r);
    Tensor rm = m.clone(), rv = v.clone();
    for (int64_t step = 1; step <= 5; ++step) {
      h.step = step;
      const Tensor g = random_tensor({n}, DType::F32, 200 + step, -2, 2).to(gdt);
      ops::adamw_step(p, g.to(DType::F32), m, v, h);  // bf16 -> f32 is exact
      ops::adamw_step_remainder(w, r, g, rm, rv, h);
    }
    Tensor joined = Tensor::empty({n}, DType::F32);
    ops::join_master(w, r, joined);
    EXPECT_EQ(std::memcmp(joined.raw(), p.raw(), n * 4), 0) << "master";
    EXPECT_EQ(std::memcmp(rm.raw(), m.raw(), n * 4), 0) << "m";
    EXPECT_EQ(std::memcmp(rv.raw(), v.raw(), n * 4), 0) << "v";
    for (int64_t i = 0; i < n; ++i) {
      uint16_t hi;
      int16_t rem;
      f32_split_bf16(p.data<float>()[i], hi, rem);
      ASSERT_EQ(w.data<uint16_t>()[i], hi) << i;
    }
  }
}

// ---------------------------------------------------------------------- casts and elementwise

TEST(Elementwise, CastRoundTrips) {
  const float one = 1.0f, tie_down = 1.0f + std::ldexp(1.0f, -8), tie_up = 1.0f + 3 * std::ldexp(1.0f, -8);
  const float above = 1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20);
  Tensor x = Tensor::from_vector(std::vector<float>{one, tie_down, tie_up, above, -2.5f}, {5});
  Tensor b = Tensor::empty({5}, DType::BF16);
  ops::cast(x, b);
  const uint16_t* bits = b.data<uint16_t>();
  EXPECT_EQ(bits[0], 0x3F80);  // 1.0
  EXPECT_EQ(bits[1], 0x3F80);  // halfway between 0x3F80 and 0x3F81: to even
  EXPECT_EQ(bits[2], 0x3F82);  // halfway between 0x3F81 and 0x3F82: to even
  EXPECT_EQ(bits[3], 0x3F81);  // above halfway: up
  EXPECT_EQ(bits[4], 0xC020);  // -2.5
  Tensor back = Tensor::empty({5}, DType::F32);
  ops::cast(b, back);
  const std::vector<double> expect = {1.0, 1.0, 1.015625, 1.0078125, -2.5};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back.item(i), expect[i]) << i;

  Tensor h = Tensor::empty({5}, DType::F16);
  ops::cast(x, h);
  EXPECT_EQ(h.data<uint16_t>()[0], 0x3C00);  // 1.0 in f16
  Tensor d = Tensor::from_vector(std::vector<double>{0.1, -3.0}, {2}), f = Tensor::empty({2}, DType::F32);
  Tensor d2 = Tensor::empty({2}, DType::F64);
  ops::cast(d, f);
  ops::cast(f, d2);
  EXPECT_EQ(d2.item(0), static_cast<double>(0.1f));
  EXPECT_EQ(d2.item(1), -3.0);
}

TEST(Elementwise, FillAxpyScaleAdd) {
  for (DType dt : kFloatTypes) {
    Tensor x = Tensor::empty({4}, dt), y = Tensor::empty({4}, dt);
    ops::fill(x, 1.5);
    ops::fill(y, -2.0);
    ops::axpy(2.0, x, y);  // y = -2 + 3 = 1
    ops::scale(y, 4.0);    // 4
    ops::add(x, y, y);     // 5.5
    for (int i = 0; i < 4; ++i) EXPECT_EQ(y.item(i), 5.5);
  }
  Tensor bf = Tensor::empty({3}, DType::BF16);
  ops::fill(bf, 1.0);
  EXPECT_EQ(bf.data<uint16_t>()[2], 0x3F80);
}

TEST(Elementwise, SumSquaresAndAllFinite) {
  const int64_t n = 100000;
  Tensor x = Tensor::empty({n}, DType::F64);
  for (int64_t i = 0; i < n; ++i) x.data<double>()[i] = static_cast<double>(i + 1);
  EXPECT_EQ(ops::sum_squares(x), 333338333350000.0);  // n (n+1) (2n+1) / 6, exact in double
  Tensor xf = x.to(DType::F32);
  EXPECT_EQ(ops::sum_squares(xf), 333338333350000.0);  // integers <= 1e5 are exact in f32
  Tensor b = Tensor::empty({3}, DType::BF16);
  ops::fill(b, -3.0);
  EXPECT_EQ(ops::sum_squares(b), 27.0);

  EXPECT_TRUE(ops::all_finite(xf));
  xf.data<float>()[77777] = NAN;
  EXPECT_FALSE(ops::all_finite(xf));
  xf.data<float>()[77777] = INFINITY;
  EXPECT_FALSE(ops::all_finite(xf));
  b.data<uint16_t>()[1] = 0x7FC0;  // bf16 NaN
  EXPECT_FALSE(ops::all_finite(b));
}

TEST(Determinism, SameBitsWithOneOrTwoThreads) {
  const int64_t N = 512, D = 200;
  Tensor x = random_tensor({N, D}, DType::F32, 110), w = random_tensor({D}, DType::F32, 111);
  Tensor dy = random_tensor({N, D}, DType::F32, 112);
  auto run = [&](int threads, Tensor& dw, double& ss) {
    omp_set_num_threads(threads);
    Tensor y = Tensor::empty({N, D}, DType::F32), rstd = Tensor::empty({N}, DType::F32);
    Tensor dx = Tensor::empty({N, D}, DType::F32);
    ops::rmsnorm_forward(x, w, 1e-5, y, rstd);
    dw = Tensor::zeros({D}, DType::F32);
    ops::rmsnorm_backward(dy, x, w, rstd, dx, dw);
    ss = ops::sum_squares(x.view({-1}));
  };
  Tensor dw1, dw2;
  double s1 = 0, s2 = 0;
  const int saved = omp_get_max_threads();
  run(1, dw1, s1);
  run(2, dw2, s2);
  omp_set_num_threads(saved);
  EXPECT_EQ(std::memcmp(dw1.raw(), dw2.raw(), dw1.nbytes()), 0);
  EXPECT_EQ(s1, s2);
}

// ------------------------------------------------------------ vocabulary-parallel pieces
// (runtime/ops/vocab_parallel.h): the vocabulary split into 2-4 row ranges in one process, the
// pieces combined as parallel/tensor_parallel.cpp does, against the whole-vocabulary ops.

namespace {

// Columns [c0, c1) of a 2-D CPU tensor, as a contiguous tensor of the same dtype.
Tensor columns(const Tensor& x, int64_t c0, int64_t c1) {
  const int64_t n = x.size(0), v = x.size(1);
  std::vector<double> out;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = c0; j < c1; ++j) out.push_back(x.item(i * v + j));
  return Tensor::from_vector(out, {n, c1 - c0}).to(x.dtype());
}

// Split points of [0, V): equal parts, and one uneven split.
std::vector<std::vector<int64_t>> vocab_splits(int64_t V) {
  return {{0, V / 2, V}, {0, V / 3, 2 * V / 3, V}, {0, V / 4, V / 2, 3 * V / 4, V}, {0, 1, V - 2, V}};
}

}  // namespace

TEST(VocabParallel, EmbeddingRangesSumToWhole) {
  const int64_t V = 12, D = 5;
  Tensor ids = ids_tensor({3, 0, 11, 3, 6, 1, 5, 3, 8, 11});
  const int64_t n = ids.numel();
  for (DType dt : kFloatTypes) {
    Tensor table = random_tensor({V, D}, dt, 200), whole = Tensor::empty({n, D}, dt);
    ops::embedding_forward(table, ids, whole);
    Tensor dout = random_tensor({n, D}, dt, 201), dwhole = random_tensor({V, D}, dt, 202);
    Tensor dwhole0 = dwhole.clone();
    ops::embedding_backward(dout, ids, dwhole);
    for (const auto& cut : vocab_splits(V)) {
      SCOPED_TRACE(std::to_string(cut.size() - 1) + " parts, " + dtype_name(dt));
      Tensor sum = Tensor::zeros({n, D}, dt);
      for (size_t p = 0; p + 1 < cut.size(); ++p) {
        const int64_t b = cut[p], e = cut[p + 1];
        Tensor part = table.slice(0, b, e), out = Tensor::empty({n, D}, dt);
        ops::embedding_forward_range(part, ids, b, V, out);
        for (int64_t i = 0; i < n; ++i)  // this part's ids: its row; the others: exact zeros
          for (int64_t d = 0; d < D; ++d)
            EXPECT_EQ(out.item(i * D + d), ids.item(i) >= b && ids.item(i) < e ? whole.item(i * D + d) : 0.0);
        ops::add(sum, out, sum);
        // Backward into this part's rows (starting from the same values as the whole table).
        Tensor dpart = dwhole0.slice(0, b, e).clone();
        ops::embedding_backward_range(dout, ids, b, V, dpart);
        EXPECT_EQ(max_abs_diff(dpart, dwhole.slice(0, b, e).clone()), 0.0);
      }
      EXPECT_EQ(max_abs_diff(sum, whole), 0.0);
    }
  }
  // Ids are checked against the whole vocabulary, not the part.
  Tensor part = Tensor::zeros({4, 3}, DType::F32), out = Tensor::empty({3, 3}, DType::F32);
  std::string msg = error_message([&] { ops::embedding_forward_range(part, ids_tensor({1, 12, 2}), 4, 12, out); });
  EXPECT_NE(msg.find("token id 12 at position 1"), std::string::npos) << msg;
  msg = error_message([&] { ops::embedding_backward_range(out, ids_tensor({1, -1, 2}), 4, 12, part); });
  EXPECT_NE(msg.find("token id -1"), std::string::npos) << msg;
  msg = error_message([&] { ops::embedding_forward_range(part, ids_tensor({1, 2, 3}), 10, 12, out); });
  EXPECT_NE(msg.find("rows [10, 14)"), std::string::npos) << msg;
}

TEST(VocabParallel, CrossEntropyPiecesCombineToWhole) {
  const int64_t N = 9, V = 16;
  const double scale = 0.37;
  const std::vector<int32_t> tv = {2, -100, 0, 15, 7, -100, 3, 8, 12};
  Tensor t = ids_tensor(tv);
  for (DType dt : kFloatTypes) {
    const double tol = dt == DType::F32 ? 2e-6 : 1e-12;
    Tensor logits = random_tensor({N, V}, dt, 210, -4, 4), losses = Tensor::empty({N}, dt);
    int64_t want_count = -1;
    const double want = ops::cross_entropy_forward(logits, t, losses, &want_count);
    Tensor dwhole = Tensor::empty({N, V}, dt);
    ops::cross_entropy_backward(logits, t, scale, dwhole);
    for (const auto& cut : vocab_splits(V)) {
      const int64_t parts = static_cast<int64_t>(cut.size()) - 1;
      SCOPED_TRACE(std::to_string(parts) + " parts, " + dtype_name(dt));
      // Each part's stats, laid out as the all-gather of [2, N] per rank would.
      const DType sd = ops::vocab_ce_stat_dtype(dt);
      EXPECT_EQ(sd, dt);
      Tensor gathered = Tensor::empty({parts, 2, N}, sd);
      std::vector<Tensor> part_logits;
      for (int64_t p = 0; p < parts; ++p) {
        part_logits.push_back(columns(logits, cut[p], cut[p + 1]));
        Tensor stats = gathered.select0(p);
        ops::vocab_ce_local(part_logits.back(), t, cut[p], V, stats);
      }
      Tensor lse = Tensor::empty({N}, sd);
      int64_t count = -1;
      const double got = ops::vocab_ce_combine(gathered, t, V, lse, &count);
      EXPECT_EQ(count, want_count);
      EXPECT_NEAR(got, want, tol * std::fabs(want));
      for (int64_t i = 0; i < N; ++i) {  // lse = loss + target logit on counted rows
        if (tv[i] == -100) continue;
        EXPECT_NEAR(lse.item(i), losses.item(i) + logits.item(i * V + tv[i]), tol * 10) << i;
      }
      // Backward of each part = its columns of the whole backward (also in place).
      for (int64_t p = 0; p < parts; ++p) {
        Tensor d = Tensor::empty(part_logits[p].shape(), dt);
        ops::vocab_ce_backward(part_logits[p], t, cut[p], lse, scale, d);
        EXPECT_LT(max_abs_diff(d, columns(dwhole, cut[p], cut[p + 1])), tol) << "part " << p;
        Tensor inplace = part_logits[p].clone();
        ops::vocab_ce_backward(inplace, t, cut[p], lse, scale, inplace);
        EXPECT_EQ(max_abs_diff(inplace, d), 0.0);
      }
    }
  }
  // Targets are checked against the whole vocabulary.
  Tensor l = Tensor::zeros({3, 4}, DType::F32), stats = Tensor::empty({2, 3}, DType::F32);
  std::string msg = error_message([&] { ops::vocab_ce_local(l, ids_tensor({0, -100, 16}), 4, 16, stats); });
  EXPECT_NE(msg.find("target 16 at row 2"), std::string::npos) << msg;
  Tensor g = Tensor::zeros({2, 2, 3}, DType::F32), lse = Tensor::empty({3}, DType::F32);
  msg = error_message([&] { ops::vocab_ce_combine(g, ids_tensor({-3, 0, 0}), 16, lse, nullptr); });
  EXPECT_NE(msg.find("target -3"), std::string::npos) << msg;
  msg = error_message([&] { ops::vocab_ce_local(l, ids_tensor({0, 0, 0}), 14, 16, stats); });
  EXPECT_NE(msg.find("columns [14, 18)"), std::string::npos) << msg;
}

TEST(VocabParallel, SwapLeadingDims) {
  Tensor x = random_tensor({3, 4, 2, 5}, DType::F32, 220), y = Tensor::empty({4, 3, 2, 5}, DType::F32);
  ops::swap_leading_dims(x, y);
  for (int64_t a = 0; a < 3; ++a)
    for (int64_t b = 0; b < 4; ++b)
      for (int64_t c = 0; c < 10; ++c) EXPECT_EQ(y.item((b * 3 + a) * 10 + c), x.item((a * 4 + b) * 10 + c));
  Tensor back = Tensor::empty(x.shape(), DType::F32);
  ops::swap_leading_dims(y, back);
  EXPECT_EQ(max_abs_diff(back, x), 0.0);
  Tensor wrong = Tensor::empty({3, 4, 2, 5}, DType::F32);
  const std::string msg = error_message([&] { ops::swap_leading_dims(x, wrong); });
  EXPECT_NE(msg.find("out"), std::string::npos) << msg;
  // Column slices of wider matrices, viewed (Ulysses' q, k, v in and out of one matrix): x's
  // [a, b] blocks 13 columns apart a row, out's rows 17 apart; the columns around stay as they were.
  Tensor wide_x = random_tensor({3, 4 * 10 + 13}, DType::F32, 221), wide_o = random_tensor({4 * 3, 17}, DType::F32, 222);
  Tensor sx = wide_x.slice(1, 5, 5 + 40).view({3, 4, 10}), so = wide_o.slice(1, 2, 12).view({4, 3, 10});
  const Tensor before = wide_o.clone();
  ops::swap_leading_dims(sx, so);
  for (int64_t a = 0; a < 3; ++a)
    for (int64_t b = 0; b < 4; ++b)
      for (int64_t c = 0; c < 10; ++c)
        EXPECT_EQ(wide_o.item((b * 3 + a) * 17 + 2 + c), wide_x.item(a * 53 + 5 + b * 10 + c));
  for (int64_t r = 0; r < 12; ++r)
    for (int64_t c : {0, 1, 12, 16}) EXPECT_EQ(wide_o.item(r * 17 + c), before.item(r * 17 + c));
  // [2, 5] blocks whose rows lie 10 apart: not contiguous, refused, naming the strides
  Tensor gappy = random_tensor({3, 4, 2, 10}, DType::F32, 223).slice(3, 0, 5), o = Tensor::empty({4, 3, 2, 5}, DType::F32);
  const std::string bad = error_message([&] { ops::swap_leading_dims(gappy, o); });
  EXPECT_NE(bad.find("must be contiguous"), std::string::npos) << bad;
  EXPECT_NE(bad.find("[80, 20, 10, 1]"), std::string::npos) << bad;
}
