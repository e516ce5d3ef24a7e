// The fp16 dynamic loss scaler (optim/loss_scaler.h): InternEvo's DynamicGradScaler state machine,
// driven directly and through an fp16 emulation (gradients scaled, rounded to fp16 on the host,
// checked for Inf, unscaled).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "optim/loss_scaler.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace ievo {
namespace {

LossScalerConfig small(int64_t interval = 3, int64_t hysteresis = 2) {
  LossScalerConfig c;
  c.initial_scale = 1024;
  c.min_scale = 1;
  c.max_scale = 4096;
  c.growth_interval = interval;
  c.hysteresis = hysteresis;
  return c;
}

TEST(LossScaler, BacksOffAfterHysteresisOverflows) {
  LossScaler s(small());
  EXPECT_EQ(s.scale(), 1024);
  EXPECT_TRUE(s.update(true));  // 1st overflow: tolerated (hysteresis 2), step skipped
  EXPECT_EQ(s.scale(), 1024);
  EXPECT_EQ(s.state().hysteresis_count, 1);
  EXPECT_TRUE(s.update(true));  // 2nd: back off
  EXPECT_EQ(s.scale(), 512);
  EXPECT_TRUE(s.update(true));  // count not reset by the backoff: every overflow halves now
  EXPECT_EQ(s.scale(), 256);
  EXPECT_FALSE(s.update(false));
  EXPECT_EQ(s.scale(), 256);
  EXPECT_TRUE(s.update(true));  // a good step in between does not reset the hysteresis either
  EXPECT_EQ(s.scale(), 128);
}

TEST(LossScaler, GrowsAfterIntervalAndResetsHysteresis) {
  LossScaler s(small(/*interval=*/3));
  s.update(true);  // hysteresis 1 of 2
  EXPECT_FALSE(s.update(false));
  EXPECT_FALSE(s.update(false));
  EXPECT_EQ(s.scale(), 1024);
  EXPECT_FALSE(s.update(false));  // 3rd good step in a row: grow
  EXPECT_EQ(s.scale(), 2048);
  EXPECT_EQ(s.state().good_steps, 0);
  EXPECT_EQ(s.state().hysteresis_count, 0);
  s.update(true);  // tolerated again after the growth
  EXPECT_EQ(s.scale(), 2048);
}

TEST(LossScaler, OverflowRestartsTheGrowthCount) {
  LossScaler s(small(/*interval=*/3, /*hysteresis=*/5));
  s.update(false);
  s.update(false);
  s.update(true);  // good_steps back to 0
  s.update(false);
  s.update(false);
  EXPECT_EQ(s.scale(), 1024);
  s.update(false);
  EXPECT_EQ(s.scale(), 2048);
}

TEST(LossScaler, ClampsToMinAndMax) {
  LossScalerConfig c = small(/*interval=*/1, /*hysteresis=*/1);
  c.min_scale = 300;
  LossScaler s(c);
  s.update(true);
  EXPECT_EQ(s.scale(), 512);
  s.update(true);
  EXPECT_EQ(s.scale(), 300);  // not 256
  EXPECT_TRUE(s.at_min_scale());
  s.update(true);
  EXPECT_EQ(s.scale(), 300);
  for (int i = 0; i < 10; ++i) s.update(false);  // 600, 1200, 2400, 4096 (max), 4096, ...
  EXPECT_EQ(s.scale(), 4096);
}

TEST(LossScaler, StateRoundTrip) {
  LossScaler a(small()), b(small());
  a.update(true);
  a.update(true);
  a.update(false);
  b.set_state(a.state());
  EXPECT_EQ(b.scale(), 512);
  EXPECT_EQ(b.state().good_steps, 1);
  EXPECT_EQ(b.state().hysteresis_count, 2);
}

TEST(LossScaler, RejectsBadConfig) {
  LossScalerConfig c;
  c.backoff_factor = 1.5;
  EXPECT_THROW(LossScaler{c}, Error);
  c = {};
  c.growth_factor = 1;
  EXPECT_THROW(LossScaler{c}, Error);
  c = {};
  c.initial_scale = 1e9;  // above max_scale 2^24
  EXPECT_THROW(LossScaler{c}, Error);
  c = {};
  c.hysteresis = 0;
  EXPECT_THROW(LossScaler{c}, Error);
}

// fp16 emulation: a "backward" whose gradients are g * scale rounded to fp16. The largest fp16 is
// 65504, so a gradient of 1.5 overflows at the default initial scale 2^16; the scaler backs off
// (after the hysteresis) to 2^15 where 1.5 * 2^15 = 49152 fits, grows back to 2^16 after the
// growth interval, overflows again, ... Meanwhile a tiny gradient 2e-8 (below half of fp16's smallest
// subnormal 6e-8, so 0 unscaled) survives scaling and is recovered to fp16 precision.
TEST(LossScaler, Fp16EmulationBacksOffAndGrowsBack) {
  LossScalerConfig c;  // InternEvo defaults: 2^16, x2 / x0.5, hysteresis 2
  c.growth_interval = 4;
  LossScaler s(c);
  const std::vector<float> grads = {1.5f, -0.25f, 2e-8f};
  EXPECT_EQ(f16_to_f32(f32_to_f16(2e-8f)), 0.0f);  // lost without scaling

  std::vector<double> scales;
  std::vector<bool> skipped;
  for (int step = 0; step < 12; ++step) {
    const double scale = s.scale();
    bool overflow = false;
    std::vector<double> unscaled;
    for (float g : grads) {
      const float h = f16_to_f32(f32_to_f16(static_cast<float>(g * scale)));
      overflow |= !std::isfinite(h);
      unscaled.push_back(h / scale);
    }
    if (!overflow) {
      EXPECT_NEAR(unscaled[0], 1.5, 1.5 * 1e-3);
      EXPECT_NEAR(unscaled[1], -0.25, 0.25 * 1e-3);
      EXPECT_NEAR(unscaled[2], 2e-8, 2e-8 * 1e-3);  // 2e-8 * 2^15 ~ 6.6e-4: a normal fp16
    }
    skipped.push_back(s.update(overflow));
    scales.push_back(s.scale());
  }
  // step:      0      1      2      3      4      5      6      7      8      9     10     11
  // overflow:  yes    yes    no     no     no     no     yes    yes    no     no     no     no
  const double k = 65536, h = 32768;
  EXPECT_EQ(scales, (std::vector<double>{k, h, h, h, h, k, k, h, h, h, h, k}));
  EXPECT_EQ(skipped, (std::vector<bool>{true, true, false, false, false, false, true, true, false,
                                        false, false, false}));
}

}  // namespace
}  // namespace ievo
