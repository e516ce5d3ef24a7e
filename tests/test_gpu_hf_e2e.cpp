// The HF fixtures trained on the GPU: fp32 with the CPU path's tolerances (losses within 1e-4,
// final weights within 1e-3 relative L2), bf16 losses within 2e-2 of HF's float64 run, and
// run.deterministic giving bit-identical bf16 runs.
#include <gtest/gtest.h>

#include "hf_fixture.h"
#include "util.h"

using namespace ievo;

namespace {
const char* kVariants[] = {"llama_gqa", "llama_tied"};
}  // namespace

class GpuHfFixture : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    IEVO_REQUIRE_GPU();
  }
};

TEST_P(GpuHfFixture, Fp32MatchesHf) {
  test::train_fixture_and_compare(GetParam(), "--set run.device=cuda", {});
}

TEST_P(GpuHfFixture, Bf16LossesWithin2e2) {
  test::FixtureTolerance tol;
  tol.loss_abs = 2e-2;
  tol.grad_norm_rel = -1;
  tol.weight_rel_l2 = -1;
  test::train_fixture_and_compare(GetParam(), "--set run.device=cuda --set train.precision=bf16", tol);
}

TEST_P(GpuHfFixture, DeterministicBf16RunsAreBitIdentical) {
  test::FixtureTolerance tol;
  tol.loss_abs = 2e-2;
  tol.grad_norm_rel = -1;
  tol.weight_rel_l2 = -1;
  const std::string sets = "--set run.device=cuda --set train.precision=bf16 --set run.deterministic=true";
  auto a = test::train_fixture_and_compare(GetParam(), sets, tol);
  auto b = test::train_fixture_and_compare(GetParam(), sets, tol);
  for (const char* key : {"loss", "grad_norm"}) {
    auto x = test::metric_series(a, key), y = test::metric_series(b, key);
    ASSERT_EQ(x.size(), y.size());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x[i], y[i]) << key << " step " << i + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuHfFixture, ::testing::ValuesIn(kVariants));
