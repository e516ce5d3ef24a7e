// LR schedules and clipping against values written out by hand from docs/training.md.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/adamw.h"
#include "optim/schedule.h"

using namespace ievo;

TEST(Schedule, WarmupThenCosine) {
  LrSchedule s{"cosine", 1.0, 0.1, 4, 12, 0.1};
  EXPECT_DOUBLE_EQ(s.at(1), 0.25);
  EXPECT_DOUBLE_EQ(s.at(4), 1.0);
  EXPECT_NEAR(s.at(8), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.5)), 1e-15);  // halfway: 0.55
  EXPECT_NEAR(s.at(8), 0.55, 1e-15);
  EXPECT_NEAR(s.at(12), 0.1, 1e-15);
}

TEST(Schedule, ConstantLinearWsd) {
  LrSchedule c{"constant", 2.0, 0.0, 2, 10, 0.1};
  EXPECT_DOUBLE_EQ(c.at(1), 1.0);
  EXPECT_DOUBLE_EQ(c.at(7), 2.0);
  LrSchedule l{"linear", 1.0, 0.0, 0, 10, 0.1};
  EXPECT_NEAR(l.at(5), 0.5, 1e-15);
  EXPECT_NEAR(l.at(10), 0.0, 1e-15);
  LrSchedule w{"wsd", 1.0, 0.0, 0, 100, 0.2};  // decay over the last 20 steps
  EXPECT_DOUBLE_EQ(w.at(80), 1.0);
  EXPECT_NEAR(w.at(90), 0.5, 1e-15);
  EXPECT_NEAR(w.at(100), 0.0, 1e-15);
  LrSchedule bad{"zigzag", 1.0, 0.0, 0, 10, 0.1};
  EXPECT_THROW(bad.at(5), Error);
}

TEST(Clip, TorchCoefficient) {
  EXPECT_DOUBLE_EQ(clip_coefficient(0.5, 1.0), 1.0);
  EXPECT_NEAR(clip_coefficient(2.0, 1.0), 1.0 / (2.0 + 1e-6), 1e-15);
  EXPECT_DOUBLE_EQ(clip_coefficient(100.0, 0.0), 1.0);  // clipping off
}
