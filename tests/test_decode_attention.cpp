// attention_decode (runtime/ops/decode_attention.h) against attention_forward on the whole
// sequence: the new tokens' rows must agree to f64 rounding, for any number of cached tokens.
#include <gtest/gtest.h>

#include <vector>

#include "runtime/ops/attention.h"
#include "runtime/ops/decode_attention.h"
#include "util.h"

using namespace ievo;

namespace {

// Rows [past, past + n) of causal attention over all `total` tokens.
Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, int64_t past) {
  const int64_t total = q.size(0);
  Tensor out = Tensor::empty(q.shape(), q.dtype()), lse = Tensor::empty({q.size(1), total}, q.dtype());
  ops::attention_forward(q, k, v, Tensor::from_vector(std::vector<int32_t>{0, static_cast<int32_t>(total)}, {2}),
                         static_cast<int>(total), out, lse);
  return out.slice(0, past, total).clone();
}

}  // namespace

TEST(DecodeAttention, MatchesFullCausalAttention) {
  for (DType dt : {DType::F64, DType::F32}) {
    for (auto [past, n] : std::vector<std::pair<int64_t, int64_t>>{{0, 6}, {5, 1}, {7, 3}, {1, 1}}) {
      const int64_t total = past + n;
      Tensor q = test::random_tensor({total, 4, 8}, dt, 1 + past);
      Tensor k = test::random_tensor({total, 2, 8}, dt, 2 + past, -2, 2);
      Tensor v = test::random_tensor({total, 2, 8}, dt, 3 + past);
      Tensor out = Tensor::empty({n, 4, 8}, dt);
      ops::attention_decode(q.slice(0, past, total).clone(), k, v, out);
      const double tol = dt == DType::F64 ? 1e-14 : 1e-6;
      EXPECT_LT(test::rel_l2(out, reference(q, k, v, past)), tol)
          << "past " << past << " n " << n << " " << dtype_name(dt);
    }
  }
}

TEST(DecodeAttention, ChecksShapes) {
  Tensor q = Tensor::zeros({3, 4, 8}, DType::F32), k = Tensor::zeros({2, 2, 8}, DType::F32);
  Tensor out = Tensor::zeros({3, 4, 8}, DType::F32);
  EXPECT_THROW(ops::attention_decode(q, k, k, out), Error);  // fewer keys than queries
  Tensor k3 = Tensor::zeros({5, 3, 8}, DType::F32);
  EXPECT_THROW(ops::attention_decode(q, k3, k3, out), Error);  // 4 heads over 3 kv heads
}
